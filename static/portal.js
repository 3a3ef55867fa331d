/* The self-service page: lists the person's workspaces and acts on them through
   /_codehub/auth/self/ (JSON POSTs from this origin only), following each workspace
   that is changing through the same event stream the loading page uses. */
(function () {
  "use strict";
  var API = "self/workspaces";
  var el = function (id) { return document.getElementById(id); };
  var state = { data: null, all: false, streams: {}, busy: {}, reload: null };
  var LABELS = { RUNNING: "Running", WARM: "Stopped", COLD: "Archived", NEW: "New", ERROR: "Error", DELETED: "Deleted" };
  var OPS = { STARTING: "Starting", STOPPING: "Stopping", ARCHIVING: "Archiving", RESTORING: "Restoring",
              PROVISIONING: "Preparing", DELETING: "Deleting" };

  function mib(n) {
    if (n < 1048576) { return Math.max(1, Math.round(n / 1024)) + " KiB"; }
    return (n / 1048576).toFixed(1) + " MiB";
  }
  function duration(s) {
    if (s % 86400 === 0) { return (s / 86400) + " d"; }
    if (s % 3600 === 0) { return (s / 3600) + " h"; }
    return Math.round(s / 60) + " min";
  }
  function when(iso) {
    if (!iso) { return "never"; }
    var d = new Date(iso), secs = Math.round((Date.now() - d.getTime()) / 1000);
    if (secs < 60) { return "just now"; }
    if (secs < 3600) { return Math.round(secs / 60) + " min ago"; }
    if (secs < 86400) { return Math.round(secs / 3600) + " h ago"; }
    return d.toISOString().slice(0, 10);
  }
  function announce(text) { el("announce").textContent = text; }
  function fail(message) {
    el("failure-message").textContent = message;
    el("failure").hidden = false;
    announce(message);
  }
  function node(tag, cls, text) {
    var n = document.createElement(tag);
    if (cls) { n.className = cls; }
    if (text !== undefined) { n.textContent = text; }
    return n;
  }

  function call(path, body) {
    el("failure").hidden = true;
    return fetch(path, {
      method: "POST", credentials: "same-origin", cache: "no-store",
      headers: { "Content-Type": "application/json", "Accept": "application/json" },
      body: JSON.stringify(body || {})
    }).then(function (r) {
      return r.json().catch(function () { return {}; }).then(function (j) {
        if (r.status === 401) { window.location.reload(); }
        if (!r.ok) { throw new Error((j.error && j.error.message) || ("HTTP " + r.status)); }
        return j;
      });
    });
  }

  function settled(w) {
    return w.desired_state === "DELETED" || (w.operation === "NONE" &&
      (w.status === "ERROR" || w.status === w.desired_state));
  }

  function stateCell(w) {
    var td = node("td");
    var tier = w.status === "ERROR" ? "ERROR" : w.status;
    var pill = node("span", "pill", LABELS[w.status] || w.status);
    pill.setAttribute("data-tier", tier);
    td.appendChild(pill);
    var sub = "";
    if (w.operation !== "NONE") { sub = (OPS[w.operation] || w.operation) + "…"; }
    else if (w.desired_state !== w.status && w.status !== "ERROR") { sub = "Going to " + (LABELS[w.desired_state] || w.desired_state).toLowerCase() + "…"; }
    if (w.error) { sub = w.error.message; }
    if (sub) { td.appendChild(node("span", "sub", sub)); }
    if (w.progress) {
      var bar = node("progress", "row-progress");
      bar.setAttribute("aria-label", w.progress.phase + " progress of " + w.id);
      if (w.progress.total) { bar.max = w.progress.total; bar.value = w.progress.done || 0; }
      td.appendChild(bar);
      td.appendChild(node("span", "sub", w.progress.phase + ": " + mib(w.progress.done || 0) +
        (w.progress.total ? " of " + mib(w.progress.total) : "")));
    }
    return td;
  }

  function button(label, w, verb, cls) {
    var b = node("button", "button small " + (cls || "secondary"), label);
    b.type = "button";
    b.setAttribute("aria-label", label + " " + w.id);
    b.disabled = !!state.busy[w.id];
    b.addEventListener("click", function () { act(w, verb); });
    return b;
  }

  function actions(w) {
    var td = node("td"), box = node("div", "row-actions");
    var cold = w.status === "COLD" && w.operation === "NONE";
    var deleting = w.desired_state === "DELETED";
    if (!deleting && !cold && w.desired_state !== "COLD") { box.appendChild(button("Open", w, "open", "primary")); }
    if (!deleting && w.desired_state === "RUNNING") { box.appendChild(button("Stop", w, "stop")); }
    if (!deleting && w.desired_state !== "COLD" && (w.status === "WARM" || w.status === "RUNNING")) { box.appendChild(button("Archive", w, "archive")); }
    if (!deleting && cold) { box.appendChild(button("Restore", w, "restore", "primary")); }
    if (!deleting && state.data && state.data.can_delete) { box.appendChild(button("Delete", w, "delete", "danger")); }
    td.appendChild(box);
    return td;
  }

  function row(w) {
    var tr = node("tr");
    tr.id = "ws-" + w.id;
    tr.setAttribute("data-status", w.status);
    tr.setAttribute("data-operation", w.operation);
    var name = node("td");
    name.appendChild(node("span", "ws", w.id));
    if (state.all) { name.appendChild(node("span", "owner", w.owner)); }
    tr.appendChild(name);
    tr.appendChild(stateCell(w));
    tr.appendChild(node("td", "", when(w.last_access_at)));
    var ttl = node("td");
    ttl.appendChild(node("span", "", "stop after " + duration(w.warm_ttl_seconds)));
    ttl.appendChild(node("span", "sub", "archive after " + duration(w.cold_ttl_seconds)));
    tr.appendChild(ttl);
    var arch = node("td", "", w.archive ? mib(w.archive.size || 0) : "none");
    if (w.archive && w.archive.created_at) { arch.appendChild(node("span", "sub", "made " + when(w.archive.created_at))); }
    tr.appendChild(arch);
    tr.appendChild(actions(w));
    return tr;
  }

  function render() {
    var d = state.data, rows = el("rows");
    el("person").textContent = d.person;
    el("admin-badge").hidden = !d.admin;
    el("all-switch").hidden = !d.admin;
    el("create").hidden = !d.can_create;
    el("title").textContent = state.all ? "All workspaces" : "Your workspaces";
    var n = d.items.length;
    el("summary").textContent = n + " workspace" + (n === 1 ? "" : "s") +
      (d.can_create && d.max_workspaces && !state.all ? " · you may own up to " + d.max_workspaces : "");
    while (rows.firstChild) { rows.removeChild(rows.firstChild); }
    d.items.forEach(function (w) { rows.appendChild(row(w)); follow(w); });
    el("empty").hidden = n !== 0;
  }

  function update(id, change) {
    var items = state.data.items;
    for (var i = 0; i < items.length; i++) {
      if (items[i].id === id) {
        Object.keys(change).forEach(function (k) { items[i][k] = change[k]; });
        var old = el("ws-" + id);
        var fresh = row(items[i]);
        if (old) {
          var focused = document.activeElement && old.contains(document.activeElement) ? document.activeElement.textContent : null;
          old.parentNode.replaceChild(fresh, old);
          if (focused) { fresh.querySelectorAll("button").forEach(function (b) { if (b.textContent === focused) { b.focus(); } }); }
        }
        return items[i];
      }
    }
    return null;
  }

  /* Follow a changing workspace through the loading page's event stream. */
  function follow(w) {
    if (settled(w) || state.streams[w.id] || !window.EventSource) { return; }
    var source = new EventSource(API + "/" + encodeURIComponent(w.id) + "/events");
    state.streams[w.id] = source;
    source.addEventListener("state", function (e) {
      var s;
      try { s = JSON.parse(e.data); } catch (err) { return; }
      var now = update(w.id, { status: s.status, desired_state: s.desired_state, operation: s.operation,
                               progress: s.progress, error: s.error });
      if (now && settled(now)) {
        source.close();
        delete state.streams[w.id];
        announce(w.id + " is now " + (LABELS[now.status] || now.status).toLowerCase());
        load();
      }
    });
    /* Refused (too many streams) or gone for good: read the list again in a while, which
       follows whatever is still changing (a stream that merely ended reconnects itself). */
    source.addEventListener("error", function () {
      if (source.readyState !== EventSource.CLOSED) { return; }
      delete state.streams[w.id];
      if (!state.reload) { state.reload = setTimeout(function () { state.reload = null; load(); }, 3000); }
    });
  }

  function act(w, verb) {
    if (verb === "delete" && !window.confirm("Delete " + w.id + " and everything in it?")) { return; }
    state.busy[w.id] = true;
    update(w.id, {});
    call(API + "/" + encodeURIComponent(w.id) + "/" + verb, {}).then(function (j) {
      delete state.busy[w.id];
      if (verb === "open" && j.url) { window.location.assign(j.url); return; }
      var now = update(w.id, j.workspace);
      announce(w.id + ": " + verb + " requested");
      if (now) { follow(now); }
    }).catch(function (err) {
      delete state.busy[w.id];
      update(w.id, {});
      fail(err.message);
    });
  }

  function load() {
    return fetch(API + (state.all ? "?all=1" : ""), { credentials: "same-origin", cache: "no-store",
                                                      headers: { "Accept": "application/json" } })
      .then(function (r) {
        if (r.status === 401) { window.location.reload(); return null; }
        return r.json();
      })
      .then(function (d) { if (d && d.items) { state.data = d; render(); document.body.setAttribute("data-loaded", "1"); } })
      .catch(function () { fail("CodeHub did not answer; try reloading the page."); });
  }

  el("show-all").addEventListener("change", function (e) { state.all = e.target.checked; load(); });
  el("create").addEventListener("click", function () {
    call(API, {}).then(function (j) { announce(j.workspace.id + " created"); load(); })
      .catch(function (err) { fail(err.message); });
  });
  load();
})();
