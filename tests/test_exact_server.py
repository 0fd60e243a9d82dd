"""The exact engine's server: pre-aggregated statistics and the Laplace path's numerics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hierfl as hf
from hierfl.engines.exact import x64
from hierfl.engines.globals_inference import newton_mode, value_grad_hessian
from models import synthetic_lmm


@pytest.mark.parametrize("random", [(), ("x",)])
def test_pre_aggregated_likelihood_equals_sum_of_client_terms(random):
    family = hf.LinearMixed(response="y", fixed=["x"], random=list(random))
    data, _ = synthetic_lmm.generate(40, seed=3)
    padded, mask = data.padded()
    with x64():
        fields = {k: jnp.asarray(padded[k], jnp.float64) for k in family.required}
        stats = jax.vmap(family.statistics)(fields, jnp.asarray(mask))
        received = jnp.arange(40) % 3 != 0
        tau = jnp.array(0.6) if not random else jnp.array([0.6, 0.3])
        phi = {"beta": jnp.array([0.9, -0.4]), "sigma": jnp.array(1.1), "tau": tau}
        summed = jnp.sum(
            jnp.where(received, jax.vmap(family.log_marginal, (None, 0))(phi, stats), 0.0)
        )
        total = family.total_log_marginal(phi, family.server_statistics(stats, received))
    np.testing.assert_allclose(float(total), float(summed), rtol=1e-12)


def test_newton_mode_and_hessian_on_a_quadratic():
    a = np.array([[3.0, 1.0], [1.0, 2.0]])
    b = np.array([1.0, -2.0])
    with x64():

        def potential(x):
            return 0.5 * x @ jnp.asarray(a) @ x - jnp.asarray(b) @ x

        mode, hessian, decrement, _ = jax.jit(newton_mode, static_argnums=0)(
            potential, jnp.zeros(2)
        )
        _, grad, hess = value_grad_hessian(potential)(mode)
    # stopping rule: Newton decrement g'H^-1g < 1e-10, i.e. |x - mode|_H < 1e-5
    np.testing.assert_allclose(np.asarray(mode), np.linalg.solve(a, b), atol=1e-5)
    np.testing.assert_allclose(np.asarray(hessian), a, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(hess), a, rtol=1e-6)
    assert float(decrement) < 1e-10 and np.max(np.abs(np.asarray(grad))) < 1e-5


@pytest.mark.parametrize("server", ["nuts", "laplace"])
def test_second_fit_of_a_family_does_not_recompile_the_server(server):
    from hierfl.engines import globals_inference

    family = synthetic_lmm.family()
    options = dict(num_warmup=50, num_samples=50, num_chains=1, server=server)
    first, _ = synthetic_lmm.generate(30, seed=1)
    second, _ = synthetic_lmm.generate(30, seed=2)
    hf.fit(family, first, **options)
    program = (
        globals_inference._nuts_chain_program
        if server == "nuts"
        else globals_inference._laplace_programs
    )
    before = program.cache_info()
    hf.fit(family, second, **options)
    after = program.cache_info()
    assert after.hits == before.hits + 1 and after.misses == before.misses
    jitted = (
        program(exact_model(family), 50, 50, 0.9, True)
        if server == "nuts"
        else program(exact_model(family), 10, 50, 16)[0]
    )
    assert jitted._cache_size() == 1


def exact_model(family):
    from hierfl.engines.exact import collapsed_model

    return collapsed_model(family)


def test_synthetic_lmm_spectrum_ends_are_pooled_and_per_client_regressions():
    """Complete pooling is one least-squares regression of all rows; no pooling gives every
    client its own intercept: both closed forms up to the weak priors and Monte Carlo error."""
    data, _ = synthetic_lmm.generate(60, seed=5)
    spectrum = synthetic_lmm.spectrum()
    y, x = data.fields["y"], data.fields["x"]
    design = np.stack([np.ones_like(x), x], axis=1)
    ols, *_ = np.linalg.lstsq(design, y, rcond=None)
    pooled = hf.fit(spectrum["complete pooling"], data, seed=0)
    beta = pooled.global_samples["beta"].reshape(-1, 2)
    np.testing.assert_allclose(beta.mean(0), ols, atol=0.01)
    # no pooling: client intercepts are the client means of y - beta_1 x (beta_1 shared)
    separate = hf.fit(spectrum["no pooling"], data, seed=0)
    slope = separate.global_samples["beta"].reshape(-1, 2)[:, 1].mean()
    residual = y - slope * x
    own = np.array([residual[data.client_index == i].mean() for i in range(data.num_clients)])
    intercepts = (
        separate.global_samples["beta"].reshape(-1, 2)[:, :1]
        + separate.posterior_samples()["b"].reshape(-1, data.num_clients)
    ).mean(0)
    np.testing.assert_allclose(intercepts, own, atol=0.05)
