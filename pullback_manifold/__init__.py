"""pullback-manifold: Riemannian geometry of the latent spaces of generative models.

Importing this package imports geomstats with its pytorch backend (and leaves
torch's default dtype as it was); import it before geomstats.
"""

from ._backend import BackendError, import_geomstats

import_geomstats()

from .decoders import (  # noqa: E402
    Decoder,
    DeterministicDecoder,
    EnsembleDecoder,
    GaussianDecoder,
    MetricDecoder,
    as_decoder,
)
from .errors import ConvergenceError, ConvergenceWarning, DecoderError  # noqa: E402
from .geodesics import LogResult, ODEOptions  # noqa: E402
from .manifold import DecoderPullbackMetric, PullbackManifold  # noqa: E402
from .gaussian_process import GaussianProcessDecoder  # noqa: E402
from .statistics import pairwise_dists  # noqa: E402
from .variance import RBFPrecision, fit_rbf_precision  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "PullbackManifold",
    "DecoderPullbackMetric",
    "pairwise_dists",
    "Decoder",
    "DeterministicDecoder",
    "GaussianDecoder",
    "EnsembleDecoder",
    "GaussianProcessDecoder",
    "RBFPrecision",
    "fit_rbf_precision",
    "MetricDecoder",
    "as_decoder",
    "ODEOptions",
    "LogResult",
    "ConvergenceWarning",
    "ConvergenceError",
    "DecoderError",
    "BackendError",
]
