"""The Fit object: ArviZ schema, per-client predictions, LOO, summaries, save and load."""

from __future__ import annotations

import pickle

import matplotlib.pyplot as plt
import numpy as np
import pytest
from conftest import mcse_of_mean, synthetic_linear_mixed
from scipy import stats

import hierfl as hf
from hierfl._arviz import arviz
from hierfl.data import DataError

az = arviz()

#: standard errors allowed between a Monte Carlo estimate and its target
Z = 4.0
#: ArviZ's deprecated call into matplotlib >= 3.11 inside plot_ppc (third-party, harmless)
PPC_DEPRECATION = (
    "ignore:Passing a dict or None as alias_mapping:matplotlib.MatplotlibDeprecationWarning"
)
#: PSIS-LOO warns when leaving a whole county out moves the posterior far (a data property)
PARETO_WARNING = "ignore:Estimated shape parameter of Pareto distribution:UserWarning"


@pytest.fixture(scope="module")
def schools_idata(eight_schools_exact):
    return eight_schools_exact.to_arviz()


@pytest.fixture(scope="module")
def radon_idata(radon_exact):
    return radon_exact.to_arviz()


# ---------------------------------------------------------------------- schema
def test_groups_dims_and_coords_eight_schools(schools_idata, eight_schools_data):
    idata = schools_idata
    for group in ("posterior", "posterior_predictive", "log_likelihood", "observed_data"):
        assert group in idata.groups(), group
    assert idata.posterior["theta"].dims == ("chain", "draw", "client")
    assert list(idata.posterior["theta"].coords["client"].values) == list(
        eight_schools_data.client_ids
    )
    assert idata.posterior["mu"].dims == ("chain", "draw")
    assert idata.posterior["tau"].dims == ("chain", "draw")
    assert idata.posterior.sizes["chain"] == 2 and idata.posterior.sizes["draw"] == 500
    for group in ("posterior_predictive", "log_likelihood"):
        assert getattr(idata, group)["y"].dims == ("chain", "draw", "obs")
    assert idata.observed_data["y"].dims == ("obs",)
    assert list(idata.observed_data["obs_client"].values) == list("ABCDEFGH")
    assert idata.observed_data.attrs["inference_library"] == "hierfl"
    assert idata.observed_data.attrs["method"] == "exact"


def test_every_group_names_hierfl_and_the_method(schools_idata):
    for group in schools_idata.groups():
        attrs = getattr(schools_idata, group).attrs
        assert attrs.get("inference_library") == "hierfl", group
        assert attrs.get("method") == "exact", group


def test_no_variable_shares_a_name_with_a_dim_or_a_reserved_name(schools_idata, radon_idata):
    reserved = {"chain", "draw", "sample", "pred_id"}
    for idata in (schools_idata, radon_idata):
        for group in idata.groups():
            dataset = getattr(idata, group)
            names = set(dataset.data_vars)
            assert not names & set(dataset.dims), (group, names & set(dataset.dims))
            assert not names & reserved


def test_radon_schema(radon_idata, radon_data):
    posterior = radon_idata.posterior
    assert posterior["beta"].dims == ("chain", "draw", "coef")
    assert list(posterior["coef"].values) == ["intercept", "floor", "log_uranium", "floor_mean"]
    assert posterior["b"].dims == ("chain", "draw", "client")
    assert list(posterior["client"].values) == list(radon_data.client_ids)
    assert "HENNEPIN" in posterior["client"].values
    assert radon_idata.observed_data.sizes["obs"] == 919
    assert radon_idata.log_likelihood["log_radon"].shape == (2, 500, 919)
    np.testing.assert_array_equal(
        radon_idata.observed_data["log_radon"], radon_data.fields["log_radon"]
    )
    # every row's client is named, in the data's order
    np.testing.assert_array_equal(
        radon_idata.observed_data["obs_client"].values,
        np.asarray(radon_data.client_ids)[radon_data.client_index],
    )


def test_centralized_nuts_fit_has_the_same_schema_and_sample_stats(
    eight_schools_nuts, schools_idata
):
    idata = eight_schools_nuts.to_arviz()
    assert "sample_stats" in idata.groups()
    assert "diverging" in idata.sample_stats
    assert idata.observed_data.attrs["method"] == "nuts"
    for name in ("mu", "tau", "theta"):
        assert idata.posterior[name].dims == schools_idata.posterior[name].dims


