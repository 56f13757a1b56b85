"""Web app sessions and CSRF tokens (design: docs/webapp.md, "Sessions").

A session is a record in this process's memory, keyed by a random 256-bit id; the browser holds
only that id, in an HttpOnly cookie. The credential the person signed in with stays in the
record (never in a cookie, never on disk) and is authenticated again through
``OrgService.authenticate`` on every request, so a revoked or expired credential ends its
sessions at once.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

SESSION_COOKIE = "an_session"
LOGIN_CSRF_COOKIE = "an_login_csrf"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"

IDLE_SECONDS = 8 * 3600
ABSOLUTE_SECONDS = 7 * 24 * 3600
MAX_SESSIONS = 10_000


@dataclass
class WebSession:
    """One signed-in browser: ``id`` (the cookie value), ``secret`` (the credential, kept in
    memory only), ``csrf`` (the token every form and htmx request must echo), ``kind``
    (admin, org, user or agent), ``created``/``seen`` (monotonic seconds)."""

    id: str
    secret: str
    kind: str
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    created: float = field(default_factory=time.monotonic)
    seen: float = field(default_factory=time.monotonic)


class SessionStore:
    """Live sessions of this process, with an idle and an absolute lifetime.

    At most ``cap`` sessions are kept; creating one more drops the least recently used (every
    session needs a valid credential to create, so this bounds memory, not access). Safe to
    use from several threads.
    """

    def __init__(
        self,
        *,
        idle: float = IDLE_SECONDS,
        absolute: float = ABSOLUTE_SECONDS,
        cap: int = MAX_SESSIONS,
    ) -> None:
        self.idle = idle
        self.absolute = absolute
        self.cap = cap
        self._sessions: OrderedDict[str, WebSession] = OrderedDict()
        self._lock = threading.Lock()

    def create(self, secret: str, kind: str) -> WebSession:
        """A new session for the credential ``secret`` (already authenticated as ``kind``)."""
        session = WebSession(secrets.token_urlsafe(32), secret, kind)
        with self._lock:
            self._sessions[session.id] = session
            while len(self._sessions) > self.cap:
                self._sessions.popitem(last=False)
        return session

    def get(self, session_id: str | None) -> WebSession | None:
        """The live session with this id, or None (unknown, signed out, idle or too old)."""
        if not session_id:
            return None
        now = time.monotonic()
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                return None
            if now - session.seen > self.idle or now - session.created > self.absolute:
                del self._sessions[session_id]
                return None
            session.seen = now
            self._sessions.move_to_end(session_id)
            return session

    def drop(self, session_id: str | None) -> None:
        """End a session (sign-out, or its credential stopped authenticating)."""
        if session_id:
            with self._lock:
                self._sessions.pop(session_id, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)


def same_token(expected: str | None, given: str | None) -> bool:
    """Constant-time comparison of two CSRF tokens; False when either is missing."""
    if not expected or not given:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


def new_token() -> str:
    """A fresh random token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)
