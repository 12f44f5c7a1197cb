"""HTTP to one ``hindsight serve``: the session, retries with exponential backoff, error
answers mapped to exceptions, checked downloads, and server-sent event streams.

Writes need ``Authorization: Bearer <token>`` when the server has a token file; the header
travels with every request of a :class:`Transport`.
"""

from __future__ import annotations

import email.utils
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from queue import Queue
from typing import Any, TypeVar

import blake3
import httpx

from .errors import ApiError, DigestMismatch, HindsightError, TransportError, api_error
from .wire import ErrorDetail

log = logging.getLogger("hindsight_client")

T = TypeVar("T")

# Statuses worth another try: the server or a proxy in front of it is busy or restarting.
# 500 is not among them: the server uses it for failures that another try does not fix.
RETRY_STATUSES = frozenset({408, 429, 502, 503, 504})
# For requests that are not idempotent (creating a sweep or reference statistics): only the
# answers that say the request was not acted on. A proxy's 502/504 does not say that.
UNSENT_STATUSES = frozenset({408, 429, 503})

#: The error code of a 429 that says a configured bound is reached (e.g. too many unfinished
#: sweeps), which waiting a few seconds does not change: not retried.
LIMIT_REACHED = "limit_reached"


def retry_after(response: httpx.Response) -> float | None:
    """The seconds a ``Retry-After`` header asks to wait (delta-seconds or an HTTP date);
    ``None`` when absent or unreadable."""
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def _is_limit_reached(response: httpx.Response) -> bool:
    if response.status_code != 429:
        return False
    try:
        detail = ErrorDetail.from_body(response.json())
    except ValueError:
        return False
    return detail is not None and detail.code == LIMIT_REACHED


class _RetryableError(Exception):
    """One attempt failed in a way another attempt may not (carries the failure)."""

    def __init__(self, failure: Exception) -> None:
        super().__init__(str(failure))
        self.failure = failure


def error_from(response: httpx.Response) -> ApiError:
    """The :class:`ApiError` an error answer stands for (its body's code and message, else
    the status line or the start of its text)."""
    code, message = "http_error", response.reason_phrase or ""
    try:
        detail = ErrorDetail.from_body(response.json())
    except ValueError:
        detail = None
    if detail is not None:
        code, message = detail.code, detail.message
    else:
        text = response.text.strip()
        if text:
            message = text[:500]
    return api_error(
        response.status_code, code, message, response.request.method, str(response.request.url)
    )


def raise_for_status(response: httpx.Response) -> httpx.Response:
    """``response``, unless it is an error answer: then its :class:`ApiError`."""
    if response.status_code >= 400:
        raise error_from(response)
    return response


def check_open(http: httpx.Client) -> None:
    if http.is_closed:
        raise HindsightError("this Client is closed; make a new one")


def _shutdown(response: httpx.Response) -> None:
    """Shuts the response's socket down, which wakes a thread blocked reading it (closing the
    socket alone does not)."""
    try:
        stream = response.extensions["network_stream"]
        sock = stream.get_extra_info("socket")
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
    except (KeyError, AttributeError, OSError):
        pass


def parse_sse(lines: Iterable[str]) -> Iterator[tuple[str, Any]]:
    """Server-sent events (``event:`` / ``data:`` fields, a blank line ends each) as
    ``(name, data)``, with ``data`` decoded as JSON where it is JSON. Comments (keep-alives)
    and other fields are skipped; an event without a name is a ``message``."""
    name = ""
    data: list[str] = []
    for raw in lines:
        line = raw.rstrip("\r\n")
        if not line:
            if data:
                text = "\n".join(data)
                try:
                    value: Any = json.loads(text)
                except ValueError:
                    value = text
                yield name or "message", value
            name, data = "", []
            continue
        if line.startswith(":"):
            continue
        key, _, value_text = line.partition(":")
        value_text = value_text.removeprefix(" ")
        if key == "event":
            name = value_text
        elif key == "data":
            data.append(value_text)


StreamItem = tuple[str, Any] | Exception | None


class EventStream:
    """The server-sent events of ``path``, read on a daemon thread into a queue: ``(name,
    data)`` per event, then ``None`` when the server closes the stream, or the exception
    that ended it (an :class:`ApiError` for an error answer). Owns ``http``."""

    def __init__(self, http: httpx.Client, path: str) -> None:
        self._http = http
        self._items: Queue[StreamItem] = Queue()
        self._response: httpx.Response | None = None
        self._closed = threading.Event()
        threading.Thread(
            target=self._read, args=(path,), name="hindsight-sweep-events", daemon=True
        ).start()

    def _read(self, path: str) -> None:
        try:
            with self._http.stream(
                "GET", path, headers={"Accept": "text/event-stream"}
            ) as response:
                self._response = response
                if self._closed.is_set():
                    return
                if response.status_code >= 400:
                    response.read()
                    self._items.put(error_from(response))
                    return
                for item in parse_sse(response.iter_lines()):
                    if self._closed.is_set():
                        return
                    self._items.put(item)
            self._items.put(None)
        except Exception as e:
            self._items.put(e)

    def get(self, timeout: float | None) -> StreamItem:
        """The next item; raises :class:`queue.Empty` after ``timeout`` seconds."""
        return self._items.get(timeout=timeout)

    def close(self) -> None:
        self._closed.set()
        response = self._response
        if response is not None:
            _shutdown(response)
        self._http.close()


