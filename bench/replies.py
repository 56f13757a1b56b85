"""Replies worth reading: what the participate routine posts on the bundled local model, measured.

Run:  .venv/bin/python bench/replies.py                    # 10 seeds x (demo + quickstart)
      .venv/bin/python bench/replies.py --seeds 3 --scenarios demo --json

**How replies are produced.** The real code path: for each seed a server process
(``python -m agent_network serve`` on 127.0.0.1 and a free port, a fresh SQLite file in a temp
dir, ``AGENT_NETWORK_MODEL`` unset so agents run on ``local:smollm2``, and
``AGENT_NETWORK_MODEL_SEED=<seed>``, which the runner mixes into the local model's sampling
seeds) is driven through the REST API only, and the in-process runner's participate routines
answer. Seeds are 1..N (``--first-seed`` moves them). The envelope ids of a run are random, and
the seed of a reply derives from its trigger, so two runs with the same seed are different
samples too; the seed labels a run, it does not make it repeatable. Two scenarios per seed:

- ``demo``: the content of ``agent-network demo`` (``src/agent_network/demo.py`` and
  ``examples/demo/``): Acme (Alex Rivera, Customer Ops Agent with Acme's knowledge documents)
  and Globex (Sam Chen, Delivery Agent with Globex's documents) in network ``acme-rollout``;
  Alex posts the kickoff in ``rollout-status`` and both agents answer, then each other, until
  the thread's runaway budget (4 consecutive agent messages) is spent. The demo's private
  threads are set up as well (they never reach a prompt of ``rollout-status``).
- ``quickstart``: ``examples/quickstart.py``'s ``main`` itself (Research Agent and Writer Agent,
  no knowledge, Alex Rivera's kickoff in "Market Analysis Project") against an org of the same
  server, followed until the budget is spent.

A scenario ends when every (agent, trigger) job has an outcome: the agent's message whose
``causation_id`` is the trigger, or an audit record of the agent naming the trigger (an empty
reply, a spent budget, ...); at most ``--timeout`` seconds.

**What counts as a reply.** Every message an agent posted, plus every job that ended in the
runner's ``routine.skipped`` audit with an empty reply after cleaning (an *empty* reply; a job
refused before the model call, e.g. by the budget, is not a reply). Each reply is judged on its
posted content with the detectors below, which are this script's own (nothing of
``agent_network.runtime.cleaning`` is used to judge its output); a reply may have several flags.

- **speaks as someone else**: the reply claims to be another participant of the thread or its
  org — ``I'm / I am / this is / my name is / it's <name>``, ``<name> here``, a sign-off
  (``Best regards, <name>``, a last line holding only ``<name>``, ``- <name>`` at the end), or
  ``I'm from / with / at / working for <org>``, ``I'm a(n) / the <up to 3 words> from / at /
  working for <org>``, ``I work for <org>``, ``we at / here at / on behalf of <org>``, ``I'm
  <org>'s ...`` — or writes a turn labelled with another participant's name or org or a chat
  role (``<name>:``, ``[<name> @ <org>]:``, ``<name> (<org>):``, ``<name> of <org>:``,
  ``<org>:``, ``User:``) at the start of the reply, of a line or of a sentence. ``<name>`` is
  another participant's display name, that name without a parenthetical (``Alex Rivera
  (project lead)`` -> ``Alex Rivera``) and, for people, the first name; ``<org>`` is an org of
  the thread other than the speaker's own. Case-insensitive, whole words.
- **placeholder**: a template fill-in: ``[...]`` of 1-40 characters that is not a markdown link
  ``[..](..)``, a number (a citation ``[1]``) or a checkbox (``[x]``, ``[ ]``); ``{name}``;
  ``<name>``; ``XXX``; ``___``.
- **repeats a sentence**: two sentences of the reply are the same after normalising (case
  folded, every run of non-alphanumeric characters one space). Sentences end at ``. ! ? …``
  followed by a space, or at a line break.
- **empty**: the job's model reply came out empty after cleaning (see above).
- **fitting fact** (the ``demo`` agents, which have knowledge documents): the reply shares a
  *distinctive span* with a sentence S of its own org's knowledge documents
  (``examples/demo/<org>/knowledge/*.md``, markdown stripped, a table row counts as a sentence),
  and S shares a content word with the message being answered (the reply's trigger). A
  distinctive span is a number/date/identifier token (at least 2 characters with a digit, such
  as ``12``, ``5xx``, ``QA-311``, ``#1182``, ``06:00``, ``$48,300``, ``3.8.2`` — ``#``, ``$`` and
  thousands commas ignored — or a dotted/underscored name such as
  ``billing.webhooks.auto_post``), or 3 consecutive content words (lower-cased words minus a
  stop-word list; numbers count as words; only stop words may stand between them in the text).
  Spans the agent could have copied from elsewhere do not count: those in the trigger, in an
  earlier message of the thread by someone else, in the agent's identity or in the thread's
  title. Content words are words of 3 or more characters not in the stop-word list, a trailing
  ``s`` dropped. The percentage is over all replies of the ``demo`` agents, empty ones
  included. The ``quickstart`` agents have no knowledge documents: their replies are shown as
  ``n/a`` and are left out of the percentage (and the total's percentage is the demo's).
- **echo** (shown for information, not one of the defects above): a sentence of at least 4
  words that repeats, normalised, a sentence of an earlier message of the thread.

Printed: per scenario and in total, the replies and the count of each flag, the fitting-fact
count and percentage, then a few example replies with their flags (``--examples``). ``--json``
prints everything (every reply with its flags) as JSON instead; ``--save FILE`` writes that JSON
to a file as well. Never asserts.

On two cores a seed takes about a minute (both scenarios), dominated by generation.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from _server import bootstrap, free_port, ok
from agent_network.demo import KICKOFF, find_examples, setup_companies

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SCENARIOS = ("demo", "quickstart")
QUICKSTART_ORG = "Quickstart"
QUICKSTART_THREAD = "Market Analysis Project"

# ----------------------------------------------------------------------------- detectors

_STOP_WORDS_TEXT = """
    a about above after again against all also am an and any are aren't as at be because been
    before being below between both but by can can't cannot could couldn't did didn't do does
    doesn't doing don't down during each few for from further had hadn't has hasn't have haven't
    having he her here hers herself him himself his how i i'd i'll i'm i've if in into is isn't it
    it's its itself just let's me more most much must my myself no nor not now of off on once
    only or other our ours ourselves out over own same she should shouldn't so some such than
    that that's the their theirs them themselves then there there's these they they're this
    those through to too under until up upon us very was wasn't we we'll we're we've were weren't
    what what's when where which while who whom why will with won't would wouldn't yes yet you
    you'd you'll you're you've your yours yourself yourselves hi hello dear thanks thank please
    ok okay sure also still let"""
STOP_WORDS = frozenset(_STOP_WORDS_TEXT.split())
_WORD = re.compile(r"[a-z0-9]+(?:['\u2019][a-z]+)?")
_TOKEN = re.compile(r"[#$]?[A-Za-z0-9]+(?:[.,:/_-][A-Za-z0-9]+)*%?")
_SENTENCE_END = re.compile(r"(?<=[.!?…])\s+|\n+")
_NON_ALNUM = re.compile(r"[^0-9a-z]+")
_PLACEHOLDER = re.compile(
    r"\[(?P<square>[^\[\]\n]{1,40})\](?!\()"
    r"|\{(?P<curly>[A-Za-z_][\w .'-]{0,40})\}"
    r"|<(?P<angle>[A-Za-z_][\w .'-]{0,40})>"
    r"|\bX{3,}\b|_{3,}"
)
_ROLE_WORDS = ("user", "assistant", "human", "system")


def normalise(text: str) -> str:
    """Case-folded, every run of non-alphanumeric characters one space, stripped."""
    return _NON_ALNUM.sub(" ", text.casefold().replace("\u2019", "'").replace("'", "")).strip()


def sentences(text: str) -> list[str]:
    """The sentences of ``text``: split after ``. ! ? …`` plus space, and at line breaks."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def name_variants(name: str, *, person: bool) -> list[str]:
    """``name``, ``name`` without a parenthetical, and (for people) the first name."""
    base = re.sub(r"\s*\([^()]*\)\s*", " ", name).strip()
    out = [name.strip(), base]
    if person and " " in base:
        out.append(base.split()[0])
    return sorted({v for v in out if v}, key=len, reverse=True)


