"""hindsight_client: power-function EMAs for PyTorch trainers, and a client for the hindsight
post-hoc EMA server.

Post-hoc EMA (Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion
Models", EDM2, arXiv 2312.02696): train while tracking two power-function EMAs of the weights
(:class:`PowerEMA`, σ_rel 0.05 and 0.10), upload snapshots of them now and then
(:meth:`Client.upload`), and after training ask the server for an EMA of any other width
(:meth:`Client.reconstruct`) — a least-squares combination of the snapshots, with a report
of how good it is — and score reconstructions with FID/KID over a sweep of widths
(:meth:`Client.start_sweep`, :meth:`Client.wait_sweep`) — sampled by the server's own
EDM2 workers, or by your own model, sampler and metrics (:meth:`Client.evaluate`, an
external evaluator, with :func:`seeded_randn` for per-image noise and
:class:`InceptionFeatures` for NVIDIA's Inception features on your GPU).

:class:`PowerEMA`, :meth:`Client.evaluate`, :meth:`Client.reference_from_images`,
:func:`seeded_randn` and :class:`InceptionFeatures` need PyTorch (``pip install
hindsight-client[torch]``); the rest does not.
Times are training images (``nimg``) everywhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .client import Client
from .errors import (
    ApiError,
    Conflict,
    DigestMismatch,
    EvaluatorMisconfigured,
    HindsightError,
    InvalidInput,
    LeaseLost,
    NotFound,
    PayloadTooLarge,
    ReconstructionTimeout,
    ServerError,
    SpoolFull,
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
from .spool import SpoolEntry
from .uploads import UploadResult
from .wire import (
    AuthStatus,
    BestPoint,
    ClampedTensor,
    DeletedSnapshot,
    FeatureTerms,
    ImageGeometry,
    Lease,
    LeasePoint,
    LeaseReconstruction,
    LeaseSweep,
    MetricInfo,
    MetricSummary,
    PointResult,
    Reconstruction,
    Reference,
    Report,
    ReportInput,
    ReportWarning,
    RunSummary,
    SamplerSettings,
    SeedSet,
    StoredSnapshot,
    Sweep,
    SweepFailure,
    SweepPoint,
    SweepSpec,
    SweepWorker,
    Timings,
    UserMetric,
)

if TYPE_CHECKING:
    from .evaluation import (
        BatchUploaded,
        Claimed,
        EvaluationEvent,
        EvaluationSummary,
        PointFailed,
        PointFinished,
    )
    from .inception import InceptionFeatures
    from .noise import seed_generators, seeded_randn
    from .tracker import PowerEMA

# What needs PyTorch, imported on first use: the client alone does not need it.
_LAZY = {
    "PowerEMA": "tracker",
    "BatchUploaded": "evaluation",
    "Claimed": "evaluation",
    "EvaluationEvent": "evaluation",
    "EvaluationSummary": "evaluation",
    "PointFailed": "evaluation",
    "PointFinished": "evaluation",
    "InceptionFeatures": "inception",
    "seed_generators": "noise",
    "seeded_randn": "noise",
}

__version__ = "0.1.0"

__all__ = [
    "EDM2_PREFIX",
    "ApiError",
    "AuthStatus",
    "BatchUploaded",
    "BestPoint",
    "Claimed",
    "ClampedTensor",
    "Client",
    "Conflict",
    "DeletedSnapshot",
    "DigestMismatch",
    "EvaluationEvent",
    "EvaluationSummary",
    "EvaluatorMisconfigured",
    "FeatureTerms",
    "HindsightError",
    "ImageGeometry",
    "InceptionFeatures",
    "InvalidInput",
    "Lease",
    "LeaseLost",
    "LeasePoint",
    "LeaseReconstruction",
    "LeaseSweep",
    "MetricInfo",
    "MetricSummary",
    "NotFound",
    "PayloadTooLarge",
    "PointFailed",
    "PointFinished",
    "PointResult",
    "PowerEMA",
    "Reconstruction",
    "ReconstructionTimeout",
    "Reference",
    "Report",
    "ReportInput",
    "ReportWarning",
    "RunSummary",
    "SamplerSettings",
    "SeedSet",
    "ServerError",
    "Snapshot",
    "SpoolEntry",
    "SpoolFull",
    "StoredSnapshot",
    "Sweep",
    "SweepCancelled",
    "SweepError",
    "SweepFailed",
    "SweepFailure",
    "SweepPoint",
    "SweepSpec",
    "SweepTimeout",
    "SweepWorker",
    "Timings",
    "TrackerError",
    "TransportError",
    "Unauthorized",
    "Unprocessable",
    "UploadResult",
    "UserMetric",
    "beta",
    "digest_of",
    "gamma_to_sigma_rel",
    "save_snapshots",
    "seed_generators",
    "seeded_randn",
    "sigma_rel_to_gamma",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is not None:
        import importlib

        return getattr(importlib.import_module(f".{module}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
