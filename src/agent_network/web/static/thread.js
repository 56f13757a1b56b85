// Agent Network web app: the live thread view (docs/webapp.md, "The live thread view").
// Follows the thread over the realtime WebSocket protocol (docs/protocol.md) with a single-use
// ticket from /app/ws-ticket (the page never holds the key), renders envelopes as they are
// committed, shows typing indicators, posts over the socket and reloads the protocol state panel
// when the thread moves. Every text is set with textContent: nothing from a message is parsed as HTML.
(function () {
  "use strict";
  var root = document.getElementById("thread");
  if (!root || root.dataset.live !== "yes" || !window.WebSocket || !window.fetch) { return; }
  var threadId = root.dataset.threadId;
  var lastSeq = parseInt(root.dataset.lastSeq, 10) || 0;
  var list = document.getElementById("messages");
  var statusEl = document.getElementById("live-status");
  var typingEl = document.getElementById("typing");
  var form = document.getElementById("post-form");
  var csrfInput = document.querySelector('input[name="csrf_token"]');
  var csrf = csrfInput ? csrfInput.value : "";
  var ws = null;
  var retry = 0;
  var stopped = false;
  var refNo = 0;
  var pending = {};  // ref -> true while a post awaits "posted" or "error"
  var typers = {};  // sender id -> {name, timer}
  var stateTimer = null;
  var orgNames = {};  // org id -> name: for typing senders (their frame carries no org name)
  try { orgNames = JSON.parse(root.dataset.orgs || "{}") || {}; } catch (e) { orgNames = {}; }

  function setStatus(text) { if (statusEl) { statusEl.textContent = text; } }

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) { e.className = cls; }
    if (text !== undefined && text !== null) { e.textContent = String(text); }
    return e;
  }

  function senderMeta(meta, s) {
    meta.appendChild(el("strong", "who", s.name || s.id));
    meta.appendChild(document.createTextNode(" "));
    meta.appendChild(el("span", "badge " + s.kind, s.kind === "user" ? "person" : s.kind));
    if (s.org_name) {
      meta.appendChild(document.createTextNode(" "));
      meta.appendChild(el("span", "badge org", s.org_name));
    }
  }

  function render(env) {
    if (typeof env.seq !== "number" || env.seq <= 0) { return; }
    if (env.seq > lastSeq) {
      lastSeq = env.seq;
      var range = document.getElementById("page-range");
      if (range) { range.textContent = "envelopes " + range.dataset.start + "–" + lastSeq + " of " + lastSeq; }
    }
    if (env.stub) { return; }  // not addressed to this reader: left out, as in the history pages
    if (env.type !== "message") { refreshState(); return; }
    if (env.sender && env.sender.org_id && env.sender.org_name) { orgNames[env.sender.org_id] = env.sender.org_name; }
    if (document.getElementById("m" + env.seq)) { return; }  // shown once: posted + live
    var li = el("li", "message " + (env.sender && env.sender.kind || ""));
    li.id = "m" + env.seq;
    li.dataset.seq = String(env.seq);
    var meta = el("div", "meta");
    senderMeta(meta, env.sender || {});
    var when = String(env.created_at || "").slice(0, 19).replace("T", " ");
    var info = "#" + env.seq + " · " + when;
    if (env.audience && env.audience.length) { info += " · to " + env.audience.length; }
    meta.appendChild(document.createTextNode(" "));
    meta.appendChild(el("span", "muted small", info));
    li.appendChild(meta);
    li.appendChild(el("div", "content", env.content));
    insert(li, env.seq);
    if (env.sender) { stopTyping(env.sender.id); }
    refreshState();
  }

  function insert(li, seq) {
    var empty = list.querySelector("li.empty");
    if (empty) { empty.remove(); }
    var items = list.querySelectorAll("li[data-seq]");
    for (var i = items.length - 1; i >= 0; i--) {
      if (parseInt(items[i].dataset.seq, 10) < seq) { items[i].after(li); return; }
    }
    list.prepend(li);
  }

  function showTyping() {
    var names = Object.keys(typers).map(function (k) { return typers[k].name; });
    typingEl.textContent = names.length ? names.join(", ") + (names.length > 1 ? " are typing…" : " is typing…") : "";
  }

  function stopTyping(id) {
    if (typers[id]) { clearTimeout(typers[id].timer); delete typers[id]; showTyping(); }
  }

  function typing(sender) {
    if (!sender || !sender.id) { return; }
    var org = sender.org_name || orgNames[sender.org_id];
    var label = (sender.name || sender.id) + (org ? " (" + org + ")" : "");
    if (typers[sender.id]) { clearTimeout(typers[sender.id].timer); }
    typers[sender.id] = { name: label, timer: setTimeout(function () { stopTyping(sender.id); }, 4000) };
    showTyping();
  }

  function refreshState() {
    if (stateTimer) { return; }
    stateTimer = setTimeout(function () {
      stateTimer = null;
      // a button's request is on its way: its answer replaces the panel; refresh after it
      if (document.querySelector("#state .htmx-request, #state.htmx-request")) { refreshState(); return; }
      fetch("/app/threads/" + encodeURIComponent(threadId) + "/state", {
        credentials: "same-origin", headers: { "HX-Request": "true" }
      }).then(function (r) { return r.ok ? r.text() : null; }).then(function (html) {
        var old = document.getElementById("state");
        if (!html || !old) { return; }
        if (old.querySelector(".htmx-request")) { refreshState(); return; }
        var box = document.createElement("div");
        box.innerHTML = html;  // our own server-rendered, escaped fragment
        var fresh = box.querySelector("#state");
        if (!fresh) { return; }
        // a shown verify result stays until the next action replaces the panel
        var kept = old.querySelector("#verify-result");
        if (kept && !fresh.querySelector("#verify-result")) { fresh.appendChild(kept); }
        old.replaceWith(fresh);
        if (window.htmx) { window.htmx.process(fresh); }
      }).catch(function () {});
    }, 250);
  }

  function send(frame) {
    if (ws && ws.readyState === WebSocket.OPEN) { ws.send(JSON.stringify(frame)); return true; }
    return false;
  }

  function postError(message) {
    var p = document.getElementById("post-error");
    if (!p) { return; }
    p.textContent = message || "";
    p.hidden = !message;
    var field = p.closest(".field");
    if (field) { field.classList.toggle("invalid", !!message); }
  }

  function onFrame(frame) {
    switch (frame.type) {
      case "welcome":
        retry = 0;
        send({ type: "join", thread_id: threadId, after: lastSeq, ref: "join" });
        break;
      case "joined":
        setStatus("live");
        break;
      case "envelope":
        if (frame.thread_id === threadId) { render(frame.envelope); }
        break;
      case "posted":
        if (pending[frame.ref]) {
          delete pending[frame.ref];
          postDone();
          var content = document.getElementById("content");
          if (content) { content.value = ""; }
          postError("");
          render(frame.envelope);
        }
        break;
      case "typing":
        if (frame.thread_id === threadId) { typing(frame.sender); }
        break;
      case "ping":
        send({ type: "pong" });
        break;
      case "error":
        var msg = frame.error && frame.error.message || "refused";
        if (frame.ref && pending[frame.ref]) {
          delete pending[frame.ref];
          postDone();
          postError(msg);
        } else if (frame.ref === "join" || (frame.thread_id === threadId && frame.error && frame.error.code === "not_found")) {
          stopped = true;
          setStatus("not following: " + msg);
        }
        break;
      case "disconnect":
        setStatus("disconnected (" + frame.reason + "), reconnecting…");
        break;
      default:
        break;
    }
  }

  function postDone() {
    var button = form && form.querySelector('button[type="submit"]');
    if (button && Object.keys(pending).length === 0) { button.disabled = false; }
  }

  function connect() {
    if (stopped) { return; }
    setStatus("connecting…");
    var body = new URLSearchParams();
    body.set("csrf_token", csrf);
    fetch("/app/ws-ticket", {
      method: "POST", credentials: "same-origin", body: body,
      headers: { "X-CSRF-Token": csrf }
    }).then(function (r) {
      if (!r.ok) { throw new Error("ticket refused (" + r.status + ")"); }
      return r.json();
    }).then(function (got) {
      var scheme = location.protocol === "https:" ? "wss://" : "ws://";
      ws = new WebSocket(scheme + location.host + got.url);
      ws.onopen = function () { ws.send(JSON.stringify({ type: "auth", token: got.ticket })); };
      ws.onmessage = function (ev) {
        var frame;
        try { frame = JSON.parse(ev.data); } catch (e) { return; }
        onFrame(frame);
      };
      ws.onclose = function (ev) {
        ws = null;
        Object.keys(pending).forEach(function (ref) { delete pending[ref]; });
        postDone();
        if (ev.code === 4401 || stopped) {
          stopped = true;
          setStatus("live updates ended: sign in again");
          return;
        }
        later();
      };
    }).catch(function (err) {
      setStatus("offline: " + err.message + "; retrying…");
      later();
    });
  }

  function later() {
    if (stopped) { return; }
    retry = Math.min(retry + 1, 6);
    setStatus("reconnecting…");
    setTimeout(connect, 500 * Math.pow(2, retry - 1));
  }

  if (form) {
    var lastTyping = 0;
    var content = document.getElementById("content");
    var asUser = document.getElementById("user-id");
    var audienceSelect = document.getElementById("audience");
    content.addEventListener("input", function () {
      var now = Date.now();
      if (now - lastTyping < 1500 || !content.value) { return; }
      lastTyping = now;
      var frame = { type: "typing", thread_id: threadId };
      if (asUser) { frame.user_id = asUser.value; }
      send(frame);
    });
    form.addEventListener("submit", function (ev) {
      if (!ws || ws.readyState !== WebSocket.OPEN) { return; }  // the plain form post instead
      ev.preventDefault();
      if (!content.value.trim()) { postError("write a message first"); return; }
      var ref = "post-" + (++refNo);
      var frame = {
        type: "post", ref: ref, thread_id: threadId, content: content.value,
        idempotency_key: "web-" + Date.now() + "-" + Math.random().toString(36).slice(2)
      };
      if (asUser) { frame.user_id = asUser.value; }
      if (audienceSelect) {
        var chosen = Array.prototype.filter.call(audienceSelect.options, function (o) { return o.selected; })
          .map(function (o) { return o.value; });
        if (chosen.length) { frame.audience = chosen; }
      }
      pending[ref] = true;
      var button = form.querySelector('button[type="submit"]');
      if (button) { button.disabled = true; }
      if (!send(frame)) { delete pending[ref]; postDone(); form.submit(); }
    });
  }

  window.addEventListener("pagehide", function () { stopped = true; if (ws) { ws.close(1000); } });
  connect();
}());