def _alternation(words: Iterable[str]) -> str:
    return "|".join(
        r"\s+".join(re.escape(w) for w in word.split())
        for word in sorted(set(words), key=len, reverse=True)
    )


def speaks_as_other(
    reply: str, *, other_names: Sequence[str], other_orgs: Sequence[str]
) -> list[str]:
    """The places where ``reply`` claims to be another participant or org (see the module
    docstring); ``other_names`` are name variants (:func:`name_variants`), ``other_orgs`` org
    names other than the speaker's. Returns the matched texts ([] when none)."""
    found: list[str] = []
    names = _alternation(other_names) if other_names else None
    orgs = _alternation(other_orgs) if other_orgs else None
    flags = re.IGNORECASE | re.MULTILINE
    start = r"(?:^|(?<=[.!?…])[ \t]+)[ \t\"'*_>-]*"
    patterns: list[str] = []
    if names:
        n = rf"(?:{names})"
        patterns += [
            rf"\b(?:i\s*am|i['\u2019]?m|this\s+is|my\s+name\s+is|it['\u2019]s)\s+(?:the\s+)?{n}\b",
            rf"\b{n}\s+here\b",
            rf"\b(?:best|kind|warm)?\s*(?:regards|wishes|sincerely|cheers)\s*[,.!-]?\s*{n}\b\W*\Z",
            rf"\b(?:thanks|thank\s+you)\s*[,.!]?[ \t]*\n\s*{n}\b\W*\Z",
            rf"\n[ \t*_-]*{n}[ \t*_.]*\Z",
            rf"[-\u2013\u2014][ \t]*{n}[ \t]*\Z",
            rf"{start}\[?[*_]*{n}[*_]*(?:[ \t]*@[ \t]*[^\]\[:\n]{{1,60}})?"
            rf"(?:[ \t]+of[ \t]+[^\]\[:\n.!?]{{1,60}})?\]?"
            rf"(?:[ \t]*\([^()\n]{{1,60}}\))?[*_]*[ \t]*:",
        ]
    if orgs:
        o = rf"(?:{orgs})"
        we = r"\b(?:i\s*am|i['\u2019]?m|we\s+are|we['\u2019]re)\s+"
        patterns += [
            we + rf"(?:from|with|at|working\s+for|speaking\s+for|on\s+behalf\s+of)\s+{o}\b",
            we + r"(?:an?|the)\s+(?:[\w-]+\s+){0,3}?"
            rf"(?:from|at|working\s+for|speaking\s+for|on\s+behalf\s+of)\s+{o}\b",
            rf"\b(?:i|we)\s+work\s+(?:for|at)\s+{o}\b",
            we + rf"{o}(?:['\u2019]s)?\b",
            rf"\b(?:we|us|here)\s+at\s+{o}\b",
            rf"\bon\s+behalf\s+of\s+{o}\b",
            rf"{start}\[?[*_]*{o}[*_]*\]?[ \t]*:",
        ]
    roles = "|".join(_ROLE_WORDS)
    patterns.append(rf"{start}[*_]*(?:{roles})[*_]*(?:[ \t]*\([^()\n]{{1,60}}\))?[ \t]*:")
    for pattern in patterns:
        found += [m.group(0).strip() for m in re.finditer(pattern, reply, flags)]
    return found


