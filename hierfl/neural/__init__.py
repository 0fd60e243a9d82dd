"""Neural variants of hierfl (the ``neural`` extra: Flax and Optax).

A shared body (point estimate, averaged by the server) with Bayesian personal parts
``theta_i ~ N(mu, diag tau^2)`` -- a head, per-client normalization, low-rank adapters or
channel gates --
fitted by federated variational inference (``hf.fit(model, data, method="svi")``), plus the
baselines of :mod:`hierfl.neural.baselines` in the same harness.
"""

from __future__ import annotations

try:
    import flax  # noqa: F401
    import optax  # noqa: F401
except ImportError as error:  # pragma: no cover - exercised without the extra
    raise ImportError("hierfl.neural needs Flax and Optax: pip install 'hierfl[neural]'") from error

from .architectures import (
    CNNGate,
    CNNHead,
    MLPAdapter,
    MLPHead,
    MLPNorm,
    cnn_gate_model,
    cnn_head_model,
    mlp_adapter_model,
    mlp_head_model,
    mlp_norm_model,
)
from .fit import NeuralFit, fit_svi, load_neural_fit
from .layers import PERSONAL, PersonalAdapter, PersonalDense, PersonalGate, PersonalNorm
from .model import NeuralModel
from .svi import SVISettings, svi_algorithm

__all__ = [
    "PERSONAL",
    "CNNGate",
    "CNNHead",
    "MLPAdapter",
    "MLPHead",
    "MLPNorm",
    "NeuralFit",
    "NeuralModel",
    "PersonalAdapter",
    "PersonalDense",
    "PersonalGate",
    "PersonalNorm",
    "SVISettings",
    "cnn_gate_model",
    "cnn_head_model",
    "fit_svi",
    "load_neural_fit",
    "mlp_adapter_model",
    "mlp_head_model",
    "mlp_norm_model",
    "svi_algorithm",
]
