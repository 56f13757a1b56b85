"""Runner ids that survive a restart, so a restarted runner takes back its own claims at once.

A claim (``runner_claims``, :mod:`agent_network.store.claims`) names the ``runner_id`` holding
it; the holder renews its own claim (:func:`~agent_network.store.claims.try_claim` grants a
claim to the runner id already holding it). A runner killed while answering leaves its claims
behind until their lease runs out. If the restarted process comes back under the **same** runner
id, its first claim of each such trigger is a renewal: it takes its claims back at once instead
of waiting for the lease.

The id must therefore be stable across restarts — and never shared by two live processes, or
both would think they hold the same claims. :func:`take_runner_id` gives both:

- **Default id** ``<kind>:<host>:<fingerprint>:<slot>``: ``kind`` is ``inproc`` (the server's
  runner) or ``remote`` (``agent-network runner``); ``fingerprint`` is 8 hex digits of SHA-256
  over the OS user and the ``scope`` — what the runner works against: the database for the
  in-process runner, the server URL and credential for a remote one (the credential itself is
  never stored, only mixed into the hash); ``slot`` is the smallest number whose lock file this
  process could lock. The lock is an exclusive ``flock`` on a file in a per-user directory
  (``$XDG_RUNTIME_DIR`` or the temporary directory, ``agent-network-<uid>/``), held while the
  runner runs. The kernel drops it when the process dies, by ``kill -9`` too. So a restarted
  runner gets the slot, hence the id, of its dead predecessor, and a second runner started next
  to a live one gets the next slot and leaves the live one's claims alone.
- **An explicit id** (``--runner-id``, ``runner_id=``) is used as given and locked the same
  way: a second live process with the same id on this host is refused with
  :class:`RunnerIdInUseError`. Ids are only compared on one host; two hosts must not be given
  the same explicit id (their claims would mix: at worst a duplicate model call, never a second
  reply, as the reply key keeps one reply per trigger).
- Where locks are impossible (no ``fcntl``, an unwritable directory) the id falls back to one
  unique to the process (:func:`~agent_network.runtime.runner.new_runner_id`): claims of a dead
  process then free only when their (short) lease runs out.

Claims of a runner that died on another host are not taken back: they free when their lease
runs out, which is why leases are short and renewed while a job runs (``claim_lease``, 10 s by
default, renewed every third of it).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import socket
import tempfile
from pathlib import Path

import structlog

from agent_network.errors import ConflictError, InvalidRequestError
from agent_network.services.claims import MAX_RUNNER_ID

log = structlog.get_logger(__name__)

MAX_SLOTS = 64  # default ids tried per (user, kind, scope) before falling back to a unique id

__all__ = ["RunnerIdInUseError", "RunnerSeat", "lock_dir", "take_runner_id"]


class RunnerIdInUseError(ConflictError):
    """Another live process on this host runs under the same runner id; give another one."""

    code = "runner_id_in_use"


class RunnerSeat:
    """A runner id held by this process (``runner_id``) and the lock keeping it ours
    (``locked``: False for a fallback id held without a lock). :meth:`release` frees it."""

    def __init__(self, runner_id: str, fd: int | None) -> None:
        self.runner_id = runner_id
        self._fd = fd

    @property
    def locked(self) -> bool:
        """True while this process holds the id's lock."""
        return self._fd is not None

    def release(self) -> None:
        """Give the id up (unlock and close its lock file); idempotent."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)  # closing the only descriptor drops the flock


def _user() -> str:
    getuid = getattr(os, "getuid", None)
    return str(getuid()) if getuid is not None else os.environ.get("USERNAME", "user")


def lock_dir() -> Path:
    """The directory of this OS user's runner lock files (created on first use, mode 0700)."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / f"agent-network-{_user()}"


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _lock(path: Path) -> int | None:
    """An exclusive, non-blocking flock on ``path`` (created if needed): the descriptor holding
    it, or None when another open file holds it. Raises OSError when locking is impossible."""
    import fcntl  # not on Windows: the caller falls back to a unique id

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # not inherited by child processes
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def take_runner_id(
    kind: str, scope: str, *, runner_id: str | None = None, directory: Path | None = None
) -> RunnerSeat:
    """Take a runner id for a runner of ``kind`` (``inproc`` or ``remote``) working against
    ``scope`` (the database URL, or the server URL and credential): ``runner_id`` when given,
    else the stable default id (see the module docstring). ``directory`` overrides
    :func:`lock_dir` (tests).

    Returns the :class:`RunnerSeat`; release it when the runner stops. Raises
    InvalidRequestError for an explicit id that is empty, longer than 100 characters or not
    printable, and :class:`RunnerIdInUseError` when another live process on this host holds
    that explicit id.
    """
    if runner_id is not None and (
        not 0 < len(runner_id) <= MAX_RUNNER_ID or not runner_id.isprintable()
    ):
        raise InvalidRequestError(f"runner_id must be 1-{MAX_RUNNER_ID} printable characters")
    user = _user()
    where = directory or lock_dir()
    try:
        where.mkdir(mode=0o700, parents=True, exist_ok=True)
        if runner_id is not None:
            fd = _lock(where / f"{_digest(user, scope, 'id', runner_id)[:24]}.lock")
            if fd is None:
                raise RunnerIdInUseError(
                    f"runner id {runner_id!r} is in use by another runner process on this host "
                    "for the same server; stop it first or give another --runner-id",
                    details={"runner_id": runner_id},
                )
            return RunnerSeat(runner_id, fd)
        fingerprint = _digest(user, scope)[:8]
        host = socket.gethostname()[:40]
        stem = _digest(user, scope, kind)[:24]
        for slot in range(MAX_SLOTS):
            fd = _lock(where / f"{stem}-{slot}.lock")
            if fd is not None:
                return RunnerSeat(f"{kind}:{host}:{fingerprint}:{slot}", fd)
        log.warning("runner.no_free_slot", kind=kind, slots=MAX_SLOTS)
    except (OSError, ImportError) as exc:
        log.warning("runner.id_unlocked", kind=kind, error=repr(exc))
        if runner_id is not None:
            return RunnerSeat(runner_id, None)
    host = socket.gethostname()[:40]
    return RunnerSeat(f"{kind}:{host}:{os.getpid()}:{secrets.token_hex(4)}", None)