def placeholders(reply: str) -> list[str]:
    """The template fill-ins in ``reply`` (see the module docstring)."""
    found = []
    for m in _PLACEHOLDER.finditer(reply):
        square = m.group("square")
        if square is not None and (
            square.strip() in ("", "x", "X") or re.fullmatch(r"[\d ,\-]+", square)
        ):
            continue
        found.append(m.group(0))
    return found


def repeated_sentences(reply: str) -> list[str]:
    """The sentences of ``reply`` that repeat an earlier one of it (normalised)."""
    seen: set[str] = set()
    repeats = []
    for sentence in sentences(reply):
        key = normalise(sentence)
        if not key:
            continue
        if key in seen:
            repeats.append(sentence)
        seen.add(key)
    return repeats


def echoes(reply: str, earlier: Sequence[str]) -> list[str]:
    """The sentences of ``reply`` (4+ words) that repeat a sentence of an ``earlier`` message."""
    before = {normalise(s) for text in earlier for s in sentences(text)}
    return [
        s for s in sentences(reply) if len(normalise(s).split()) >= 4 and normalise(s) in before
    ]


def _words(text: str) -> list[str]:
    return _WORD.findall(text.casefold().replace("\u2019", "'"))


def content_words(text: str) -> set[str]:
    """Words of 3+ characters not in :data:`STOP_WORDS`, a trailing ``s`` dropped."""
    out = set()
    for w in _words(text):
        if len(w) >= 3 and w not in STOP_WORDS:
            out.add(w[:-1] if w.endswith("s") and len(w) > 3 else w)
    return out


