"""The errors this package raises. Everything derives from :class:`HindsightError`.

The server answers errors as ``{"error": {"code": "...", "message": "..."}}`` (see the
top-level README, "Serving"); :class:`ApiError` carries both fields and the HTTP status, and
has one subclass per status the API documents, so callers can ``except Unauthorized:``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .wire import Sweep


class HindsightError(Exception):
    """Base class of every error raised by ``hindsight_client``."""


class TrackerError(HindsightError, ValueError):
    """A :class:`~hindsight_client.PowerEMA` was used inconsistently: time that does not
    advance, a module whose tensors changed, or a state dict from another tracker."""


class ApiError(HindsightError):
    """The server refused a request.

    Attributes:
        status: HTTP status code.
        code: the server's machine-readable code (``invalid_input``, ``unauthorized``,
            ``not_found``, ``conflict``, ``payload_too_large``, ``unprocessable``, ...).
        message: the server's sentence for people, naming the offending field or file.
        method, url: the request that failed.
    """

    def __init__(self, status: int, code: str, message: str, method: str, url: str) -> None:
        super().__init__(f"{method} {url}: HTTP {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.method = method
        self.url = url


class InvalidInput(ApiError):
    """HTTP 400: a malformed request or snapshot file; the message names the field."""


class Unauthorized(ApiError):
    """HTTP 401: a missing or wrong bearer token on a write (upload, reconstruct, sweep)."""


class NotFound(ApiError):
    """HTTP 404: no such run, reconstruction, sweep or reference statistics."""


class Conflict(ApiError):
    """HTTP 409: a snapshot with different tensor values is already stored at this
    (nimg, σ_rel). (A snapshot whose tensor *set* — names, dtypes, shapes — differs from the
    run's manifest is a 400 :class:`InvalidInput`.)"""


class PayloadTooLarge(ApiError):
    """HTTP 413: larger than the server's ``--max-upload-bytes``."""


class Unprocessable(ApiError):
    """HTTP 422: the stored data a request needs is unusable (e.g. a snapshot holding NaN)."""


class ServerError(ApiError):
    """HTTP 5xx: the server failed (the detail is in its log), after any retries."""


_BY_STATUS: dict[int, type[ApiError]] = {
    400: InvalidInput,
    401: Unauthorized,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: Unprocessable,
}


def api_error(status: int, code: str, message: str, method: str, url: str) -> ApiError:
    """The :class:`ApiError` subclass for ``status`` (plain :class:`ApiError` for statuses the
    API does not document, :class:`ServerError` for 5xx)."""
    cls = ServerError if status >= 500 else _BY_STATUS.get(status, ApiError)
    return cls(status, code, message, method, url)


class TransportError(HindsightError):
    """The server could not be reached or the connection broke, after every retry. The last
    underlying exception is the ``__cause__``."""


class SpoolFull(HindsightError):
    """:meth:`~hindsight_client.Client.upload` would take the upload spool past its size
    bound; nothing was queued (the message names the directory, the bound and how to raise
    it). Snapshots already spooled stay and are sent once the server answers."""

    def __init__(self, message: str, spool_dir: str, limit: int, used: int) -> None:
        super().__init__(message)
        self.spool_dir = spool_dir
        self.limit = limit
        self.used = used


class DigestMismatch(HindsightError):
    """Downloaded bytes do not hash (BLAKE3) to the digest the server announced; nothing was
    kept."""

    def __init__(self, what: str, expected: str, actual: str) -> None:
        super().__init__(f"{what}: BLAKE3 digest {actual} but the server announced {expected}")
        self.expected = expected
        self.actual = actual


class ReconstructionTimeout(HindsightError):
    """A reconstruction was still being computed when the caller's time ran out. It goes on
    on the server; asking again later returns it."""


class SweepError(HindsightError):
    """A sweep ended without every point done: :class:`SweepFailed` or
    :class:`SweepCancelled`. ``sweep`` is its final state: the points that did finish keep
    their results there."""

    def __init__(self, message: str, sweep: Sweep) -> None:
        super().__init__(message)
        self.sweep = sweep


class SweepFailed(SweepError):
    """A point of the sweep failed (the message names each failed point and its error;
    ``sweep.failed_points`` lists them)."""


class SweepCancelled(SweepError):
    """The sweep was cancelled (``DELETE /sweeps/{id}``) before every point was done."""


class SweepTimeout(HindsightError):
    """A sweep was still running when the caller's time ran out. It goes on on the server;
    waiting again later picks it up. ``sweep`` is the last state seen (``None`` if none
    was)."""

    def __init__(self, message: str, sweep: Sweep | None) -> None:
        super().__init__(message)
        self.sweep = sweep


class EvaluatorMisconfigured(HindsightError):
    """The evaluator cannot work the sweep's points as it was asked to (no ``generate`` for
    a sweep with images, no ``metrics`` for one with user metrics, ``features="client"``
    where the server takes no features): raised by
    :meth:`~hindsight_client.Client.evaluate` after releasing the lease, rather than failing
    every point in turn."""


class LeaseLost(HindsightError):
    """The lease ended before the point was finished (it expired, or the sweep was
    cancelled): the point is someone else's now."""
