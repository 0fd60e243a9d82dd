"""InstEval's community layer (global -> department -> instructor): the instructor ->
department map, the three-level model against its closed-form Gaussian posterior, federated
EP against centralized NUTS, and bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from conftest import FAST, Z, mcse_of_mean, x64
from jax.flatten_util import ravel_pytree
from numpyro.infer.util import potential_energy

import hierfl as hf
from models import insteval

#: hyperparameters fixed for the closed-form checks: near the full-data posterior means
#: (beta0 3.24, tau 0.52, sigma 1.22), with a department sd of 0.1 (posterior mean 0.064)
FIXED = {"beta0": 3.24, "tau_dept": 0.1, "tau": 0.52, "sigma": 1.22}
#: the subsets: four departments (codes) of different sizes and mean ratings ...
CODES = (4, 8, 10, 11)
#: ... and their ten instructors with the fewest ratings each (10 to 27 ratings, 525 in all)
PER_DEPARTMENT = 10
#: EP against NUTS: EP's Monte Carlo error is not in the effective sample size of its final
#: Gaussian draws, so, as in test_ep and test_lme4_models, means must agree to a quarter of
#: a posterior sd and sds to 25%
EP_MEAN_SD, EP_SD_RATIO = 0.25, 0.25


def fewest(codes=CODES, per=PER_DEPARTMENT) -> hf.ClientData:
    """The ``per`` instructors with the fewest ratings in each department ``codes`` (ties to
    the smaller id), their departments numbered ``0 .. len(codes) - 1``."""
    df = insteval.frame()
    table = insteval.departments(df).join(df.groupby("d").size().rename("n"))
    chosen = [
        table[table["dept"] == code].sort_values(["n"], kind="stable").index[:per] for code in codes
    ]
    return insteval.load_community(df[df["d"].isin(np.concatenate(chosen))], departments_kept=codes)


@pytest.fixture(scope="module")
def small():
    return fewest()


def brute_force(data: hf.ClientData, beta0, tau_dept, tau, sigma, num_departments):
    """Posterior mean and covariance of ``(c_1..c_K, b_1..b_N)`` from the full Gaussian linear
    model ``y = beta0 + Z theta + e`` by dense linear algebra (no sufficient statistics)."""
    y = np.asarray(data.fields["y"], np.float64)
    rows = np.arange(y.size)
    design = np.zeros((y.size, num_departments + data.num_clients))
    design[rows, np.asarray(data.fields["dept_index"])] = 1.0
    design[rows, num_departments + data.client_index] = 1.0
    prior = np.r_[np.full(num_departments, tau_dept**-2), np.full(data.num_clients, tau**-2)]
    precision = np.diag(prior) + design.T @ design / sigma**2
    covariance = np.linalg.inv(precision)
    return covariance @ design.T @ (y - beta0) / sigma**2, covariance


# ---------------------------------------------------------------------- the department map
def test_department_map_of_the_bundled_data():
    """Every instructor's rows carry one department code, so the rule is unambiguous: 1,031
    instructors have service == 0 rows (all in one department), 97 only service lectures."""
    table = insteval.departments()
    assert len(table) == 1128 and list(table.index) == sorted(table.index)
    assert (table["num_depts"] == 1).all()
    assert int(table["from_service_0"].sum()) == 1031
    df = insteval.frame()
    only_service = df.groupby("d")["service"].min() == 1
    assert int(only_service.sum()) == 97
    np.testing.assert_array_equal(~table["from_service_0"], only_service.loc[table.index])
    np.testing.assert_array_equal(
        np.asarray(insteval.DEPARTMENTS)[table["dept_index"]], table["dept"]
    )
    assert sorted(set(table["dept"])) == list(insteval.DEPARTMENTS)


def test_department_rule_on_a_mixed_instructor():
    """Instructor 1 lectured for departments 2 (twice) and 3 (once) as their own and for 4
    (three times) as a service: their department is 2. Instructor 2 gave only service
    lectures, for 5 twice and 6 once: 5. Instructor 3 lectured once each for 8 and 7 as their
    own (and for 8 once more as a service): the tie goes to the smaller code, 7."""
    df = pd.DataFrame(
        {
            "d": [1, 1, 1, 1, 1, 1, 2, 2, 2, 3, 3, 3],
            "service": [0.0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 1],
            "dept": [2, 2, 3, 4, 4, 4, 5, 6, 5, 8, 7, 8],
            "y": np.arange(12.0) % 5 + 1,
        }
    )
    table = insteval.departments(df)
    assert table["dept"].tolist() == [2, 5, 7]
    assert table["from_service_0"].tolist() == [True, False, True]
    assert table["num_depts"].tolist() == [3, 2, 2]
    data = insteval.load_community(df)
    assert [int(data[c]["dept_index"][0]) for c in (1, 2, 3)] == [1, 4, 6]
    np.testing.assert_array_equal(data[1]["dept_index"], 1)  # constant within the client


def test_load_community(small):
    data = insteval.load_community()
    assert data.num_clients == 1128 and data.field_names == ("y", "dept_index")
    table = insteval.departments()
    first = np.concatenate([[0], np.cumsum(data.sizes)[:-1]])
    np.testing.assert_array_equal(data.fields["dept_index"][first], table["dept_index"])
    assert small.num_clients == len(CODES) * PER_DEPARTMENT
    assert (small.sizes.min(), small.sizes.max(), small.num_obs) == (10, 27, 525)
    counts = np.bincount(small.fields["dept_index"][np.cumsum(small.sizes) - 1])
    np.testing.assert_array_equal(counts, PER_DEPARTMENT)


# ---------------------------------------------------------------------- closed form
def test_closed_form_matches_brute_force_linear_algebra(small):
    """The per-department shrinkage from sufficient statistics (b integrated out instructor
    by instructor) equals the dense Gaussian posterior of the full linear model."""
    closed = insteval.department_posterior(small, num_departments=len(CODES), **FIXED)
    mean, covariance = brute_force(small, num_departments=len(CODES), **FIXED)
    sd = np.sqrt(np.diag(covariance))
    k = len(CODES)
    np.testing.assert_allclose(closed["c_mean"], mean[:k], rtol=0, atol=1e-6)
    np.testing.assert_allclose(closed["c_sd"], sd[:k], rtol=0, atol=1e-6)
    np.testing.assert_allclose(closed["b_mean"], mean[k:], rtol=0, atol=1e-6)
    np.testing.assert_allclose(closed["b_sd"], sd[k:], rtol=0, atol=1e-6)
    # the department effects are a posteriori independent given the hyperparameters
    off = covariance[:k, :k] - np.diag(np.diag(covariance[:k, :k]))
    np.testing.assert_allclose(off, 0.0, atol=1e-12)
    # a department's effect is shrunk toward 0, and its sd is below the prior's
    raw = [
        np.mean(small.fields["y"][small.fields["dept_index"] == j]) - FIXED["beta0"]
        for j in range(k)
    ]
    assert np.all(np.abs(closed["c_mean"]) < np.abs(raw))
    assert np.all(closed["c_sd"] < FIXED["tau_dept"])


def test_model_posterior_mode_and_curvature_are_the_closed_form(small):
    """With the hyperparameters fixed, the NumPyro model's log density is Gaussian in its
    latent sites (w, u), c = tau_dept w and b = tau u: its gradient vanishes at the
    closed-form posterior mean and its Hessian is the brute-force posterior precision."""
    k = len(CODES)
    model = insteval.CommunityModel(FIXED, num_departments=k)
    mean, covariance = brute_force(small, num_departments=k, **FIXED)
    scales = np.r_[np.full(k, FIXED["tau_dept"]), np.full(small.num_clients, FIXED["tau"])]
    with x64():
        batch = small.batch()
        mode = {
            "w": jnp.asarray(mean[:k] / FIXED["tau_dept"]),
            "u": jnp.asarray(mean[k:] / FIXED["tau"]),
        }
        flat, unravel = ravel_pytree(mode)  # order: u, then w

        def energy(x):
            return potential_energy(model, (batch,), {}, unravel(x))

        gradient = np.asarray(jax.jit(jax.grad(energy))(flat))
        hessian = np.asarray(jax.jit(jax.hessian(energy))(flat))
    order = np.r_[np.arange(k, k + small.num_clients), np.arange(k)]  # u first, then w
    expected = np.linalg.inv(covariance)[np.ix_(order, order)] * np.outer(
        scales[order], scales[order]
    )
    np.testing.assert_allclose(gradient, 0.0, atol=1e-8)
    np.testing.assert_allclose(hessian, expected, rtol=1e-9, atol=1e-9)


@pytest.fixture(scope="module")
def nuts_fixed(small):
    """Centralized NUTS with the hyperparameters fixed at :data:`FIXED`."""
    model = insteval.CommunityModel(FIXED, num_departments=len(CODES))
    return hf.fit(model, small, method="nuts", seed=3, **FAST)


def test_nuts_with_fixed_hyperparameters_matches_closed_form(small, nuts_fixed):
    """Centralized NUTS on the model with the hyperparameters fixed: the department and
    instructor effects' posterior means within Monte Carlo error of the closed form, and
    their sds within 15%."""
    closed = insteval.department_posterior(small, num_departments=len(CODES), **FIXED)
    draws = nuts_fixed.posterior_samples()
    for name in ("c", "b"):
        value = np.asarray(draws[name], np.float64)
        gap = np.abs(value.mean(axis=(0, 1)) - closed[f"{name}_mean"])
        np.testing.assert_array_less(gap, Z * mcse_of_mean(value))
        ratio = value.std(axis=(0, 1)) / closed[f"{name}_sd"]
        np.testing.assert_array_less(np.abs(ratio - 1), 0.15)


def test_cold_start_prediction_uses_the_department(small, nuts_fixed):
    """A new instructor of department k: ratings beta0 + c_k + b + e with b ~ N(0, tau^2),
    so their predictive mean is beta0 + E[c_k] and their sd sqrt(tau^2 + sigma^2 +
    Var[c_k])."""
    closed = insteval.department_posterior(small, num_departments=len(CODES), **FIXED)
    for k in (0, 3):
        y = nuts_fixed.predict("new", dept_index=[k])["y"][:, 0].astype(np.float64)
        sd = np.sqrt(FIXED["tau"] ** 2 + FIXED["sigma"] ** 2 + closed["c_sd"][k] ** 2)
        assert abs(y.mean() - FIXED["beta0"] - closed["c_mean"][k]) < Z * sd / np.sqrt(y.size)
        assert abs(y.std() / sd - 1) < 0.1


# ---------------------------------------------------------------------- federated EP
def _ep(model, data, **options):
    return hf.fit(model, data, method="ep", tilted="laplace", seed=0, **options)


def test_ep_with_fixed_hyperparameters_is_the_exact_posterior(small):
    """With the hyperparameters fixed every tilted distribution is Gaussian, so Laplace
    tilted inference is exact and EP's fixed point is the exact posterior: the global
    Gaussian of the department effects equals the closed form (up to float32 arithmetic),
    and each instructor's effect agrees within the Monte Carlo error of its draws."""
    k = len(CODES)
    fit = _ep(insteval.CommunityModel(FIXED, num_departments=k), small, num_rounds=30, tol=1e-4)
    assert fit.diagnostics["converged_round"] is not None
    assert fit.diagnostics["global_latent"] == ("w",)
    server = fit.diagnostics["state"][0]
    covariance = np.linalg.inv(np.asarray(server.precision, np.float64))
    mean = covariance @ np.asarray(server.shift, np.float64)
    closed = insteval.department_posterior(small, num_departments=k, **FIXED)
    scale = FIXED["tau_dept"]
    np.testing.assert_allclose(scale * mean, closed["c_mean"], atol=1e-3 * closed["c_sd"].min())
    np.testing.assert_allclose(scale * np.sqrt(np.diag(covariance)), closed["c_sd"], rtol=1e-3)
    b_mean, b_sd = fit.personal["b"]
    draws = fit.num_draws
    np.testing.assert_array_less(
        np.abs(b_mean - closed["b_mean"]), Z * closed["b_sd"] / np.sqrt(draws)
    )
    np.testing.assert_array_less(np.abs(b_sd / closed["b_sd"] - 1), 0.1)