def distinctive_spans(text: str) -> set[str]:
    """Number/date/identifier tokens and trigrams of consecutive content words of ``text``."""
    spans: set[str] = set()
    for m in _TOKEN.finditer(text):
        token = re.sub(r"(?<=\d),(?=\d)", "", m.group(0).strip("#$%").casefold())
        if (len(token) >= 2 and any(c.isdigit() for c in token)) or re.search(
            r"[a-z][._][a-z]", token
        ):
            spans.add(token)
    words = [w for w in _words(text) if w not in STOP_WORDS]
    spans.update(" ".join(words[i : i + 3]) for i in range(len(words) - 2))
    return spans


def knowledge_sentences(folder: Path) -> list[str]:
    """The sentences of the markdown documents in ``folder``: markup stripped, paragraphs
    joined, each table row one sentence (its cells joined by ``;``)."""
    out: list[str] = []
    for path in sorted(folder.glob("*.md")):
        paragraph: list[str] = []

        def flush(paragraph: list[str] = paragraph) -> None:
            if paragraph:
                out.extend(sentences(" ".join(paragraph)))
                paragraph.clear()

        for raw in path.read_text(encoding="utf-8").splitlines():
            line = raw.strip()
            if line.startswith("|"):
                flush()
                cells = [c.strip(" *`") for c in line.strip("|").split("|")]
                if not all(set(c) <= set("-: ") for c in cells):
                    out.append("; ".join(c for c in cells if c))
            elif not line or line.startswith(("#", "-", "1.", "2.", "3.", "4.", "5.", "6.")):
                flush()
                text = line.lstrip("#-0123456789. ")
                if text:
                    paragraph.append(text.replace("**", "").replace("`", ""))
            else:
                paragraph.append(line.replace("**", "").replace("`", ""))
        flush()
    return [s for s in out if s.strip()]


def fitting_fact(
    reply: str, *, knowledge: Sequence[str], message: str, borrowed: Sequence[str]
) -> str | None:
    """The knowledge sentence whose fact ``reply`` states and that fits ``message`` (see the
    module docstring), or None. ``borrowed`` are texts whose spans do not count."""
    if not reply:
        return None
    excluded: set[str] = set()
    for text in (message, *borrowed):
        excluded |= distinctive_spans(text)
    spans = distinctive_spans(reply) - excluded
    if not spans:
        return None
    topic = content_words(message)
    for sentence in knowledge:
        if spans & distinctive_spans(sentence) and topic & content_words(sentence):
            return sentence
    return None


# ----------------------------------------------------------------------------- running


@dataclass
class Judged:
    """One reply with its context and flags."""

    scenario: str
    seed: int
    agent: str
    org: str
    trigger: str
    content: str
    speaks_as_other: list[str] = field(default_factory=list)
    placeholder: list[str] = field(default_factory=list)
    repeat: list[str] = field(default_factory=list)
    empty: bool = False
    fact: str | None = None
    fact_applies: bool = True
    echo: list[str] = field(default_factory=list)

    def flags(self) -> list[str]:
        """Short names of the flags this reply has."""
        out = []
        if self.speaks_as_other:
            out.append("as-other")
        if self.placeholder:
            out.append("placeholder")
        if self.repeat:
            out.append("repeat")
        if self.empty:
            out.append("empty")
        if self.echo:
            out.append("echo")
        if self.fact_applies:
            out.append("fact" if self.fact else "no-fact")
        return out


