"""hindsight_client: power-function EMAs for PyTorch trainers, and a client for the hindsight
post-hoc EMA server.

Post-hoc EMA (Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion
Models", EDM2, arXiv 2312.02696): train while tracking two power-function EMAs of the weights
(:class:`PowerEMA`, σ_rel 0.05 and 0.10), upload snapshots of them now and then
(:meth:`Client.upload`), and after training ask the server for an EMA of any other width
(:meth:`Client.reconstruct`) — a least-squares combination of the snapshots, with a report
of how good it is — and score reconstructions with FID/KID over a sweep of widths
(:meth:`Client.start_sweep`, :meth:`Client.wait_sweep`).

:class:`PowerEMA` needs PyTorch (``pip install hindsight-client[torch]``); the rest does not.
Times are training images (``nimg``) everywhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .client import Client
from .errors import (
    ApiError,
    Conflict,
    DigestMismatch,
    HindsightError,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    ReconstructionTimeout,
    ServerError,
    SweepCancelled,
    SweepError,
    SweepFailed,
    SweepTimeout,
    TrackerError,
    TransportError,
    Unauthorized,
    Unprocessable,
)
from .profile import beta, gamma_to_sigma_rel, sigma_rel_to_gamma
from .snapshot import EDM2_PREFIX, Snapshot, digest_of, save_snapshots
from .uploads import UploadResult
from .wire import (
    BestPoint,
    ClampedTensor,
    MetricInfo,
    MetricSummary,
    PointResult,
    Reconstruction,
    Reference,
    Report,
    ReportInput,
    ReportWarning,
    SamplerSettings,
    Sweep,
    SweepPoint,
    SweepSpec,
    Timings,
)

if TYPE_CHECKING:
    from .tracker import PowerEMA

__version__ = "0.1.0"

__all__ = [
    "EDM2_PREFIX",
    "ApiError",
    "BestPoint",
    "ClampedTensor",
    "Client",
    "Conflict",
    "DigestMismatch",
    "HindsightError",
    "InvalidInput",
    "MetricInfo",
    "MetricSummary",
    "NotFound",
    "PayloadTooLarge",
    "PointResult",
    "PowerEMA",
    "Reconstruction",
    "ReconstructionTimeout",
    "Reference",
    "Report",
    "ReportInput",
    "ReportWarning",
    "SamplerSettings",
    "ServerError",
    "Snapshot",
    "Sweep",
    "SweepCancelled",
    "SweepError",
    "SweepFailed",
    "SweepPoint",
    "SweepSpec",
    "SweepTimeout",
    "Timings",
    "TrackerError",
    "TransportError",
    "Unauthorized",
    "Unprocessable",
    "UploadResult",
    "beta",
    "digest_of",
    "gamma_to_sigma_rel",
    "save_snapshots",
    "sigma_rel_to_gamma",
]


def __getattr__(name: str) -> Any:
    # PowerEMA imports torch, which the client alone does not need.
    if name == "PowerEMA":
        from .tracker import PowerEMA

        return PowerEMA
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