@pytest.fixture(scope="module")
def fixed_department_sd():
    """The model with the department sd fixed at :data:`FIXED`'s, the rest learned."""
    return insteval.CommunityModel({"tau_dept": FIXED["tau_dept"]}, num_departments=len(CODES))


def _unconstrained(fit):
    draws = fit.global_samples
    out = {"beta0": draws["beta0"], "c": draws["c"]}
    for name in ("tau", "sigma", "tau_dept"):
        if name in draws:
            out[f"log_{name}"] = np.log(draws[name])
    return {k: np.asarray(v, np.float64) for k, v in out.items()}


def _gaps(fit, reference):
    """|mean difference| / reference sd and sd ratio, per unconstrained global."""
    out = {}
    a, b = _unconstrained(fit), _unconstrained(reference)
    for name, value in b.items():
        sd = value.std(axis=(0, 1))
        gap = np.abs(a[name].mean(axis=(0, 1)) - value.mean(axis=(0, 1))) / sd
        out[name] = (gap, a[name].std(axis=(0, 1)) / sd)
    return out


@pytest.mark.slow
def test_ep_agrees_with_centralized_nuts_given_the_department_sd(small, fixed_department_sd):
    """Federated EP (Laplace tilted inference, the instructor effects integrated out by
    quadrature) against centralized NUTS, with the department sd fixed and beta0, the four
    department effects, tau and sigma learned."""
    nuts = hf.fit(fixed_department_sd, small, method="nuts", seed=1, **FAST)
    fit = _ep(fixed_department_sd, small, num_rounds=20)
    assert fit.diagnostics["converged_round"] is not None
    for name, (gap, ratio) in _gaps(fit, nuts).items():
        assert np.all(gap < EP_MEAN_SD), (name, gap)
        assert np.all(np.abs(ratio - 1) < EP_SD_RATIO), (name, ratio)


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="Laplace EP with the department sd learned sits near the joint mode of "
    "(log tau_dept, w), which runs to the prior's scale (the non-centred department effects "
    "are global, not integrated out like an instructor's): on these 40 instructors tau_dept "
    "2.3 against NUTS's 0.23 and beta0 1.9 against 3.2; on the full data 2.6 against 0.064",
)
def test_ep_learns_the_department_sd(small):
    model = insteval.CommunityModel(num_departments=len(CODES))
    nuts = hf.fit(model, small, method="nuts", seed=1, target_accept=0.95, **FAST)
    fit = _ep(model, small, num_rounds=20)
    gap, ratio = _gaps(fit, nuts)["log_tau_dept"]
    assert gap < EP_MEAN_SD and abs(ratio - 1) < EP_SD_RATIO, (gap, ratio)