def test_export_of_a_subset_of_clients(radon_exact, radon_data):
    chosen = ["HENNEPIN", "AITKIN"]
    idata = radon_exact.to_arviz(chosen, posterior_predictive=False)
    assert list(idata.posterior["client"].values) == chosen
    assert "posterior_predictive" not in idata.groups()
    sizes = [len(radon_data[c]["log_radon"]) for c in chosen]
    assert idata.log_likelihood.sizes["obs"] == sum(sizes)
    np.testing.assert_array_equal(
        idata.observed_data["log_radon"],
        np.concatenate([radon_data[c]["log_radon"] for c in chosen]),
    )
    full = radon_exact.posterior_samples()["b"]
    np.testing.assert_array_equal(
        idata.posterior["b"].values, full[:, :, [radon_data.index_of(c) for c in chosen]]
    )


def test_random_slopes_are_on_client_and_effect_dims():
    """Schema of a vector client site, from a Fit built around hand-made draws (any engine
    that builds a Fit gets this export)."""
    from hierfl.fit import Fit, StoredClientSamples, inspect_model

    data = synthetic_linear_mixed(6, seed=2)
    family = hf.LinearMixed(response="y", fixed=["x"], random=["x"])
    rng = np.random.default_rng(0)
    global_samples = {
        "beta": rng.normal(size=(2, 30, 2)),
        "sigma": rng.uniform(0.5, 1.5, (2, 30)),
        "tau": rng.uniform(0.1, 1.0, (2, 30, 2)),
    }
    client_samples = StoredClientSamples({"b": rng.normal(size=(2, 30, 6, 2))})
    sites = inspect_model(family.model, data.batch())
    assert sites.global_sites == ("beta", "sigma", "tau") and sites.client_sites == ("b",)
    fit = Fit(
        "exact",
        family.model,
        data,
        global_samples,
        client_samples,
        sites,
        dims=family.dims(),
        coords=family.coords(),
    )
    idata = fit.to_arviz()
    assert idata.posterior["b"].dims == ("chain", "draw", "client", "effect")
    assert list(idata.posterior["effect"].values) == ["intercept", "x"]
    assert idata.posterior["tau"].dims == ("chain", "draw", "effect")
    assert list(idata.posterior["client"].values) == list(data.client_ids)
    np.testing.assert_array_equal(idata.posterior["b"].values, client_samples.samples["b"])
    # the log-likelihood is the model's, evaluated at the draws
    b = client_samples.samples["b"][:, :, data.client_index]  # [chain, draw, obs, effect]
    x = data.fields["x"]
    mean = (
        global_samples["beta"][..., :1]
        + global_samples["beta"][..., 1:] * x
        + b[..., 0]
        + b[..., 1] * x
    )
    expected = stats.norm.logpdf(data.fields["y"], mean, global_samples["sigma"][..., None])
    np.testing.assert_allclose(idata.log_likelihood["y"].values, expected, rtol=1e-4)
    assert idata.posterior_predictive["y"].shape == (2, 30, data.num_obs)


# ---------------------------------------------------------------------- numbers in the groups
def test_log_likelihood_is_the_pointwise_density(schools_idata, eight_schools_data):
    theta = schools_idata.posterior["theta"].values
    y, sigma = eight_schools_data.fields["y"], eight_schools_data.fields["sigma"]
    expected = stats.norm.logpdf(y, theta, sigma)
    np.testing.assert_allclose(schools_idata.log_likelihood["y"].values, expected, rtol=1e-4)
    np.testing.assert_array_equal(schools_idata.observed_data["y"].values, y)


def test_posterior_predictive_is_centred_on_the_client_effect(schools_idata, eight_schools_data):
    theta = schools_idata.posterior["theta"].values
    replicated = schools_idata.posterior_predictive["y"].values
    sigma = eight_schools_data.fields["sigma"]
    draws = theta.shape[0] * theta.shape[1]
    gap = np.abs(replicated.mean(axis=(0, 1)) - theta.mean(axis=(0, 1)))
    assert np.all(gap < Z * sigma / np.sqrt(draws) + Z * mcse_of_mean(theta))
    np.testing.assert_allclose(
        replicated.std(axis=(0, 1)), np.sqrt(theta.var(axis=(0, 1)) + sigma**2), rtol=0.1
    )


# ---------------------------------------------------------------------- ArviZ functions
def test_arviz_summary_and_fit_summary(schools_idata, eight_schools_exact):
    summary = az.summary(schools_idata, var_names=["mu", "tau", "theta"])
    assert list(summary.index[:3]) == ["mu", "tau", "theta[A]"]
    assert summary.loc["mu", "r_hat"] < 1.05
    own = eight_schools_exact.summary()
    assert list(own.index) == ["mu", "tau"]
    np.testing.assert_allclose(
        own.loc["mu", "mean"], eight_schools_exact.global_samples["mu"].mean(), atol=1e-3
    )
    per_client = eight_schools_exact.summary(["theta"])
    assert "theta[H]" in per_client.index


