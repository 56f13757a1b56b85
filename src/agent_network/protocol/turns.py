"""Who an envelope makes take a turn: the trigger rule both runners and the claims service use.

Pure (no I/O): the runners (``runtime/thread_view.py`` re-exports it) and ``services/claims.py``
(which checks a remote runner's claim) apply the same rule.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from agent_network.model.envelope import Envelope, Sender
from agent_network.protocol.events import EV_MESSAGE
from agent_network.protocol.lifecycle import may_speak
from agent_network.protocol.state import ThreadState

__all__ = ["turn_takers", "visible_to"]


def visible_to(agent_id: str, env: Envelope) -> bool:
    """True when the agent ``agent_id`` may see ``env`` (audience None = everyone; otherwise the
    sender or a listed id): the audience rule for one agent or user id, which
    :func:`agent_network.services.scope.audience_admits` applies to an actor."""
    audience = env.audience
    return audience is None or agent_id == env.sender_id or agent_id in audience


def turn_takers(state_after: ThreadState, env: Envelope, agents: Iterable[str]) -> set[str]:
    """Which of ``agents`` (ids of agents with a participate routine) ``env`` triggers, given
    ``state_after``, the thread's state folded up to and including ``env``.

    - A thread without a participant list (a plain ``open`` thread): every agent but the sender,
      on a ``message`` only.
    - A protocol thread whose adapter names an expected speaker: that agent, after ANY envelope
      (the ``thread.created``/``thread.ack`` that made the thread active, a ``context.set``, a
      Handoff naming it, the previous speaker's message) — also when it sent ``env`` itself
      (a workflow ``stay``) — provided :func:`may_speak` admits it (the runaway budget aside:
      the runner's preflight refuses and audits that before any model call).
    - A protocol thread where anyone may speak (``conversation``, ``open`` with participants):
      every participant agent but the sender, on a ``message``, when :func:`may_speak` admits
      it (budget aside, as above).

    In every case an envelope whose ``audience`` excludes the agent never triggers it.
    """
    wanted = set(agents)
    if not state_after.participants:
        if env.type != EV_MESSAGE:
            return set()
        return {a for a in wanted if a != env.sender_id and visible_to(a, env)}
    ids = {pid for kind, pid in state_after.participants if kind == "agent"}
    expected = state_after.expected_speaker
    if expected is not None:
        candidates = {expected} & ids & wanted
    elif env.type == EV_MESSAGE:
        candidates = (ids & wanted) - {env.sender_id}
    else:
        return set()
    # the runaway budget is left to the runner's preflight, which audits the refusal
    unbudgeted = replace(state_after, consecutive_agent=0)
    return {
        a
        for a in candidates
        if visible_to(a, env) and may_speak(unbudgeted, Sender("agent", a, ""))
    }
