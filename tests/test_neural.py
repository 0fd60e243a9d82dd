"""Neural variants (``method="svi"``) and the baselines, at tiny sizes."""

import pickle
import sys

import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("optax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from conftest import x64  # noqa: E402

import hierfl as hf  # noqa: E402
from hierfl.neural import (  # noqa: E402
    NeuralFit,
    SVISettings,
    cnn_gate_model,
    harness,  # noqa: E402
    load_neural_fit,
    mlp_adapter_model,
    mlp_head_model,
    mlp_norm_model,
    svi_algorithm,
)
from hierfl.neural import baselines as bl  # noqa: E402
from hierfl.neural.svi import (  # noqa: E402
    TAU2_PRIOR,
    determined_share,
    fit_personal,
    ggn_diagonal,
    group_client_data,
    hyperparameter_update,
    map_objective,
    personal_objective,
    stack_client_data,
)
from hierfl.protocol import ClientGroups, simulate, vmap_clients  # noqa: E402

DIM, CLASSES = 4, 3


def _model(**kwargs):
    return mlp_head_model(input_dim=DIM, num_classes=CLASSES, hidden=(8,), **kwargs)


def _data(num_clients=4, size=24, *, permute=False, seed=0):
    """Gaussian class clusters; with ``permute`` every client relabels the classes."""
    rng = np.random.default_rng(seed)
    centers = 3.0 * rng.normal(size=(CLASSES, DIM))
    clients = {}
    for k in range(num_clients):
        n = size + k  # ragged
        y = rng.integers(0, CLASSES, n)
        x = centers[y] + rng.normal(size=(n, DIM))
        labels = np.roll(np.arange(CLASSES), k)[y] if permute else y
        clients[f"c{k}"] = {"x": x, "y": labels}
    return hf.ClientData.from_dict(clients)


def test_map_objective_is_the_proximal_objective():
    model = _model()
    shared, personal = model.init(jax.random.PRNGKey(0))
    theta, unravel = model.unravel(personal)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(10, DIM)), dtype=jnp.float32)
    y = jnp.asarray(rng.integers(0, CLASSES, 10), dtype=jnp.int32)
    mu = theta + 0.3 * jnp.asarray(rng.normal(size=theta.shape), dtype=jnp.float32)
    tau = 0.7
    size = theta.size
    hier = map_objective(model, shared, personal, mu, jnp.float32(tau), x, y)
    prox = bl.proximal_objective(model, shared, personal, mu, 1.0 / tau**2, x, y)
    constant = size * np.log(tau) + 0.5 * size * np.log(2 * np.pi)
    np.testing.assert_allclose(float(hier), float(prox) + constant, rtol=1e-5)
    # and the gradients in theta agree exactly (the constant does not depend on theta)
    g_hier = jax.grad(lambda p: map_objective(model, shared, p, mu, jnp.float32(tau), x, y))(
        personal
    )
    g_prox = jax.grad(lambda p: bl.proximal_objective(model, shared, p, mu, 1 / tau**2, x, y))(
        personal
    )
    for a, b in zip(
        jax.tree_util.tree_leaves(g_hier), jax.tree_util.tree_leaves(g_prox), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_vmapped_update_equals_per_client_loop():
    model = _model()
    data = _data()
    stacked = stack_client_data(model, data)
    algorithm = svi_algorithm(model, settings=SVISettings(local_steps=3, batch_size=8))
    server, clients = algorithm.init(jax.random.PRNGKey(0), stacked)
    broadcast = algorithm.broadcast(server)
    keys = jax.random.split(jax.random.PRNGKey(1), data.num_clients)
    vmapped = jax.jit(jax.vmap(algorithm.client_update, in_axes=(0, None, 0, 0)))
    states, messages, _ = vmapped(keys, broadcast, clients, stacked)
    single = jax.jit(algorithm.client_update)
    for i in range(data.num_clients):
        row = jax.tree_util.tree_map(lambda a, i=i: a[i], (clients, stacked))
        state, message, _ = single(keys[i], broadcast, *row)
        for a, b in zip(
            jax.tree_util.tree_leaves((state, message)),
            jax.tree_util.tree_leaves(
                jax.tree_util.tree_map(lambda a, i=i: a[i], (states, messages))
            ),
            strict=True,
        ):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def _ragged_data(sizes=(6, 7, 8, 60, 64), seed=1):
    rng = np.random.default_rng(seed)
    centers = 3.0 * rng.normal(size=(CLASSES, DIM))
    clients = {}
    for k, n in enumerate(sizes):
        y = rng.integers(0, CLASSES, n)
        clients[f"c{k}"] = {"x": centers[y] + rng.normal(size=(n, DIM)), "y": y}
    return hf.ClientData.from_dict(clients)


def test_size_groups_give_the_same_fit_with_fewer_padded_rows():
    """Clients of very different sizes run in groups padded to their own largest client
    (the full-batch E-step costs what the padded rows cost); the fit is the same."""
    model, data = _model(), _ragged_data()
    grouped = group_client_data(model, data, max_groups=2)
    assert isinstance(grouped, ClientGroups)
    padded = sum(int(g["y"].size) for g in grouped.data)
    assert padded * 2 <= data.num_clients * int(data.sizes.max())
    assert isinstance(group_client_data(model, _data(), max_groups=3), dict)  # sizes alike
    options = dict(num_rounds=2, local_steps=2, batch_size=8, elbo_steps=30)
    fits = [
        hf.fit(model, data, method="svi", seed=2, size_groups=groups, **options)
        for groups in (2, 1)
    ]
    for a, b in zip(fits[0].personal_mean, fits[1].personal_mean, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(fits[0].personal_sd, fits[1].personal_sd, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(fits[0].tau, fits[1].tau, rtol=1e-4, atol=1e-5)
    for a, b in zip(
        jax.tree_util.tree_leaves(fits[0].shared),
        jax.tree_util.tree_leaves(fits[1].shared),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    timings = harness.round_timings(
        svi_algorithm(model, settings=SVISettings(local_steps=1, elbo_steps=2)),
        grouped,
        repeats=1,
    )
    assert timings["vmapped"] > 0 and timings["loop"] > 0


def test_client_batch_gives_the_same_fit():
    """Chunks of clients vmapped one after another (bounded memory) give the same fit as
    one vmap over all clients, also when the chunk size does not divide the clients."""
    model, data = _model(), _data(num_clients=5)
    options = dict(num_rounds=2, local_steps=2, batch_size=8, elbo_steps=20, seed=3)
    whole = hf.fit(model, data, method="svi", **options)
    for chunk in (2,):  # does not divide the 5 clients
        chunked = hf.fit(model, data, method="svi", client_batch=chunk, **options)
        np.testing.assert_allclose(chunked.personal_mean, whole.personal_mean, atol=1e-5)
        np.testing.assert_allclose(chunked.personal_sd, whole.personal_sd, atol=1e-5)
        np.testing.assert_allclose(chunked.tau, whole.tau, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="client_batch"):
        hf.fit(model, data, method="svi", client_batch=0, **options)


def test_resumed_fit_continues_identically():
    model, data = _model(), _data()
    options = dict(local_steps=2, batch_size=8, elbo_steps=20, seed=4)
    straight = hf.fit(model, data, method="svi", num_rounds=4, **options)
    seen = []
    first = hf.fit(
        model,
        data,
        method="svi",
        num_rounds=2,
        on_round=lambda r, *_: seen.append(r.round),
        **options,
    )
    assert seen == [0, 1]
    resumed = hf.fit(
        model,
        data,
        method="svi",
        num_rounds=4,
        state=first.diagnostics["state"],
        start_round=2,
        **options,
    )
    assert len(resumed.diagnostics["rounds"]) == 2
    np.testing.assert_allclose(resumed.personal_mean, straight.personal_mean, atol=1e-6)
    np.testing.assert_allclose(resumed.tau, straight.tau, rtol=1e-6)


def test_no_recompilation_on_second_round():
    model = _model()
    data = _data()
    stacked = stack_client_data(model, data)
    algorithm = svi_algorithm(model, settings=SVISettings(local_steps=2, batch_size=8))

    def traces_for(num_rounds):
        traces = []

        def counted(*args):
            traces.append(1)  # runs only while tracing
            return algorithm.client_update(*args)

        simulate(
            algorithm._replace(client_update=counted),
            jax.random.PRNGKey(0),
            stacked,
            client_ids=data.client_ids,
            num_rounds=num_rounds,
        )
        return len(traces)

    # the simulator traces once to compile the vmapped update (and may trace once more for
    # the message schema); later rounds must reuse the compiled update
    assert traces_for(3) == traces_for(1) <= 2


def test_second_fit_reuses_the_compiled_round():
    """A second ``hf.fit`` with an equal model and the same algorithm settings (other driver
    settings may differ) reuses the first fit's functions and compiled round, and gives the
    same result."""
    options = dict(local_steps=2, batch_size=8, elbo_steps=20, seed=5)
    settings = SVISettings(**{k: v for k, v in options.items() if k != "seed"})
    algorithm = svi_algorithm(_model(), settings=settings)
    assert svi_algorithm(_model(), settings=settings._replace(num_rounds=2)) is algorithm
    assert svi_algorithm(_model(), settings=settings._replace(learning_rate=0.1)) is not algorithm
    data = _data()
    first = hf.fit(_model(), data, method="svi", num_rounds=2, size_groups=1, **options)
    round_fn = vmap_clients(algorithm.client_update)
    compiled = round_fn._cache_size()
    second = hf.fit(_model(), data, method="svi", num_rounds=2, size_groups=1, **options)
    assert compiled >= 1 and round_fn._cache_size() == compiled
    np.testing.assert_array_equal(second.personal_mean, first.personal_mean)
    np.testing.assert_array_equal(second.tau, first.tau)


def _closed_form_em(m, s, a, b):
    """The variational EM update of ``(mu, tau)`` written out with NumPy."""
    mu = m.mean(axis=0)
    tau2 = (np.sum((m - mu) ** 2 + s**2, axis=0) + 2 * b) / (m.shape[0] + 2 * a + 2)
    return mu, np.sqrt(tau2)


def test_server_m_step_is_the_closed_form_em_update():
    """``server_update`` (EM rule) from the clients' messages, only the received ones, equals
    ``mu = mean m_i``, ``tau^2 = (sum[(m_i - mu)^2 + s_i^2] + 2b) / (K + 2a + 2)``."""
    model = _model()
    data = _data(num_clients=5)
    stacked = stack_client_data(model, data)
    algorithm = svi_algorithm(
        model, settings=SVISettings(local_steps=2, batch_size=8, elbo_steps=5, hyper_update="em")
    )
    server, clients = algorithm.init(jax.random.PRNGKey(0), stacked)
    keys = jax.random.split(jax.random.PRNGKey(1), data.num_clients)
    vmapped = jax.vmap(algorithm.client_update, in_axes=(0, None, 0, 0))
    _, messages, _ = vmapped(keys, algorithm.broadcast(server), clients, stacked)
    # a constructed spread of client posteriors, so the update has something to fit
    rng = np.random.default_rng(0)
    num, size = messages["mean"].shape
    m = rng.normal(0.3, 0.8, size=(num, size)).astype(np.float32)
    s = rng.uniform(0.05, 0.6, size=(num, size)).astype(np.float32)
    messages = {
        **messages,
        "mean": jnp.asarray(m),
        "mean_square": jnp.asarray(m**2),
        "variance": jnp.asarray(s**2),
        "determined": determined_share(jnp.asarray(s), server.tau),
    }
    received = np.array([True, False, True, True, True])
    new, info = algorithm.server_update(
        jax.random.PRNGKey(2), server, messages, jnp.asarray(received)
    )
    mu, tau = _closed_form_em(
        m[received].astype(np.float64), s[received].astype(np.float64), *TAU2_PRIOR
    )
    np.testing.assert_allclose(new.mu, mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new.tau, tau, rtol=1e-5)
    assert float(info.received) == 4
    # the hyperprior's pseudo-counts, with a proper inverse gamma IG(2, 0.3)
    prior = (2.0, 0.3)
    em_mu, em_tau = hyperparameter_update(
        server.mu,
        server.tau,
        count=jnp.float32(num),
        mean_sum=jnp.asarray(m.sum(0)),
        mean_square_sum=jnp.asarray((m**2).sum(0)),
        variance_sum=jnp.asarray((s**2).sum(0)),
        determined_sum=jnp.zeros(size),
        rule="em",
        prior=prior,
    )
    mu, tau = _closed_form_em(m.astype(np.float64), s.astype(np.float64), *prior)
    np.testing.assert_allclose(em_mu, mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(em_tau, tau, rtol=1e-5)
    # nobody received: the hyperparameters stay
    same, _ = algorithm.server_update(
        jax.random.PRNGKey(2), server, messages, jnp.zeros(num, dtype=bool)
    )
    np.testing.assert_array_equal(same.mu, server.mu)
    np.testing.assert_array_equal(same.tau, server.tau)


def _normal_normal_sites(num_clients=20, seed=0):
    """Gaussian sites ``N(d_i, v_i)`` of a Normal-Normal model (eight-schools-like), per
    coordinate: ``tau^2 = 1, 1, 4``, the last coordinate weakly informed (site variances
    ``v_i`` of 4-8, so ``s_i^2 / tau^2`` is about 0.6)."""
    rng = np.random.default_rng(seed)
    v = rng.uniform(0.2, 2.0, size=(num_clients, 3))
    v[:, 2] = rng.uniform(4.0, 8.0, size=num_clients)
    tau2 = np.array([1.0, 1.0, 4.0])
    d = 1.0 + rng.normal(0.0, 1.0, size=(num_clients, 3)) * np.sqrt(tau2 + v)
    return d, v


def _exact_e_step(d, v, mu, tau):
    """Exact posterior of ``theta_i`` given the site ``N(d_i, v_i)`` and the prior."""
    precision = 1.0 / v + 1.0 / tau**2
    return (d / v + mu / tau**2) / precision, np.sqrt(1.0 / precision)


def _iterate(rule, d, v, rounds, tau0=1.0):
    num = d.shape[0]
    mu, tau = np.zeros(d.shape[1]), np.full(d.shape[1], tau0)
    path = []
    for _ in range(rounds):
        m, s = _exact_e_step(d, v, mu, tau)
        mu, tau = hyperparameter_update(
            jnp.asarray(mu),
            jnp.asarray(tau),
            count=jnp.asarray(float(num)),
            mean_sum=jnp.asarray(m.sum(0)),
            mean_square_sum=jnp.asarray((m**2).sum(0)),
            variance_sum=jnp.asarray((s**2).sum(0)),
            determined_sum=determined_share(jnp.asarray(s), jnp.asarray(tau)).sum(0),
            rule=rule,
        )
        mu, tau = np.asarray(mu, dtype=np.float64), np.asarray(tau, dtype=np.float64)
        path.append(tau)
    return mu, tau, path


def test_both_hyperparameter_rules_reach_the_type_ii_map_and_fixed_point_is_faster():
    """With exactly Gaussian sites (so the E-step is exact), EM and the fixed point converge
    to the maximizer of ``sum_i log N(d_i | mu, tau^2 + v_i) + log IG(tau^2; a, b)`` found
    by SciPy; the fixed point gets there in far fewer rounds."""
    from scipy.optimize import minimize

    a, b = TAU2_PRIOR
    d, v = _normal_normal_sites()
    with x64():
        fp_mu, fp_tau, fp_path = _iterate("fixed_point", d, v, rounds=300)
        em_mu, em_tau, em_path = _iterate("em", d, v, rounds=3000)
    for p in range(d.shape[1]):

        def negative(z, p=p):
            mu, tau2 = z[0], np.exp(z[1])
            total = tau2 + v[:, p]
            log_marginal = -0.5 * np.sum(np.log(total) + (d[:, p] - mu) ** 2 / total)
            return -(log_marginal - (a + 1) * np.log(tau2) - b / tau2)

        best = minimize(
            negative,
            x0=[0.0, 0.0],
            method="Nelder-Mead",
            options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 20000},
        )
        mu_star, tau_star = best.x[0], np.exp(0.5 * best.x[1])
        np.testing.assert_allclose(fp_mu[p], mu_star, atol=1e-4)
        np.testing.assert_allclose(fp_tau[p], tau_star, rtol=1e-3, atol=1e-5)
        np.testing.assert_allclose(em_mu[p], mu_star, atol=1e-4)
        np.testing.assert_allclose(em_tau[p], tau_star, rtol=1e-3, atol=1e-5)

    def rounds_to(path, target):
        """First round within 1% of the limit."""
        return next(i for i, t in enumerate(path) if abs(t - target) <= 0.01 * target)

    fp_rounds = sum(rounds_to([t[p] for t in fp_path], fp_tau[p]) for p in range(d.shape[1]))
    em_rounds = sum(rounds_to([t[p] for t in em_path], em_tau[p]) for p in range(d.shape[1]))
    assert 3 * fp_rounds < em_rounds


def test_determined_share_is_the_site_precision_share():
    """``1 - s^2/tau^2 = lambda tau^2 / (1 + lambda tau^2)`` for ``s^2 = 1/(lambda + 1/tau^2)``,
    clipped to ``[0, 1]``."""
    lam, tau = np.array([0.0, 0.5, 4.0, 100.0]), np.full(4, 0.7)
    sd = np.sqrt(1.0 / (lam + 1.0 / tau**2))
    np.testing.assert_allclose(
        determined_share(jnp.asarray(sd), jnp.asarray(tau)),
        lam * tau**2 / (1 + lam * tau**2),
        atol=1e-6,
    )
    assert float(determined_share(jnp.asarray([1.1]), jnp.asarray([1.0]))[0]) == 0.0
    with pytest.raises(ValueError, match="hyper_update"):
        hyperparameter_update(
            jnp.zeros(1),
            jnp.ones(1),
            count=1.0,
            mean_sum=jnp.zeros(1),
            mean_square_sum=jnp.zeros(1),
            variance_sum=jnp.zeros(1),
            determined_sum=jnp.zeros(1),
            rule="newton",
        )


def _tau_after(data, rounds=12, init_tau=0.3):
    fit = hf.fit(
        _model(),
        data,
        method="svi",
        num_rounds=rounds,
        local_steps=15,
        batch_size=8,
        init_tau=init_tau,
    )
    return fit


@pytest.mark.slow
def test_learned_tau_pools_on_iid_and_spreads_on_skewed_data():
    iid = _tau_after(_data(num_clients=5, size=30))
    skewed = _tau_after(_data(num_clients=5, size=30, permute=True))
    kernel = slice(0, -CLASSES)  # head_bias is the last personal leaf
    assert iid.tau.mean() < 0.3  # shrinks toward pooling
    # relabelled clients need different head kernels: tau stays well above the IID one. (Not
    # the bias: every client sees all classes about equally often, so the biases agree.)
    assert skewed.tau.mean() > 2 * iid.tau.mean()
    assert skewed.tau[kernel].mean() > 2 * iid.tau[kernel].mean()


@pytest.fixture(scope="module")
def small_fit():
    return hf.fit(_model(), _data(), method="svi", num_rounds=3, local_steps=3, batch_size=8)


def test_predict_shapes_and_probabilities(small_fit, tmp_path):
    assert isinstance(small_fit, NeuralFit)
    x = np.random.default_rng(0).normal(size=(7, DIM))
    for client in ("c0", "new client"):
        probs = small_fit.predict(client, x=x)["probs"]
        assert probs.shape == (7, CLASSES)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
        assert np.all(probs >= 0)
    mean, sd = small_fit.personal_posterior("unseen")
    np.testing.assert_array_equal(mean, small_fit.mu)
    np.testing.assert_array_equal(sd, small_fit.tau)
    labels = np.array([0, 1, 2, 0, 1])
    adapted = small_fit.adapt("new", x=x[:5], y=labels, steps=5, key=3)
    assert isinstance(adapted, NeuralFit) and adapted.client_ids == ("new",)
    np.testing.assert_array_equal(adapted.mu, small_fit.mu)  # the population is unchanged
    assert small_fit.client_ids == ("c0", "c1", "c2", "c3")  # and so is the fit
    probs = adapted.predict("new", x=x, key=4)["probs"]
    assert probs.shape == (7, CLASSES)
    assert adapted.to_arviz().posterior.sizes["client"] == 1
    with pytest.warns(FutureWarning, match="deprecated"):
        mean, sd = small_fit.adapt(x=x[:5], y=labels, steps=5, key=3)
    np.testing.assert_allclose(mean, adapted.personal_mean[0])  # the same posterior
    np.testing.assert_allclose(sd, adapted.personal_sd[0])
    np.testing.assert_allclose(
        small_fit.predict("new", x=x, key=4, posterior=(mean, sd))["probs"], probs, rtol=1e-6
    )
    with pytest.raises(hf.DataError, match="'c0' is already in the fit"):
        small_fit.adapt("c0", x=x[:5], y=labels)
    with pytest.raises(hf.DataError, match="client 'new', field 'y'"):
        small_fit.adapt("new", x=x[:5], y=labels[:4])
    with pytest.raises(hf.DataError, match="'x'"):
        small_fit.predict("c0", x=np.full((2, DIM), np.nan))
    path = small_fit.save(tmp_path / "fit.pkl")
    loaded = load_neural_fit(path)
    np.testing.assert_allclose(
        loaded.predict("c1", x=x)["probs"], small_fit.predict("c1", x=x)["probs"]
    )
    np.testing.assert_allclose(hf.load_fit(path).tau, small_fit.tau)  # the general loader too
    (tmp_path / "other.pkl").write_bytes(pickle.dumps({"not": "a fit"}))
    with pytest.raises(TypeError, match="does not hold a hierfl Fit or NeuralFit"):
        hf.load_fit(tmp_path / "other.pkl")


def test_to_arviz_has_client_dim(small_fit):
    idata = small_fit.to_arviz(num_draws=5)
    post = idata.posterior
    assert post["head_kernel"].dims == (
        "chain",
        "draw",
        "client",
        "head_kernel_dim_0",
        "head_kernel_dim_1",
    )
    assert list(post["client"].values) == ["c0", "c1", "c2", "c3"]
    assert post["tau_head_bias"].dims == ("chain", "draw", "head_bias_dim_0")
    assert "mu_head_kernel" in post


@pytest.mark.slow
def test_feature_split_reproduces_the_logits():
    for model in (_model(), mlp_norm_model(input_dim=DIM, num_classes=CLASSES, hidden=(6, 5))):
        shared, personal = model.init(jax.random.PRNGKey(0))
        x = jax.random.normal(jax.random.PRNGKey(1), (7, DIM))
        h = model.features(shared, x)
        np.testing.assert_allclose(
            model.head_logits(shared, personal, h), model.logits(shared, personal, x), atol=1e-6
        )


def test_ggn_diagonal_of_a_linear_head_is_its_hessian_diagonal():
    # for a linear head the Gauss-Newton matrix is the Hessian of the softmax loss:
    # d^2 l / d W_jc^2 = sum_n p_nc (1 - p_nc) h_nj^2, d^2 l / d b_c^2 = sum_n p_nc (1 - p_nc)
    model = _model()
    shared, personal = model.init(jax.random.PRNGKey(0))
    theta, unravel = model.unravel(personal)
    x = jax.random.normal(jax.random.PRNGKey(1), (9, DIM))
    y = jnp.arange(9, dtype=jnp.int32) % CLASSES
    mask = jnp.ones(9).at[-2:].set(0.0)  # padding rows do not count
    h = model.features(shared, x)
    diag = ggn_diagonal(model, unravel, shared, theta, h, mask)
    hessian = jax.hessian(
        lambda t: personal_objective(model, unravel, shared, t, h, y, mask, theta, jnp.inf)
    )(theta)
    np.testing.assert_allclose(diag, jnp.diag(hessian), rtol=1e-4, atol=1e-6)
    probs = jax.nn.softmax(model.logits(shared, personal, x))
    curvature = mask[:, None] * probs * (1 - probs)  # [n, C]
    kernel = (h**2).T @ curvature  # [features, C]
    np.testing.assert_allclose(unravel(diag)["head"]["kernel"], kernel, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(unravel(diag)["head"]["bias"], curvature.sum(0), rtol=1e-4)


def test_e_step_finds_the_map_and_the_mean_field_laplace_scales():
    model = _model()
    shared, personal = model.init(jax.random.PRNGKey(0))
    theta, unravel = model.unravel(personal)
    x = jax.random.normal(jax.random.PRNGKey(1), (30, DIM))
    y = jax.random.randint(jax.random.PRNGKey(2), (30,), 0, CLASSES)
    mask = jnp.ones(30)
    h = model.features(shared, x)
    mu, tau = jnp.zeros_like(theta), jnp.full_like(theta, 0.5)
    mean, sd = fit_personal(model, unravel, shared, h, y, mask, mu, tau, mu, laplace_steps=50)
    grad = jax.grad(lambda t: personal_objective(model, unravel, shared, t, h, y, mask, mu, tau))(
        mean
    )
    np.testing.assert_allclose(grad, 0.0, atol=1e-3)  # the mode
    hessian = jax.hessian(
        lambda t: personal_objective(model, unravel, shared, t, h, y, mask, mu, tau)
    )(mean)
    # the mean-field q closest (in KL(q || Laplace)) has precision diag(Hessian)
    np.testing.assert_allclose(sd, 1 / jnp.sqrt(jnp.diag(hessian)), rtol=1e-3)


def test_norm_variant_personal_parts():
    model = mlp_norm_model(input_dim=DIM, num_classes=CLASSES, hidden=(6,))
    _, personal = model.init(jax.random.PRNGKey(0))
    assert sorted(personal["norm_0"]) == ["scale", "shift"]
    fit = hf.fit(model, _data(), method="svi", num_rounds=2, local_steps=2, batch_size=8)
    assert fit.mu.shape == (12,) and np.all(fit.tau > 0)


def test_adapter_variant_is_the_shared_layer_plus_a_scaled_low_rank_correction():
    rank = 2
    model = mlp_adapter_model(input_dim=DIM, num_classes=CLASSES, hidden=(6, 5), rank=rank)
    shared, personal = model.init(jax.random.PRNGKey(0))
    assert {k: v.shape for k, v in personal["adapter_1"].items()} == {
        "down": (6, rank),
        "up": (rank, 5),
    }
    assert np.all(np.asarray(personal["adapter_1"]["up"]) == 0)  # starts at the shared layer
    # a client's adapter away from zero, against the formula written out in numpy
    rng = np.random.default_rng(0)
    down, up = rng.normal(size=(6, rank)), rng.normal(size=(rank, 5))
    theta = {"adapter_1": {"down": jnp.asarray(down), "up": jnp.asarray(up)}}
    x = rng.normal(size=(7, DIM))
    p = jax.tree_util.tree_map(np.asarray, shared)
    h = np.maximum(x @ p["first"]["kernel"] + p["first"]["bias"], 0)
    dense = p["adapter_1"]["dense"]
    kernel = dense["kernel"] + down @ up / np.sqrt(6 * rank)
    expected = np.maximum(h @ kernel + dense["bias"], 0) @ p["out"]["kernel"] + p["out"]["bias"]
    logits = model.logits(shared, theta, jnp.asarray(x, dtype=jnp.float32))
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
    features = model.features(shared, jnp.asarray(x, dtype=jnp.float32))
    np.testing.assert_allclose(model.head_logits(shared, theta, features), logits, atol=1e-6)
    fit = hf.fit(model, _data(), method="svi", num_rounds=2, local_steps=2, batch_size=8)
    assert fit.mu.shape == (6 * rank + rank * 5,) and np.all(fit.tau > 0)
    posterior = fit.to_arviz(num_draws=5).posterior
    assert posterior["adapter_1_down"].dims[:3] == ("chain", "draw", "client")
    assert posterior["adapter_1_down"].shape[2:] == (4, 6, rank)
    with pytest.raises(ValueError, match="at least two hidden layers"):
        mlp_adapter_model(input_dim=DIM, num_classes=CLASSES, hidden=(6,)).init(
            jax.random.PRNGKey(0)
        )


def test_gate_variant_scales_the_shared_channels():
    """A client's gate ``2 sigmoid(g_c)`` on channel ``c`` equals the shared network with
    the dense layer's inputs from that channel scaled by the same factor (ReLU commutes
    with a positive scale)."""
    model = cnn_gate_model(image_shape=(8, 8, 1), num_classes=CLASSES, channels=(2, 3))
    shared, personal = model.init(jax.random.PRNGKey(0))
    assert personal["gate"]["gate"].shape == (3,)
    g = jnp.array([-1.0, 0.5, 2.0])
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 64))
    logits = model.logits(shared, {"gate": {"gate": g}}, x)
    np.testing.assert_allclose(
        model.head_logits(shared, {"gate": {"gate": g}}, model.features(shared, x)),
        logits,
        atol=1e-6,
    )
    scale = 2 * jax.nn.sigmoid(g)  # flattened [2, 2, 3] feature maps: the channel is last
    kernel = shared["dense"]["kernel"] * jnp.tile(scale, 4)[:, None]
    rescaled = {**shared, "dense": {**shared["dense"], "kernel": kernel}}
    np.testing.assert_allclose(model.logits(rescaled, personal, x), logits, rtol=1e-5, atol=1e-5)
    data = hf.ClientData.from_dict(
        {c: {"x": np.asarray(x)[: 3 + c], "y": np.arange(3 + c) % CLASSES} for c in range(3)}
    )
    fit = hf.fit(model, data, method="svi", num_rounds=2, local_steps=2, batch_size=4)
    assert fit.mu.shape == (3,) and np.all(fit.tau > 0)


def test_svi_reports_bad_input_and_missing_extra(monkeypatch):
    with pytest.raises(TypeError, match="NeuralModel"):
        hf.fit(hf.NormalNormal(), _data(), method="svi")
    with pytest.raises(TypeError, match="unknown options"):
        hf.fit(_model(), _data(), method="svi", num_round=3)
    bad = hf.ClientData.from_dict({"a": {"x": np.zeros((3, DIM)), "y": np.array([0, 1, 7])}})
    with pytest.raises(ValueError, match="client 'a', field 'y'"):
        hf.fit(_model(), bad, method="svi", num_rounds=1)
    monkeypatch.setitem(sys.modules, "hierfl.neural", None)
    with pytest.raises(ImportError, match="neural"):
        hf.fit(_model(), _data(), method="svi")


def test_hierfl_import_does_not_import_flax():
    import subprocess

    code = "import sys, hierfl; print('flax' in sys.modules, 'hierfl.neural' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.parametrize(
    "name",
    [
        n if n in ("local", "fedrep") else pytest.param(n, marks=pytest.mark.slow)
        for n in bl.BASELINES
    ],
)
def test_baselines_run_vmapped(name):
    model = _model()
    data = _data()
    stacked = stack_client_data(model, data)
    settings = bl.BaselineSettings(
        num_rounds=2, local_steps=3, batch_size=8, learning_rate=1e-2, strength=0.1
    )
    personal, global_params = bl.run_baseline(
        model, name, stacked, data.client_ids, settings=settings
    )
    leaves = jax.tree_util.tree_leaves(personal)
    assert all(leaf.shape[0] == data.num_clients for leaf in leaves)
    assert all(np.all(np.isfinite(leaf)) for leaf in leaves)
    shared = jax.tree_util.tree_leaves(personal["shared"])[0]
    if name in ("fedavg", "fedprox", "fedrep", "fedbn"):  # one shared body
        np.testing.assert_allclose(shared[0], shared[1])
    if name == "local":  # nothing shared: bodies differ
        assert not np.allclose(shared[0], shared[1])


@pytest.mark.slow
def test_ditto_with_zero_strength_is_local_training():
    model = _model()
    data = _data()
    stacked = stack_client_data(model, data)
    settings = bl.BaselineSettings(
        num_rounds=1, local_steps=3, batch_size=8, learning_rate=1e-2, strength=0.0
    )
    ditto, _ = bl.run_baseline(model, "ditto", stacked, data.client_ids, settings=settings)
    local, _ = bl.run_baseline(model, "local", stacked, data.client_ids, settings=settings)
    for a, b in zip(
        jax.tree_util.tree_leaves(ditto), jax.tree_util.tree_leaves(local), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_ece_and_its_calibrated_floor_match_closed_forms():
    from scipy.stats import binom

    from hierfl.neural.metrics import calibrated_ece, expected_calibration_error

    # two bins: confidence 0.95 (right 16 of 20) and 0.55 (right 5 of 10)
    probs = np.array([[0.95, 0.05]] * 20 + [[0.55, 0.45]] * 10)
    labels = np.array([0] * 16 + [1] * 4 + [0] * 5 + [1] * 5)
    expected = (20 * abs(0.8 - 0.95) + 10 * abs(0.5 - 0.55)) / 30
    assert expected_calibration_error(probs, labels) == pytest.approx(expected)
    # a calibrated forecaster with one confidence p on n rows: E|Binomial(n, p)/n - p|
    n, p = 200, 0.9
    k = np.arange(n + 1)
    exact = float(np.sum(binom.pmf(k, n, p) * np.abs(k / n - p)))
    floor = calibrated_ece(np.tile([p, 1 - p], (n, 1)), draws=4000)
    assert floor == pytest.approx(exact, abs=4 * 0.013 / np.sqrt(4000) + 1e-4)