def test_arviz_summary_of_vector_site_uses_coords(radon_exact):
    summary = radon_exact.summary()
    assert "beta[floor]" in summary.index and "sigma" in summary.index


def test_plot_forest(schools_idata, radon_idata):
    axes = az.plot_forest(schools_idata, var_names=["theta"], combined=True)
    labels = [t.get_text() for t in np.ravel(axes)[0].get_yticklabels()]
    assert any("A" in label for label in labels)
    az.plot_forest(radon_idata, var_names=["beta"], combined=True)
    plt.close("all")


@pytest.mark.filterwarnings(PPC_DEPRECATION)
def test_plot_ppc(schools_idata, radon_idata):
    az.plot_ppc(schools_idata, num_pp_samples=20)
    az.plot_ppc(radon_idata, num_pp_samples=20)
    plt.close("all")


def test_loo_by_observation_and_by_client(schools_idata, eight_schools_exact):
    by_obs = az.loo(schools_idata)
    assert by_obs.n_data_points == 8
    by_client = eight_schools_exact.loo(by="client")
    assert by_client.n_data_points == 8
    # one observation per school: leaving a school out is leaving its observation out
    np.testing.assert_allclose(by_client.elpd_loo, by_obs.elpd_loo, rtol=1e-6)
    np.testing.assert_allclose(
        eight_schools_exact.loo(by="obs").elpd_loo, by_obs.elpd_loo, rtol=1e-6
    )
    with pytest.raises(ValueError, match="by must be"):
        eight_schools_exact.loo(by="county")


@pytest.mark.filterwarnings(PARETO_WARNING)
def test_loo_by_client_groups_observations_per_county(radon_exact, radon_idata):
    by_obs = az.loo(radon_idata)
    by_client = radon_exact.loo(by="client")
    assert by_obs.n_data_points == 919
    assert by_client.n_data_points == 85
    # leaving a whole county out predicts worse than leaving one home out
    assert by_client.elpd_loo < by_obs.elpd_loo
    assert np.isfinite(by_client.elpd_loo)


def test_personal_summary(eight_schools_exact, eight_schools_data):
    frame = eight_schools_exact.personal_summary()
    assert list(frame.index) == list(eight_schools_data.client_ids)
    assert frame.index.name == "client"
    np.testing.assert_array_equal(frame["n_obs"], eight_schools_data.sizes)
    np.testing.assert_allclose(frame["theta_mean"], eight_schools_exact.personal["theta"][0])
    assert (frame["theta_sd"] > 0).all()


# ---------------------------------------------------------------------- predict
def test_predict_for_a_known_client_uses_its_posterior(eight_schools_exact):
    fit = eight_schools_exact
    theta = fit.posterior_samples(["A"])["theta"][..., 0]
    draws = fit.predict("A", sigma=[1.0, 1.0, 1.0])["y"]
    assert draws.shape == (fit.num_draws, 3)
    tolerance = Z * (mcse_of_mean(theta) + 1.0 / np.sqrt(fit.num_draws))
    assert np.all(np.abs(draws.mean(axis=0) - theta.mean()) < tolerance)
    np.testing.assert_allclose(draws.std(axis=0), np.sqrt(theta.var() + 1.0), rtol=0.1)
    assert fit.predict("A", sigma=[1.0], num_samples=50)["y"].shape == (50, 1)


def test_predict_for_an_unseen_client_is_the_population_predictive(eight_schools_exact):
    fit = eight_schools_exact
    mu, tau = fit.global_samples["mu"].ravel(), fit.global_samples["tau"].ravel()
    draws = fit.predict("a new school", sigma=[5.0], key=3)["y"][:, 0]
    variance = mu.var() + np.mean(tau**2) + 25.0
    assert abs(draws.mean() - mu.mean()) < Z * np.sqrt(variance / draws.size)
    np.testing.assert_allclose(draws.std(), np.sqrt(variance), rtol=0.15)


def test_population_predictive_is_wider_than_a_well_observed_client(ragged_normal_exact):
    fit = ragged_normal_exact
    known = fit.predict("big", sigma=[0.1], key=0)["y"][:, 0]
    unseen = fit.predict("someone new", sigma=[0.1], key=0)["y"][:, 0]
    assert unseen.std() > 5 * known.std()
    mean, sd = fit.personal["theta"]
    big = fit.data.index_of("big")
    assert abs(known.mean() - mean[big]) < Z * np.hypot(sd[big], 0.1) / np.sqrt(known.size)


