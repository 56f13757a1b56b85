"""The realtime protocol: WebSocket protocol v1 (``docs/protocol.md``), independent of the socket.

The route (``api/routes/realtime.py``) only accepts the socket and moves text frames; this
package is the protocol engine: authentication, join (replay then live), leave, post, ack,
typing, heartbeats, access re-checks, slow consumers and shutdown. What it decides about access,
posts and cursors it asks the services (``ThreadService.post``, ``services/scope.py``,
``services/live_access.py``, ``store/cursors.py``). Modules: ``frames`` (wire frames, limits,
close codes, the :class:`Transport` a socket adapts to), ``outbox`` (a connection's bounded
queue), ``connection`` (:class:`Connection` and its :class:`Follow` of a thread), ``engine``
(:class:`RealtimeProtocol`: connections, hub fan-out, heartbeats). Where this sits among the
layers: docs/architecture.md.

How one envelope reaches the sockets
------------------------------------
The engine owns ONE hub :class:`~agent_network.hub.Subscription` whose thread set is the union
of the threads some connection follows (the hub indexes subscriptions by thread, so the hub's
cost per batch does not grow with the number of connections or of unrelated threads). One
fan-out task (:meth:`RealtimeProtocol.run`) takes every committed batch, renders each envelope
once (the REST shape, sender names from a small TTL cache, so no query per envelope), serialises
the ``envelope`` frame once, and hands the same text to every following connection whose
audience check passes (a connection whose audience check fails gets the envelope's stub
instead, :func:`~agent_network.services.threads.render_stub`, also serialised once), by a
non-blocking put into the connection's bounded outbox. One writer task per connection drains
its outbox to the socket; the fan-out never awaits a socket.

Replay then live, without gap or duplicate
------------------------------------------
A join registers its :class:`Follow` (and the thread in the hub subscription) *before* reading
the store. While the follow is catching up, live frames for it are kept aside (``pending``); the
connection's control task reads the WAL in pages from ``after`` (waiting for room in the outbox:
a replay never overflows it), and when a read comes back short it appends the kept frames with a
higher seq and switches the follow to live, in one step with no await in between. Live frames
with ``seq <=`` the last one handled are dropped; a gap (which cannot happen unless the feed was
lost) sends the follow back to catching up from the store. If the hub drops the service's
subscription for lagging, it subscribes again and sends every follow back to catching up.

Access while connected
----------------------
``ServiceContext.access_epoch`` is bumped by every service method that removes access. Before a
connection is handed the next frame of a thread, the fan-out compares its ``checked_epoch``:
when it is stale, the frame is kept aside and the connection's control task re-checks the
credential (revoked or its subject deleted: ``disconnect`` ``revoked``, close 4401) and every
followed thread (``visible_thread``; lost ones get an ``error`` ``not_found`` and are dropped)
before anything else is sent. A credential with an expiry is re-read once that time has passed
— at the next heartbeat, before the next client frame is handled, and at any access re-check —
and the connection ends with ``disconnect`` ``expired`` (close 4401) unless the credential was
renewed meanwhile. (Not per delivered frame: that is the hot path; delivery may thus go on for
up to one heartbeat interval past the expiry.)

Slow consumers
--------------
A put into a full outbox marks the connection lagged: its follows leave the fan-out at once,
its tasks are cancelled, and it is sent (best effort, for at most ``lag_close_timeout`` seconds)
``disconnect`` ``lagged`` with ``resume`` = the last seq written to the socket per thread, then
closed with 4008. Nobody else waits for it.
"""

from __future__ import annotations

from agent_network.api.realtime.connection import Connection, Follow
from agent_network.api.realtime.engine import RealtimeProtocol
from agent_network.api.realtime.frames import PROTOCOL_VERSION, Transport, TransportClosed
from agent_network.api.realtime.outbox import Outbox

__all__ = [
    "PROTOCOL_VERSION",
    "Connection",
    "Follow",
    "Outbox",
    "RealtimeProtocol",
    "Transport",
    "TransportClosed",
]
