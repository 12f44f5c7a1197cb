"""The upload spool: snapshots waiting for the server, as files on local disk.

A spool directory belongs to one server (:func:`default_spool_dir`) and may be shared by any
number of processes. Its layout::

    tmp/<id>/              an entry being written; its writer holds writing.lock locked
    entries/<id>/          entries waiting to be sent, oldest id first
        <EDM2 name>.safetensors   the snapshot file, exactly the bytes that are sent
        entry.json                run, nimg, sigma_rel, digest, bytes, check_finite, owner
    rejected/<id>/         entries the server refused, with error.json: kept for inspection
    owners/<token>.lock    one per live Client, locked (flock) for as long as it lives

An entry is written into ``tmp/<id>/``, its files and the directory fsynced, and committed by
one rename into ``entries/`` (then ``entries/`` is fsynced): a crash leaves the whole entry or
none of it. Ids start with the time in nanoseconds, so sorting them sends the oldest first.

A sender sends the entries its own Client spooled and those whose owner is gone (its lock
file is free: the process ended or closed its Client), so a new process resumes what an
earlier one left. A sender holds ``entry.json`` locked (flock) while it sends the entry, and
removes or rejects the entry before unlocking: two senders never send the same file, and a
sender that dies mid-send leaves the entry (and no lock) for the next.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import itertools
import json
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from .errors import HindsightError

try:
    import fcntl
except ImportError:  # Windows: no flock; one process per spool there
    fcntl = None  # type: ignore[assignment]

_FORMAT = 1
_ENTRY = "entry.json"
_ERROR = "error.json"
_WRITING = "writing.lock"
# A tmp/ directory without its lock file (the writer was between two steps) is left alone
# for this long before it is taken for debris.
_STALE_TMP_SECS = 600.0


def default_spool_dir(url: str) -> Path:
    """The spool of the server at ``url``: ``$HINDSIGHT_SPOOL_DIR`` if set, else
    ``<cache>/hindsight/spool/<host>_<port>-<hash>``, ``<cache>`` being ``$XDG_CACHE_HOME``
    or ``~/.cache``; ``<hash>`` is 12 hex digits of SHA-256 of the URL's scheme, host, port
    and path, so two servers never share a spool."""
    given = os.environ.get("HINDSIGHT_SPOOL_DIR")
    if given:
        return Path(given).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    parts = urlsplit(url)
    host = parts.hostname or "server"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    key = f"{parts.scheme}://{host}:{port}{parts.path.rstrip('/')}"
    tag = hashlib.sha256(key.encode()).hexdigest()[:12]
    safe_host = "".join(c if c.isalnum() or c in ".-" else "_" for c in host)
    return Path(cache).expanduser() / "hindsight" / "spool" / f"{safe_host}_{port}-{tag}"


@dataclass(frozen=True)
class SpoolEntry:
    """One spooled snapshot (the client's record, not a server schema).

    Attributes:
        id: the entry's name in the spool (sortable by the time it was spooled).
        run: the run it goes to.
        nimg: training time in images.
        sigma_rel: EMA width.
        digest: BLAKE3 of the file (hex).
        bytes: the file's size.
        check_finite: whether the server is asked to refuse NaN/Inf.
        file: the snapshot file's name in the entry directory (EDM2's naming).
        owner: the token of the Client that spooled it.
        path: the entry's directory (under ``entries/``, or ``rejected/`` once refused).
    """

    id: str
    run: str
    nimg: int
    sigma_rel: float
    digest: str
    bytes: int
    check_finite: bool
    file: str
    owner: str
    path: Path

    @property
    def data_path(self) -> Path:
        """The snapshot file."""
        return self.path / self.file

    def to_json(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "run": self.run,
            "nimg": self.nimg,
            "sigma_rel": self.sigma_rel,
            "digest": self.digest,
            "bytes": self.bytes,
            "check_finite": self.check_finite,
            "file": self.file,
            "owner": self.owner,
        }

    @classmethod
    def from_json(cls, entry_id: str, path: Path, d: dict[str, Any]) -> SpoolEntry:
        if d.get("format") != _FORMAT:
            raise ValueError(f"unknown spool entry format {d.get('format')!r}")
        return cls(
            id=entry_id,
            run=str(d["run"]),
            nimg=int(d["nimg"]),
            sigma_rel=float(d["sigma_rel"]),
            digest=str(d["digest"]),
            bytes=int(d["bytes"]),
            check_finite=bool(d["check_finite"]),
            file=str(d["file"]),
            owner=str(d["owner"]),
            path=path,
        )


def fsync_dir(path: Path) -> None:
    """Makes the names in directory ``path`` durable (POSIX; a no-op where directories
    cannot be opened, as on Windows)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _lock(fd: int) -> None:
    """Locks ``fd`` (flock, exclusive), waiting for it."""
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX)


