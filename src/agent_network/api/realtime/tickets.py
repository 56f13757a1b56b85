"""Short-lived, single-use WebSocket tickets: how a browser authenticates the realtime protocol
without ever holding its credential (design: docs/webapp.md, "The live thread view").

The web app (signed-in session) asks for a ticket; the page sends it in the ``auth`` frame; the
engine exchanges it here for the credential it was issued for and then authenticates that
credential like any other (so a revoked or expired credential is refused). A ticket works once,
for ``TICKET_SECONDS``, and only while its issuer's ``still_valid`` check passes (the web app
binds it to the session: after sign-out it is refused).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from agent_network.errors import AuthenticationError

TICKET_PREFIX = "an_wst_"
TICKET_SECONDS = 30.0
MAX_TICKETS = 10_000


@dataclass(frozen=True)
class _Ticket:
    secret: str
    expires: float
    still_valid: Callable[[], bool]


def _always() -> bool:
    return True


class TicketBook:
    """The live tickets of one server process (memory only; safe from several threads).

    At most ``cap`` unredeemed tickets are kept (the oldest is dropped first)."""

    def __init__(self, *, ttl: float = TICKET_SECONDS, cap: int = MAX_TICKETS) -> None:
        self.ttl = ttl
        self.cap = cap
        self._tickets: OrderedDict[str, _Ticket] = OrderedDict()
        self._lock = threading.Lock()

    def issue(self, secret: str, still_valid: Callable[[], bool] = _always) -> str:
        """A new ticket (``an_wst_`` + 256 random bits) standing for the credential ``secret``
        for ``ttl`` seconds, redeemable once and only while ``still_valid()`` is true."""
        ticket = TICKET_PREFIX + secrets.token_urlsafe(32)
        with self._lock:
            self._tickets[ticket] = _Ticket(secret, time.monotonic() + self.ttl, still_valid)
            while len(self._tickets) > self.cap:
                self._tickets.popitem(last=False)
        return ticket

    def redeem(self, ticket: str) -> str:
        """The credential a ticket stands for; the ticket is used up.

        Raises AuthenticationError when the ticket is unknown, already used, expired, or its
        issuer no longer vouches for it (e.g. the web session signed out)."""
        with self._lock:
            found = self._tickets.pop(ticket, None)
        if found is None or found.expires < time.monotonic() or not found.still_valid():
            raise AuthenticationError(
                "this WebSocket ticket is unknown, used or expired; ask for a new one "
                "(POST /app/ws-ticket) right before connecting"
            )
        return found.secret

    def __len__(self) -> int:
        with self._lock:
            return len(self._tickets)
