// Agent Network web app: knowledge upload of files or a folder with progress. Each file is read
// as text and sent as one form post to /app/knowledge (the same service call as the API's
// knowledge upload); the bar moves per byte sent and per file; a refused file is listed with
// the server's message and the others go on.
(function () {
  "use strict";
  var box = document.getElementById("uploader");
  if (!box || !window.FileReader || !window.XMLHttpRequest) { return; }
  box.hidden = false;
  var csrf = document.querySelector('input[name="csrf_token"]').value;
  var agentId = box.dataset.agentId || "";
  var bar = document.getElementById("k-progress");
  var status = document.getElementById("k-status");
  var errors = document.getElementById("k-errors");

  function readText(file) {
    return new Promise(function (resolve, reject) {
      var r = new FileReader();
      r.onload = function () { resolve(String(r.result)); };
      r.onerror = function () { reject(new Error("could not read " + file.name)); };
      r.readAsText(file);
    });
  }

  function send(name, text, done, total, onProgress) {
    return new Promise(function (resolve) {
      var body = new URLSearchParams();
      body.set("csrf_token", csrf);
      body.set("agent_id", agentId);
      body.set("name", name);
      body.set("content", text);
      var xhr = new XMLHttpRequest();
      xhr.open("POST", "/app/knowledge");
      xhr.setRequestHeader("Content-Type", "application/x-www-form-urlencoded");
      xhr.setRequestHeader("X-CSRF-Token", csrf);
      xhr.setRequestHeader("X-Upload", "1");
      xhr.upload.onprogress = function (ev) {
        if (ev.lengthComputable) { onProgress(ev.loaded / ev.total); }
      };
      xhr.onload = function () {
        var msg = null;
        if (xhr.status !== 201) {
          try { msg = JSON.parse(xhr.responseText).error.message; } catch (e) { msg = "refused (" + xhr.status + ")"; }
        }
        resolve(msg);
      };
      xhr.onerror = function () { resolve("the server could not be reached"); };
      xhr.send(body.toString());
    });
  }

  async function upload(files) {
    files = Array.prototype.slice.call(files);
    if (!files.length) { return; }
    errors.textContent = "";
    bar.hidden = false;
    bar.max = files.length;
    bar.value = 0;
    var failed = 0;
    for (var i = 0; i < files.length; i++) {
      var f = files[i];
      var name = f.webkitRelativePath || f.name;
      status.textContent = "Uploading " + name + " (" + (i + 1) + " of " + files.length + ")…";
      var msg;
      try {
        var text = await readText(f);
        msg = await send(name, text, i, files.length, function (part) { bar.value = i + part; });
      } catch (e) { msg = e.message; }
      bar.value = i + 1;
      if (msg) {
        failed++;
        var li = document.createElement("li");
        li.className = "error";
        li.textContent = name + ": " + msg;
        errors.appendChild(li);
      }
    }
    status.textContent = (files.length - failed) + " of " + files.length + " file(s) uploaded." +
      (failed ? "" : " Reloading the list…");
    if (!failed) { setTimeout(function () { location.reload(); }, 600); }
  }

  document.getElementById("k-files").addEventListener("change", function (ev) { upload(ev.target.files); });
  document.getElementById("k-folder").addEventListener("change", function (ev) { upload(ev.target.files); });
}());