class LocalServer:
    """``python -m agent_network serve`` on a fresh SQLite file in ``work``, with the local
    model and ``AGENT_NETWORK_MODEL_SEED=seed``, for the duration of a ``with`` block."""

    def __init__(self, work: Path, seed: int, timeout: float = 300) -> None:
        self.work, self.seed, self.timeout = work, seed, timeout
        self.db = work / "an.db"
        self.log_path = work / "server.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_key = ""
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> LocalServer:
        self.admin_key = asyncio.run(bootstrap(self.db))
        env = {k: v for k, v in os.environ.items() if k != "AGENT_NETWORK_MODEL"}
        env["AGENT_NETWORK_MODEL_SEED"] = str(self.seed)
        cmd = [sys.executable, "-m", "agent_network", "serve", "--db", str(self.db)]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port)]
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self.__exit__(None, None, None)
                raise RuntimeError(f"the server exited; see {self.log_path}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/api/v1/health", timeout=2).status_code == 200:
                    return self
            time.sleep(0.2)
        self.__exit__(None, None, None)
        raise RuntimeError(f"the server did not answer within {self.timeout:g} s")

    def __exit__(self, *exc: object) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Party:
    """A participant of the measured thread: display name, org name, kind, and for agents
    the knowledge sentences and identity."""

    id: str
    name: str
    org: str
    kind: str
    identity: str = ""
    knowledge: list[str] | None = None