class Transport:
    """Requests to one server with retries.

    Args:
        url: the server, without a trailing slash.
        headers: sent with every request (the bearer token).
        timeout: seconds a connection, read or write may stall before the attempt fails.
        retries: further attempts after a connection failure or a 408/429/502/503/504
            answer, waiting ``backoff``, then twice as long each time (at most 30 s).
        chunk_bytes: size of the pieces a download is read in.
    """

    def __init__(
        self,
        url: str,
        headers: dict[str, str],
        *,
        timeout: float,
        retries: int,
        backoff: float,
        chunk_bytes: int,
    ) -> None:
        self.url = url
        self.headers = headers
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.chunk = chunk_bytes
        #: The session of the caller's thread (the upload thread makes its own).
        self.http = self.new_http()

    def new_http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=self.timeout)

    def with_retries(self, what: str, attempt: Callable[[], T]) -> T:
        """Runs ``attempt`` until it returns, retrying on :class:`_RetryableError` with exponential
        backoff; raises the last failure (as :class:`TransportError` for broken connections)."""
        delay = self.backoff
        for n in range(self.retries + 1):
            try:
                return attempt()
            except _RetryableError as r:
                failure = r.failure
            if n == self.retries:
                break
            log.warning("%s failed (%s); retrying in %.1f s", what, failure, delay)
            time.sleep(delay)
            delay = min(2 * delay, 30.0)
        if isinstance(failure, ApiError):
            raise failure
        raise TransportError(f"{what}: {failure} (after {self.retries + 1} attempts)") from failure

    def send(
        self,
        method: str,
        path: str,
        *,
        http: httpx.Client | None = None,
        body: Callable[[], Iterator[bytes]] | None = None,
        idempotent: bool = True,
        **kwargs: Any,
    ) -> httpx.Response:
        """One request with retries, on ``http`` (default :attr:`http`); the response of any
        status but the retried ones. ``body`` makes a fresh body iterator for each attempt. A
        request that is not ``idempotent`` is retried only when it cannot have reached the
        server (no connection) or the server says it did not act on it (408, 429, 503)."""
        session = self.http if http is None else http
        check_open(session)
        statuses = RETRY_STATUSES if idempotent else UNSENT_STATUSES

        def attempt() -> httpx.Response:
            try:
                content = body() if body is not None else None
                response = session.request(method, path, content=content, **kwargs)
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                raise _RetryableError(e) from e
            except httpx.TransportError as e:
                if idempotent:
                    raise _RetryableError(e) from e
                raise TransportError(
                    f"{method} {path}: {e}; the server may have acted on it, so it is not "
                    "sent again"
                ) from e
            if response.status_code in statuses and not _is_limit_reached(response):
                raise _RetryableError(error_from(response))
            return response

        return self.with_retries(f"{method} {path}", attempt)

    def get_json(self, path: str, **kwargs: Any) -> Any:
        """The JSON of ``GET path``; an error answer raises its :class:`ApiError`."""
        return raise_for_status(self.send("GET", path, **kwargs)).json()

    def fetch(
        self, path: str, digest: str, restart: Callable[[], Callable[[bytes], object]]
    ) -> None:
        """Streams the GET of ``path`` into the sink ``restart()`` returns (called afresh for
        each attempt), hashing as it goes; raises :class:`DigestMismatch` unless the bytes
        hash to ``digest``."""
        check_open(self.http)

        def attempt() -> str:
            hasher = blake3.blake3()
            try:
                with self.http.stream("GET", path) as response:
                    if response.status_code in RETRY_STATUSES:
                        response.read()
                        raise _RetryableError(error_from(response))
                    if response.status_code >= 400:
                        response.read()
                        raise error_from(response)
                    write = restart()
                    for chunk in response.iter_bytes(self.chunk):
                        hasher.update(chunk)
                        write(chunk)
            except httpx.TransportError as e:
                raise _RetryableError(e) from e
            return hasher.hexdigest()

        actual = self.with_retries(f"GET {path}", attempt)
        if actual != digest:
            raise DigestMismatch(f"GET {path}", digest, actual)

    def events(self, path: str) -> EventStream:
        """The server-sent events of ``path``, on a session of their own (the server sends a
        keep-alive every 15 s, so a read may wait 45 s)."""
        http = httpx.Client(
            base_url=self.url,
            headers=self.headers,
            timeout=httpx.Timeout(self.timeout, read=max(self.timeout, 45.0)),
        )
        return EventStream(http, path)