def _try_lock(fd: int) -> bool:
    """Locks ``fd`` (flock, exclusive) unless another open file holds it; whether it did.
    Without flock (Windows) every lock succeeds: one process per spool there."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


class Claim:
    """A sender's hold on one entry (``entry.json`` locked); :meth:`Spool.remove` or
    :meth:`Spool.reject` end it, else :meth:`release` leaves the entry for later."""

    def __init__(self, entry: SpoolEntry, fd: int) -> None:
        self.entry = entry
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None


class Owner:
    """A live Client's mark in the spool: ``owners/<token>.lock``, locked until
    :meth:`release`. Entries whose owner is not locked are anyone's to send."""

    def __init__(self, path: Path) -> None:
        self.token = path.stem
        self.path = path
        # Locked before it appears under its name, so no sweeper ever sees it unlocked.
        tmp = path.with_name(f".{path.name}.new")
        self._fd: int | None = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        _lock(self._fd)
        os.rename(tmp, path)

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            os.close(self._fd)
            self._fd = None


class Spool:
    """The spool directory ``root`` (created if missing)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.entries_dir = self.root / "entries"
        self.tmp_dir = self.root / "tmp"
        self.rejected_dir = self.root / "rejected"
        self.owners_dir = self.root / "owners"
        try:
            for d in (self.entries_dir, self.tmp_dir, self.rejected_dir, self.owners_dir):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise HindsightError(
                f"cannot create the upload spool {self.root}: {e}; pass Client(spool_dir=...) "
                "or set HINDSIGHT_SPOOL_DIR to a writable directory"
            ) from e
        self._ids = itertools.count()
        self._ids_lock = threading.Lock()
        self._parsed: dict[str, SpoolEntry] = {}  # entry.json read once, by id
        self._parsed_lock = threading.Lock()

    # -- owners ------------------------------------------------------------------------------

    def register_owner(self) -> Owner:
        """A new owner token for a Client, locked for as long as it lives."""
        return Owner(self.owners_dir / f"{os.getpid()}-{secrets.token_hex(6)}.lock")

    def owner_alive(self, token: str) -> bool:
        """Whether the Client that spooled under ``token`` is still alive (holds its lock)."""
        path = self.owners_dir / f"{token}.lock"
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            # Nobody holds it: the owner is gone (the file is debris).
            return not _try_lock(fd)
        finally:
            os.close(fd)

    # -- writing -------------------------------------------------------------------------------

    def new_id(self) -> str:
        """A fresh entry id: the time in nanoseconds (20 digits), the pid, a counter, and a
        random tag, so ids sort by spooling time and never collide."""
        with self._ids_lock:
            n = next(self._ids)
        return f"{time.time_ns():020d}-{os.getpid()}-{n:06d}-{secrets.token_hex(2)}"

    def write(
        self,
        run: str,
        nimg: int,
        sigma_rel: float,
        file: str,
        write: Any,
        check_finite: bool,
        owner: str,
        entry_id: str | None = None,
        committed: Callable[[SpoolEntry], AbstractContextManager[object]] | None = None,
    ) -> SpoolEntry:
        """Writes one entry and commits it durably: ``write(f)`` writes the snapshot's bytes
        to the binary file ``f`` and returns their BLAKE3 digest. Returns the committed
        entry (id ``entry_id``, default :meth:`new_id`); an ``OSError`` (a full disk) leaves
        nothing behind. The committing rename runs inside ``committed(entry)`` (a context
        manager: the caller's accounting, atomic with the rename)."""
        if committed is None:
            committed = _no_context
        entry_id = entry_id or self.new_id()
        tmp = self.tmp_dir / entry_id
        tmp.mkdir()
        lock_fd = os.open(tmp / _WRITING, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            _lock(lock_fd)
            f: BinaryIO
            with open(tmp / file, "wb") as f:
                digest = str(write(f))
                f.flush()
                os.fsync(f.fileno())
                size = f.tell()
            entry = SpoolEntry(
                id=entry_id,
                run=run,
                nimg=int(nimg),
                sigma_rel=float(sigma_rel),
                digest=digest,
                bytes=size,
                check_finite=check_finite,
                file=file,
                owner=owner,
                path=self.entries_dir / entry_id,
            )
            _write_synced(tmp / _ENTRY, json.dumps(entry.to_json(), sort_keys=True).encode())
            os.unlink(tmp / _WRITING)
            fsync_dir(tmp)
            with committed(entry):
                os.rename(tmp, entry.path)
            fsync_dir(self.entries_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            os.close(lock_fd)
        with self._parsed_lock:
            self._parsed[entry_id] = entry
        return entry

    # -- reading -------------------------------------------------------------------------------

    def entries(self) -> list[SpoolEntry]:
        """The committed entries, oldest first (unreadable ones skipped: see :meth:`clean`)."""
        try:
            names = sorted(os.listdir(self.entries_dir))
        except FileNotFoundError:
            return []
        with self._parsed_lock:
            return self._entries(names)

    def _entries(self, names: list[str]) -> list[SpoolEntry]:
        found = []
        for name in names:
            entry = self._parsed.get(name)
            if entry is None:
                try:
                    raw = json.loads((self.entries_dir / name / _ENTRY).read_text())
                    entry = SpoolEntry.from_json(name, self.entries_dir / name, raw)
                except (OSError, ValueError, KeyError, TypeError):
                    continue
                self._parsed[name] = entry
            found.append(entry)
        live = set(names)
        for gone in [k for k in self._parsed if k not in live]:
            del self._parsed[gone]
        return found

    def used_bytes(self) -> int:
        """Bytes of the committed snapshot files (under ``entries/``): what the size bound
        counts besides the snapshots queued in memory. Files being written (``tmp/``) are
        counted by their writer as queued; the small ``entry.json`` files not at all."""
        total = 0
        for path in _files(self.entries_dir):
            if path.name.endswith(".safetensors"):
                with contextlib.suppress(OSError):
                    total += path.stat().st_size
        return total

    def rejected(self) -> list[Path]:
        """The directories of the refused entries, oldest first."""
        try:
            return sorted(p for p in self.rejected_dir.iterdir() if p.is_dir())
        except FileNotFoundError:
            return []

    # -- sending -------------------------------------------------------------------------------

    def claim(self, entry: SpoolEntry) -> Claim | None:
        """Locks ``entry`` for sending; ``None`` if another sender holds it or it is gone."""
        path = entry.path / _ENTRY
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            if not _try_lock(fd):
                os.close(fd)
                return None
            # Sent and removed, or rejected, between our open and our lock: not ours to send.
            now = os.stat(path)
            held = os.fstat(fd)
            if (now.st_ino, now.st_dev) != (held.st_ino, held.st_dev):
                os.close(fd)
                return None
        except FileNotFoundError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        return Claim(entry, fd)

    def remove(self, claim: Claim) -> None:
        """Deletes a sent entry (``entry.json`` first, so a crash midway leaves debris that
        :meth:`clean` removes, never an entry without its file), then ends the claim."""
        path = claim.entry.path
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path / _ENTRY)
            shutil.rmtree(path, ignore_errors=True)
        finally:
            claim.release()
        with self._parsed_lock:
            self._parsed.pop(claim.entry.id, None)

    def reject(self, claim: Claim, error: BaseException) -> SpoolEntry:
        """Moves a refused entry to ``rejected/`` with ``error.json`` (the error's type and
        message, and the HTTP status and code of a server's refusal); the moved entry."""
        entry = claim.entry
        target = self.rejected_dir / entry.id
        try:
            record = {
                "error": type(error).__name__,
                "message": str(error),
                "status": getattr(error, "status", None),
                "code": getattr(error, "code", None),
                "rejected_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            _write_synced(entry.path / _ERROR, json.dumps(record, sort_keys=True).encode())
            os.rename(entry.path, target)
            fsync_dir(self.entries_dir)
            fsync_dir(self.rejected_dir)
        finally:
            claim.release()
        with self._parsed_lock:
            self._parsed.pop(entry.id, None)
        return dataclasses.replace(entry, path=target)

    # -- debris ----------------------------------------------------------------------------------

    def clean(self) -> None:
        """Removes what crashed processes left: unfinished writes in ``tmp/`` (their writer's
        lock is free), half-removed entries (no ``entry.json``) and dead owners' lock files."""
        for d in _subdirs(self.tmp_dir):
            lock = d / _WRITING
            try:
                fd = os.open(lock, os.O_RDONLY)
            except FileNotFoundError:
                with contextlib.suppress(OSError):
                    if time.time() - d.stat().st_mtime > _STALE_TMP_SECS:
                        shutil.rmtree(d, ignore_errors=True)
                continue
            try:
                if _try_lock(fd):
                    shutil.rmtree(d, ignore_errors=True)
            finally:
                os.close(fd)
        for d in _subdirs(self.entries_dir):
            if not (d / _ENTRY).exists():
                shutil.rmtree(d, ignore_errors=True)
        for lock in self.owners_dir.glob("*.lock"):
            try:
                fd = os.open(lock, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                if _try_lock(fd):
                    with contextlib.suppress(OSError):
                        lock.unlink()
            finally:
                os.close(fd)


@contextlib.contextmanager
def _no_context(_entry: SpoolEntry) -> Iterator[None]:
    yield


def _subdirs(path: Path) -> list[Path]:
    try:
        return [p for p in path.iterdir() if p.is_dir()]
    except FileNotFoundError:
        return []


def _files(top: Path) -> Iterator[Path]:
    for d in _subdirs(top):
        try:
            yield from (p for p in d.iterdir() if p.is_file())
        except FileNotFoundError:
            continue