def test_predict_radon_county_and_new_county(radon_exact):
    inputs = dict(floor=[0.0, 1.0], log_uranium=[0.3, 0.3], floor_mean=[0.2, 0.2])
    hennepin = radon_exact.predict("HENNEPIN", **inputs)
    new = radon_exact.predict("A NEW COUNTY", **inputs)
    assert hennepin["log_radon"].shape == (radon_exact.num_draws, 2)
    # the floor effect (about -0.7) shows in the linear predictor for both
    for out in (hennepin, new):
        gap = (out["mu"][:, 1] - out["mu"][:, 0]).mean()
        assert -0.9 < gap < -0.5
    # a new county is less certain about its intercept than one with 105 homes
    assert new["mu"][:, 0].std() > hennepin["mu"][:, 0].std()


def test_predict_is_reproducible_by_key(eight_schools_exact):
    fit = eight_schools_exact
    a = fit.predict("B", sigma=[2.0], key=7)["y"]
    b = fit.predict("B", sigma=[2.0], key=7)["y"]
    c = fit.predict("B", sigma=[2.0], key=8)["y"]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_predict_errors_name_client_and_field(eight_schools_exact, radon_exact):
    with pytest.raises(DataError, match=r"client 'A': predict needs the model's input fields"):
        eight_schools_exact.predict("A")
    with pytest.raises(DataError, match=r"client 'A': predict needs field 'sigma'"):
        eight_schools_exact.predict("A", scale=[1.0])
    with pytest.raises(DataError, match=r"client 'A', field 'sigma': non-finite"):
        eight_schools_exact.predict("A", sigma=[1.0, np.nan])
    with pytest.raises(DataError, match=r"field 'log_uranium'"):
        radon_exact.predict("HENNEPIN", floor=[0.0, 1.0], log_uranium=[0.1])
    with pytest.raises(DataError, match=r"client 'HENNEPIN': predict needs field 'log_uranium'"):
        radon_exact.predict("HENNEPIN", floor=[0.0], floor_mean=[0.1])


# ---------------------------------------------------------------------- save and load
@pytest.mark.parametrize("name", ["eight_schools_exact", "radon_exact", "eight_schools_nuts"])
def test_save_load_round_trip(name, request, tmp_path):
    fit = request.getfixturevalue(name)
    path = fit.save(tmp_path / "fit.pkl")
    loaded = hf.load_fit(path)
    assert loaded.method == fit.method and loaded.client_ids == fit.client_ids
    for site, value in fit.posterior_samples().items():
        np.testing.assert_array_equal(loaded.posterior_samples()[site], value, err_msg=site)
    client = fit.client_ids[0]
    inputs = (
        {"sigma": [1.0, 2.0]}
        if "eight" in name
        else {"floor": [0.0, 1.0], "log_uranium": [0.1, 0.1], "floor_mean": [0.2, 0.2]}
    )
    for who in (client, "unseen"):
        before, after = fit.predict(who, key=4, **inputs), loaded.predict(who, key=4, **inputs)
        for site in before:
            np.testing.assert_array_equal(before[site], after[site], err_msg=site)


def test_load_rejects_what_is_not_a_fit(tmp_path):
    path = tmp_path / "other.pkl"
    path.write_bytes(pickle.dumps({"not": "a fit"}))
    with pytest.raises(TypeError, match="does not hold a hierfl Fit"):
        hf.load_fit(path)


def test_repr_names_method_and_sites(eight_schools_exact):
    text = repr(eight_schools_exact)
    assert "method='exact'" in text and "clients=8" in text and "theta" in text


def test_a_global_with_as_many_entries_as_rows_is_not_a_row_site():
    """A deterministic global whose leading size happens to equal the number of rows (a 3 x 3
    matrix on 3 rows) stays global; a per-row deterministic is a row site."""
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist

    from hierfl.fit import inspect_model

    def model(data):
        scale = numpyro.sample("scale", dist.HalfNormal(1.0))
        numpyro.deterministic("matrix", scale * jnp.eye(3))
        with numpyro.plate("client", data.num_clients):
            theta = numpyro.sample("theta", dist.Normal(0.0, scale))
        mean = numpyro.deterministic("mean", theta[data.client])
        with numpyro.plate("obs", data.num_obs):
            numpyro.sample("y", dist.Normal(mean, 1.0), obs=data.get("y"))

    data = hf.ClientData.from_dict({"a": {"y": [0.1, 0.2]}, "b": {"y": [0.3]}}).batch()
    sites = inspect_model(model, data)
    assert sites.global_sites == ("scale", "matrix")
    assert sites.row_sites == ("mean",)
    assert sites.client_sites == ("theta",)
