"""Pointwise log-likelihood, ArviZ ``log_likelihood`` group and PSIS-LOO of neural fits."""

import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("optax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from scipy.special import logsumexp  # noqa: E402
from test_neural import CLASSES, DIM, _data, _model  # noqa: E402

import hierfl as hf  # noqa: E402
from hierfl._arviz import arviz  # noqa: E402
from hierfl.data import MIN_GROUPING_GAIN  # noqa: E402
from hierfl.neural import load_neural_fit  # noqa: E402
from hierfl.neural.fit import _log_likelihood_jit  # noqa: E402
from hierfl.neural.model import personal_names  # noqa: E402

PARETO_WARNING = "ignore:Estimated shape parameter of Pareto distribution:UserWarning"
#: draws of every test (one compiled log-likelihood per data shape)
DRAWS = 100


@pytest.fixture(scope="module")
def fit_and_data():
    data = _data()  # 4 ragged clients, 24..27 rows
    fit = hf.fit(
        _model(), data, method="svi", num_rounds=2, local_steps=2, batch_size=8, elbo_steps=20
    )
    return fit, data


def _evaluation_data(seed=3):
    """Rows for the fit's clients in another order and with very different sizes, so that
    the log-likelihood runs in two size groups and scatters rows back to data order."""
    rng = np.random.default_rng(seed)
    sizes = {"c3": 4, "c0": 60, "c2": 2, "c1": 3}
    return hf.ClientData.from_dict(
        {
            c: {"x": rng.normal(size=(n, DIM)), "y": rng.integers(0, CLASSES, n)}
            for c, n in sizes.items()
        }
    )


def test_log_likelihood_is_log_softmax_at_the_posterior_draws(fit_and_data):
    fit, _ = fit_and_data
    data = _evaluation_data()
    assert len(data.size_groups(fit.settings.size_groups, min_gain=MIN_GROUPING_GAIN)) > 1
    idata = fit.to_arviz(data=data, num_draws=DRAWS, key=7)
    ll = idata.log_likelihood["y"]
    assert ll.dims == ("chain", "draw", "obs")
    assert ll.shape == (1, DRAWS, data.num_obs)
    assert ll["obs_client"].values.tolist() == np.repeat(data.client_ids, data.sizes).tolist()
    np.testing.assert_array_equal(idata.observed_data["y"].values, data.fields["y"])
    # the same draws as fit.log_likelihood with the same key
    np.testing.assert_array_equal(ll.values, fit.log_likelihood(data, num_draws=DRAWS, key=7)["y"])
    # independent path: rebuild theta from the exported posterior draws by name, run the
    # whole network (model.logits) and take log softmax at the label
    _, template = fit.model.init(jax.random.PRNGKey(0))
    names = [name for name, _ in personal_names(template)]
    treedef = jax.tree_util.tree_structure(template)
    post = idata.posterior
    start = 0
    for client, size in zip(data.client_ids, data.sizes, strict=True):
        rows = data[client]
        for draw in (0, 3):
            personal = jax.tree_util.tree_unflatten(
                treedef,
                [jnp.asarray(post[n].sel(client=client).values[0, draw]) for n in names],
            )
            logits = fit.model.logits(fit.shared, personal, jnp.asarray(rows["x"], jnp.float32))
            expected = np.take_along_axis(
                np.asarray(jax.nn.log_softmax(logits)), rows["y"][:, None].astype(int), axis=1
            )[:, 0]
            np.testing.assert_allclose(
                ll.values[0, draw, start : start + size], expected, rtol=1e-5, atol=1e-5
            )
        start += size


def test_mean_likelihood_is_the_posterior_predictive_at_the_labels(fit_and_data):
    fit, data = fit_and_data
    draws = 1000  # p(y | theta) is skewed where it is near 0 or 1: its mean needs many draws
    likelihood = np.exp(fit.log_likelihood(data, num_draws=draws, key=1)["y"][0].astype(float))
    fields, mask = data.padded()  # every client padded to one shape: one compiled predict
    offsets = np.concatenate([[0], np.cumsum(data.sizes)])
    for i, client in enumerate(data.client_ids):
        probs = fit.predict(client, x=fields["x"][i], num_samples=draws, key=2)["probs"]
        at_label = probs[mask[i], fields["y"][i][mask[i]].astype(int)]
        block = likelihood[:, offsets[i] : offsets[i + 1]]
        # two independent Monte Carlo means of p(y | x, w, theta), theta ~ q_i
        tolerance = 4.0 * block.std(axis=0) * np.sqrt(2.0 / draws) + 1e-5
        np.testing.assert_array_less(np.abs(block.mean(axis=0) - at_label), tolerance)


@pytest.mark.filterwarnings(PARETO_WARNING)
def test_loo_by_client_sums_each_clients_rows(fit_and_data):
    az = arviz()
    fit, data = fit_and_data
    by_client = fit.loo(data=data, by="client", num_draws=DRAWS, key=5)
    assert by_client.n_data_points == data.num_clients
    assert by_client.loo_i.dims == ("client",)
    assert by_client.loo_i["client"].values.tolist() == list(data.client_ids)
    np.testing.assert_allclose(by_client.loo_i.values.sum(), by_client.elpd_loo, rtol=1e-10)
    # lppd = elpd_loo + p_loo, from the summed rows of each client at the same draws
    ll = fit.log_likelihood(data, num_draws=DRAWS, key=5)["y"][0].astype(np.float64)
    offsets = np.concatenate([[0], np.cumsum(data.sizes)[:-1]])
    per_client = np.add.reduceat(ll, offsets, axis=1)  # [draw, client]
    lppd = np.sum(logsumexp(per_client, axis=0) - np.log(DRAWS))
    np.testing.assert_allclose(by_client.elpd_loo + by_client.p_loo, lppd, rtol=1e-5)
    # by="obs" is az.loo of the exported log_likelihood group
    by_obs = fit.loo(data=data, by="obs", num_draws=DRAWS, key=5)
    assert by_obs.n_data_points == data.num_obs
    direct = az.loo(fit.to_arviz(data=data, num_draws=DRAWS, key=5))
    np.testing.assert_allclose(by_obs.elpd_loo, direct.elpd_loo, rtol=1e-10)
    with pytest.raises(ValueError, match="by must be"):
        fit.loo(data=data, by="county")
    with pytest.raises(TypeError, match="needs data="):
        fit.loo()


@pytest.mark.filterwarnings(PARETO_WARNING)
def test_saved_and_loaded_fit_gives_the_same_log_likelihood_and_loo(fit_and_data, tmp_path):
    fit, data = fit_and_data
    loaded = load_neural_fit(fit.save(tmp_path / "fit.pkl"))
    np.testing.assert_array_equal(
        loaded.log_likelihood(data, num_draws=DRAWS)["y"],
        fit.log_likelihood(data, num_draws=DRAWS)["y"],
    )
    np.testing.assert_allclose(
        loaded.loo(data=data, num_draws=DRAWS).elpd_loo,
        fit.loo(data=data, num_draws=DRAWS).elpd_loo,
    )


def test_to_arviz_without_data_has_no_log_likelihood_and_no_recompilation(fit_and_data):
    fit, data = fit_and_data
    assert "log_likelihood" not in fit.to_arviz(num_draws=DRAWS).groups()
    fit.log_likelihood(data, num_draws=DRAWS)
    compiled = _log_likelihood_jit(fit.model, None)
    size = compiled._cache_size()
    fit.log_likelihood(data, num_draws=DRAWS, key=9)  # same shapes, another key: no new trace
    assert compiled._cache_size() == size


def test_bad_data_names_the_client_and_field(fit_and_data):
    fit, data = fit_and_data
    rng = np.random.default_rng(0)

    def client_data(**clients):
        return hf.ClientData.from_dict(clients)

    good = {"x": rng.normal(size=(3, DIM)), "y": np.array([0, 1, 2])}
    with pytest.raises(hf.DataError, match="client 'zz' is not in this fit"):
        fit.log_likelihood(client_data(c0=good, zz=good))
    with pytest.raises(hf.DataError, match="client 'c1', field 'x'.*shape"):
        fit.log_likelihood(client_data(c1={"x": rng.normal(size=(3, DIM + 1)), "y": good["y"]}))
    with pytest.raises(hf.DataError, match="client 'c2', field 'y', row 1"):
        fit.log_likelihood(
            client_data(c0=good, c2={"x": good["x"], "y": np.array([0, CLASSES, 1])})
        )
    with pytest.raises(hf.DataError, match="needs field 'y'"):
        fit.log_likelihood(client_data(c0={"x": good["x"]}))
    with pytest.raises(TypeError, match="ClientData"):
        fit.to_arviz(data={"c0": good})