@pytest.mark.slow
def test_compare_on_a_subset():
    """:func:`compare` at small sizes: the three members, a seeded split of the instructors,
    and the department-blind member explaining nothing by definition."""
    df = insteval.frame()
    df = df[df["d"] <= 300]
    table = insteval.compare(df, num_warmup=100, num_samples=100, num_chains=1)
    assert list(table.index) == ["no pooling", "complete pooling", "partial pooling"]
    assert set(table.columns) >= {"tau", "tau_dept", "variance_explained", "rmse", "coverage_90"}
    assert table.loc["complete pooling", "variance_explained"] == 0.0
    assert np.isnan(table.loc["complete pooling", "tau_dept"])
    assert table.loc["partial pooling", "tau_dept"] > 0
    assert np.all((table["coverage_90"] > 0.5) & (table["coverage_90"] <= 1.0))
    training, held_out = table.attrs["training"], table.attrs["held_out"]
    assert not set(training) & set(held_out)
    assert sorted([*training, *held_out]) == sorted(df["d"].unique())
    assert len(held_out) == round(0.2 * df["d"].nunique())


# ---------------------------------------------------------------------- bad input
def test_department_out_of_range_names_the_client_and_field():
    data = hf.ClientData.from_dict(
        {"a": {"y": [3.0, 4.0], "dept_index": [1, 1]}, "b": {"y": [2.0], "dept_index": [14]}}
    )
    with pytest.raises(
        hf.DataError,
        match=r"client 'b', field 'dept_index', row 0: a department index must be an "
        r"integer in 0\.\.13 \(got 14\)",
    ):
        insteval.check_departments(data)
    with pytest.raises(hf.DataError, match=r"client 'a', field 'dept_index'.* in 0\.\.0"):
        insteval.check_departments(data, num_departments=1)
    half = hf.ClientData.from_dict({7: {"y": [3.0], "dept_index": [2.5]}})
    with pytest.raises(hf.DataError, match=r"client 7, field 'dept_index', row 0: .*\(got 2.5\)"):
        insteval.check_departments(half)
    missing = hf.ClientData.from_dict({"a": {"y": [3.0]}})
    with pytest.raises(hf.DataError, match="needs field 'dept_index'"):
        insteval.check_departments(missing)


