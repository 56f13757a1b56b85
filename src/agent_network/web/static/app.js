// Agent Network web app: small page helpers (no inline script anywhere: CSP script-src 'self').
// A button with data-copy="<selector>" copies that field's value to the clipboard.
(function () {
  "use strict";
  document.addEventListener("click", function (ev) {
    var button = ev.target.closest ? ev.target.closest("button[data-copy]") : null;
    if (!button) { return; }
    var field = document.querySelector(button.getAttribute("data-copy"));
    if (!field) { return; }
    var done = function () { button.textContent = "Copied"; };
    field.select();
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(field.value).then(done, function () {
        document.execCommand("copy"); done();
      });
    } else {
      document.execCommand("copy"); done();
    }
  });

  // A sign-in link /app/login#key=<token>: the key is in the fragment (never sent to a server);
  // it is put in the field and the fragment dropped. Signing in stays a click (or Enter) by the
  // person, so a link from someone else cannot sign a browser in unnoticed.
  var key = document.getElementById("key");
  if (key && location.hash.indexOf("#key=") === 0) {
    key.value = decodeURIComponent(location.hash.slice(5));
    history.replaceState(null, "", location.pathname + location.search);
    var button = document.getElementById("sign-in");
    if (button) { button.focus(); }
  }
  // On the people page, the sign-in link is shown whole (with this server's address).
  var link = document.querySelector("input[data-login-link]");
  if (link) { link.value = location.origin + "/app/login#key=" + link.getAttribute("data-login-link"); }
}());