def _messages(http: httpx.Client, thread_id: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    after = 0
    while True:
        page = ok(http.get(f"/threads/{thread_id}/messages", params={"after": after}))
        out += page["items"]
        if not page["items"]:
            return out
        after = page["next_after"]


def _audit(http: httpx.Client, thread_id: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    after = 0
    while True:
        page = ok(http.get("/audit", params={"resource_id": thread_id, "after_id": after}))
        out += page
        if len(page) < 100:
            return out
        after = page[-1]["id"]


def _settle(
    clients: Sequence[httpx.Client], thread_id: str, agent_ids: set[str], timeout: float
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Wait until every (agent, trigger) job of the thread has an outcome (see the module
    docstring) or ``timeout`` passes; returns the thread's messages and the audit records."""
    deadline = time.monotonic() + timeout
    while True:
        msgs = _messages(clients[0], thread_id)
        audit = [r for c in clients for r in _audit(c, thread_id)]
        done = {(m["sender"]["id"], m["causation_id"]) for m in msgs}
        done |= {(r["principal_id"], (r.get("data") or {}).get("trigger_id")) for r in audit}
        wanted = {(a, m["id"]) for m in msgs for a in agent_ids if a != m["sender"]["id"]}
        if wanted <= done or time.monotonic() > deadline:
            return msgs, audit
        time.sleep(1.0)


def _judge(
    scenario: str,
    seed: int,
    title: str,
    parties: dict[str, Party],
    msgs: list[dict[str, Any]],
    audit: list[dict[str, Any]],
) -> list[Judged]:
    by_id = {m["id"]: m for m in msgs}
    jobs: list[tuple[Party, dict[str, Any] | None, str]] = []  # (agent, trigger, content)
    for m in msgs:
        agent = parties.get(m["sender"]["id"])
        if agent is not None and agent.kind == "agent":
            jobs.append((agent, by_id.get(m["causation_id"] or ""), str(m["content"] or "")))
    for r in audit:
        reason = str(r.get("reason") or "")
        if r["action"] == "routine.skipped" and "empty" in reason:
            trigger = by_id.get((r.get("data") or {}).get("trigger_id") or "")
            jobs.append((parties[r["principal_id"]], trigger, ""))
    out: list[Judged] = []
    for agent, trigger, content in jobs:
        others = [p for p in parties.values() if p.id != agent.id]
        variants = [v for p in others for v in name_variants(p.name, person=p.kind == "user")]
        orgs = sorted({p.org for p in others if p.org != agent.org})
        message = str(trigger["content"]) if trigger else ""
        seq = trigger["seq"] if trigger else 0
        earlier = [str(m["content"]) for m in msgs if m["seq"] <= seq]
        by_others = [
            str(m["content"]) for m in msgs if m["seq"] <= seq and m["sender"]["id"] != agent.id
        ]
        judged = Judged(scenario, seed, agent.name, agent.org, message, content)
        judged.empty = not re.search(r"[^\W_]", content)
        if not judged.empty:
            judged.speaks_as_other = speaks_as_other(content, other_names=variants, other_orgs=orgs)
            judged.placeholder = placeholders(content)
            judged.repeat = repeated_sentences(content)
            judged.echo = echoes(content, earlier)
        judged.fact_applies = agent.knowledge is not None
        if agent.knowledge is not None:
            judged.fact = fitting_fact(
                content,
                knowledge=agent.knowledge,
                message=message,
                borrowed=[*by_others, agent.identity, title],
            )
        out.append(judged)
    return out


def run_demo(server: LocalServer, seed: int, timeout: float) -> list[Judged]:
    """The demo's setup and kickoff in ``rollout-status``; the judged replies."""
    examples = find_examples(EXAMPLES)
    scenario = json.loads((examples / "demo" / "scenario.json").read_text(encoding="utf-8"))
    acme, globex, a, g = setup_companies(server.url, server.admin_key, examples, scenario, None)
    try:
        net = acme.call("POST", "/networks", json={"name": "acme-rollout"})
        for member in ({"agent_id": a["agent"]["id"]}, {"user_id": a["user"]["id"]}):
            acme.call("POST", f"/networks/{net['id']}/members", json=member)
        invite = acme.call("POST", f"/networks/{net['id']}/invites", json={})
        globex.call(
            "POST",
            "/networks/join",
            json={
                "code": invite["join_code"],
                "agent_ids": [g["agent"]["id"]],
                "user_ids": [g["user"]["id"]],
            },
        )
        title = "rollout-status"
        thread = acme.call("POST", f"/networks/{net['id']}/threads", json={"title": title})
        for co, side in ((acme, a), (globex, g)):
            co.call(
                "POST",
                f"/agents/{side['agent']['id']}/routines",
                json={
                    "name": "participate_in_rollout",
                    "event_type": "thread.message_added",
                    "handler_type": "preset",
                    "preset_name": "participate",
                },
            )
        acme.call(
            "POST",
            f"/threads/{thread['id']}/messages",
            json={"content": KICKOFF, "user_id": a["user"]["id"]},
        )
        parties: dict[str, Party] = {}
        for side, org, key in ((a, "Acme", "acme"), (g, "Globex", "globex")):
            user, agent = side["user"], side["agent"]
            parties[user["id"]] = Party(user["id"], user["name"], org, "user")
            parties[agent["id"]] = Party(
                agent["id"],
                agent["name"],
                org,
                "agent",
                identity=str(agent.get("identity") or ""),
                knowledge=knowledge_sentences(examples / "demo" / key / "knowledge"),
            )
        agent_ids = {a["agent"]["id"], g["agent"]["id"]}
        msgs, audit = _settle([acme.http, globex.http], thread["id"], agent_ids, timeout)
        return _judge("demo", seed, title, parties, msgs, audit)
    finally:
        acme.http.close()
        globex.http.close()


def run_quickstart(server: LocalServer, seed: int, timeout: float) -> list[Judged]:
    """``examples/quickstart.py``'s ``main`` against an org of ``server``; the judged replies."""
    with httpx.Client(
        base_url=f"{server.url}/api/v1",
        headers={"Authorization": f"Bearer {server.admin_key}"},
        timeout=60,
    ) as admin:
        key = ok(admin.post("/orgs", json={"name": QUICKSTART_ORG}))["secret"]
    spec = importlib.util.spec_from_file_location("quickstart", EXAMPLES / "quickstart.py")
    assert spec is not None and spec.loader is not None
    quickstart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quickstart)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(TimeoutError):
        asyncio.run(quickstart.main(server.url, key))  # returns once both agents spoke
    with httpx.Client(
        base_url=f"{server.url}/api/v1", headers={"Authorization": f"Bearer {key}"}, timeout=60
    ) as http:
        thread = next(t for t in ok(http.get("/threads")) if t["title"] == QUICKSTART_THREAD)
        parties = {
            x["id"]: Party(x["id"], x["name"], QUICKSTART_ORG, "agent", identity=x["identity"])
            for x in ok(http.get("/agents"))
        }
        for u in ok(http.get("/users")):
            parties[u["id"]] = Party(u["id"], u["name"], QUICKSTART_ORG, "user")
        msgs, audit = _settle([http], thread["id"], set(_agent_ids(parties)), timeout)
    return _judge("quickstart", seed, QUICKSTART_THREAD, parties, msgs, audit)


def _agent_ids(parties: dict[str, Party]) -> list[str]:
    return [p.id for p in parties.values() if p.kind == "agent"]


# ----------------------------------------------------------------------------- report


def summarise(replies: Sequence[Judged]) -> dict[str, Any]:
    """Counts of each flag over ``replies`` and the fitting-fact percentage."""
    applies = [r for r in replies if r.fact_applies]
    facts = sum(1 for r in applies if r.fact)
    return {
        "replies": len(replies),
        "speaks_as_other": sum(1 for r in replies if r.speaks_as_other),
        "placeholder": sum(1 for r in replies if r.placeholder),
        "repeat": sum(1 for r in replies if r.repeat),
        "empty": sum(1 for r in replies if r.empty),
        "echo": sum(1 for r in replies if r.echo),
        "fact_replies": len(applies),
        "fitting_fact": facts,
        "fitting_fact_pct": round(100 * facts / len(applies), 1) if applies else None,
    }


def print_report(replies: Sequence[Judged], scenarios: Sequence[str], examples: int) -> None:
    rows = [(s, summarise([r for r in replies if r.scenario == s])) for s in scenarios]
    rows.append(("total", summarise(replies)))
    head = (
        f"{'scenario':<11} {'replies':>7} {'as-other':>8} {'placeh.':>7} {'repeat':>6} "
        f"{'empty':>5} {'echo':>5}  fitting fact"
    )
    print(head)
    print("-" * len(head))
    for name, s in rows:
        fact = (
            f"{s['fitting_fact']}/{s['fact_replies']} = {s['fitting_fact_pct']:.1f} %"
            if s["fact_replies"]
            else "n/a (no knowledge)"
        )
        print(
            f"{name:<11} {s['replies']:>7} {s['speaks_as_other']:>8} {s['placeholder']:>7} "
            f"{s['repeat']:>6} {s['empty']:>5} {s['echo']:>5}  {fact}"
        )
    if examples <= 0:
        return
    for scenario in scenarios:
        mine = [r for r in replies if r.scenario == scenario]
        bad = [r for r in mine if r.speaks_as_other or r.placeholder or r.repeat or r.empty]
        good = [r for r in mine if r not in bad]
        picked = bad[: (examples + 1) // 2] + good[: examples - min(len(bad), (examples + 1) // 2)]
        print(f"\nExamples, {scenario}:")
        for r in picked:
            print(f"  seed {r.seed} {r.agent} ({r.org}) [{', '.join(r.flags())}]")
            print(f"    to: {_short(r.trigger, 100)}")
            print(f"    {_short(r.content, 400) or '(empty)'}")
            details = r.speaks_as_other + r.placeholder + r.repeat
            if details:
                print(f"    matched: {details}")
            if r.fact:
                print(f"    fact from: {_short(r.fact, 120)}")


def _short(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seeds", type=int, default=10, help="runs (server processes)")
    parser.add_argument("--first-seed", type=int, default=1, help="model seed of the first run")
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help="comma-separated: demo,quickstart"
    )
    parser.add_argument("--timeout", type=float, default=600, help="seconds per scenario")
    parser.add_argument("--examples", type=int, default=4, help="example replies per scenario")
    parser.add_argument("--keep", action="store_true", help="keep the temp dirs (server logs)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--save", type=Path, help="also write the JSON results to this file")
    args = parser.parse_args(argv)
    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {sorted(unknown)}")
    replies: list[Judged] = []
    t0 = time.monotonic()
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        work = Path(tempfile.mkdtemp(prefix=f"an-replies-{seed}-"))
        try:
            with LocalServer(work, seed) as server:
                for scenario in scenarios:
                    run = run_demo if scenario == "demo" else run_quickstart
                    got = run(server, seed, args.timeout)
                    replies += got
                    print(
                        f"seed {seed} {scenario}: {len(got)} replies "
                        f"({time.monotonic() - t0:.0f} s)",
                        file=sys.stderr,
                    )
        finally:
            if args.keep:
                print(f"kept {work}", file=sys.stderr)
            else:
                shutil.rmtree(work, ignore_errors=True)
    result = {
        "seeds": list(range(args.first_seed, args.first_seed + args.seeds)),
        "summary": {
            **{s: summarise([r for r in replies if r.scenario == s]) for s in scenarios},
            "total": summarise(replies),
        },
        "replies": [asdict(r) for r in replies],
    }
    if args.save:
        args.save.write_text(json.dumps(result, indent=2), encoding="utf-8")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_report(replies, scenarios, args.examples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