def test_department_changing_within_a_client_names_the_client_and_field():
    data = hf.ClientData.from_dict(
        {"a": {"y": [3.0], "dept_index": [1]}, "b": {"y": [2.0, 5.0, 1.0], "dept_index": [4, 4, 6]}}
    )
    with pytest.raises(
        hf.DataError,
        match=r"client 'b', field 'dept_index', row 2: differs from the client's row 0 "
        r".*\(got 6\)",
    ):
        insteval.check_departments(data)


def test_unknown_department_code_names_the_instructor():
    df = insteval.frame()
    df.loc[df.index[df["d"] == 1002][3], "dept"] = 13  # the absent code
    with pytest.raises(
        hf.DataError,
        match=r"client 1002, field 'dept': department code 13 is "
        r"not one of \[1, 2",
    ):
        insteval.load_community(df)


def test_the_model_checks_departments_at_fit_and_predict(small, nuts_fixed):
    """Fitting data that skipped the loader raises (every engine first traces the model on
    the concrete data); a compiled ``predict`` cannot raise, so a new client's bad
    department gives NaN draws rather than a silently clipped index."""
    bad = hf.ClientData.from_dict(
        {"a": {"y": [3.0], "dept_index": [0]}, "b": {"y": [2.0, 4.0], "dept_index": [1, 0]}}
    )
    model = insteval.CommunityModel(FIXED, num_departments=2)
    for method in ("nuts", "ep"):
        with pytest.raises(hf.DataError, match=r"plate position 1, field 'dept_index'.* differs"):
            hf.fit(model, bad, method=method, num_warmup=5, num_samples=5)
    out = hf.ClientData.from_dict({"a": {"y": [3.0], "dept_index": [2]}})
    with pytest.raises(hf.DataError, match=r"field 'dept_index': department index 2 .* 0\.\.1"):
        hf.fit(model, out, method="nuts", num_warmup=5, num_samples=5, num_chains=1)
    for dept_index in ([4], [-1], [1.5], [1, 2]):
        y = nuts_fixed.predict("new", dept_index=dept_index)["y"]
        assert np.isnan(y).all(), dept_index
    assert np.isfinite(nuts_fixed.predict("new", dept_index=[3, 3])["y"]).all()
    with pytest.raises(hf.DataError, match=r"needs field 'dept_index'"):
        nuts_fixed.predict("new", y=[3.0])
    with pytest.raises(hf.PriorError, match="tau_dept"):
        insteval.CommunityModel({"tau_dept": -1.0})
