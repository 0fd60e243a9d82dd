"""hierfl: personalized federated learning as explicit hierarchical Bayesian models.

>>> import hierfl as hf
>>> {"exact", "nuts"} <= set(hf.METHODS)
True
"""

from .api import METHODS, as_client_data, fit
from .data import ClientData, DataError, ModelData
from .drift import DriftingNormal
from .engines import ep as _ep  # noqa: F401  (registers METHODS["ep"]; ep imports the registry)
from .families import BetaBinomial, ConjugateFamily, GammaPoisson, LinearMixed, NormalNormal
from .fit import Fit, load_fit
from .priors import PriorError
from .protocol import FederatedAlgorithm, simulate
from .tribes import NormalMixture, membership

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "BetaBinomial",
    "ClientData",
    "ConjugateFamily",
    "DataError",
    "DriftingNormal",
    "FederatedAlgorithm",
    "Fit",
    "GammaPoisson",
    "LinearMixed",
    "ModelData",
    "NormalMixture",
    "NormalNormal",
    "PriorError",
    "as_client_data",
    "fit",
    "load_fit",
    "membership",
    "simulate",
]
