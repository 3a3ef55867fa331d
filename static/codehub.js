/* CodeHub loading page: follows the workspace's state until its IDE is ready.
 *
 * One EventSource on <base>_codehub/events carries "state" events; when it cannot be
 * used (no EventSource, the stream refused, or three failures in a row) the page polls
 * <base>_codehub/status every 2 s instead. The page reloads once the workspace is RUNNING
 * and healthy (the gateway then proxies the same URL to the IDE), and stops with a clear
 * message on ERROR, COLD, or a workspace that no longer exists.
 */
(function () {
  "use strict";
  var dataEl = document.getElementById("codehub-state");
  if (!dataEl) { return; }
  var base = document.body.getAttribute("data-base");
  var el = function (id) { return document.getElementById(id); };
  var finished = false;
  var source = null;
  var failures = 0;
  var pollTimer = null;

  var STEPS = ["requested", "starting", "health", "ready"];
  var PHASE_TEXT = {
    NEW: "Preparing the workspace's home",
    WARM: "Waiting for the workspace to be started",
    RUNNING: "Checking that the IDE answers",
    COLD: "The workspace is archived",
    ERROR: "The workspace failed to start",
    UNKNOWN: "This workspace does not exist"
  };
  var OPERATION_TEXT = {
    PROVISIONING: "Creating the workspace's home volume",
    STARTING: "Starting the IDE container",
    STOPPING: "Finishing a stop before starting again",
    RESTORING: "Restoring the home from its archive",
    ARCHIVING: "Archiving the home",
    DELETING: "The workspace is being deleted"
  };

  function mib(n) { return (n / 1048576).toFixed(1) + " MiB"; }

  function setSteps(active) {
    var idx = STEPS.indexOf(active);
    STEPS.forEach(function (name, i) {
      var li = el("step-" + name);
      if (li) { li.setAttribute("data-state", i < idx ? "done" : (i === idx ? "active" : "todo")); }
    });
  }

  function render(s) {
    var text = PHASE_TEXT[s.status] || s.status;
    if (s.operation && s.operation !== "NONE" && OPERATION_TEXT[s.operation]) {
      text = OPERATION_TEXT[s.operation];
    }
    if (s.ready) { text = "Ready: opening the IDE"; }
    el("status-text").textContent = text;
    el("status-raw").textContent = s.status + (s.operation && s.operation !== "NONE" ? " \u00b7 " + s.operation : "");
    if (s.ready) { setSteps("ready"); }
    else if (s.status === "RUNNING") { setSteps("health"); }
    else if (s.operation === "STARTING") { setSteps("starting"); }
    else { setSteps("requested"); }
    var box = el("progress");
    if (s.progress && s.progress.phase) {
      box.hidden = false;
      var bar = el("progress-bar");
      if (s.progress.total) {
        bar.max = s.progress.total; bar.value = s.progress.done || 0;
        el("progress-text").textContent = s.progress.phase + ": " + mib(s.progress.done || 0) + " of " + mib(s.progress.total);
      } else {
        bar.removeAttribute("value");
        el("progress-text").textContent = s.progress.phase + ": " + mib(s.progress.done || 0);
      }
    } else {
      box.hidden = true;
    }
  }

  function fail(title, message) {
    finished = true;
    stop();
    el("spinner").hidden = true;
    el("failure-title").textContent = title;
    el("failure-message").textContent = message;
    el("failure").hidden = false;
    el("retry").hidden = false;
  }

  function handle(s) {
    if (finished) { return; }
    render(s);
    if (s.ready) {
      finished = true;
      stop();
      window.location.reload();
    } else if (s.status === "ERROR") {
      fail("The workspace could not be started.", (s.error && s.error.message) || "No reason was recorded.");
    } else if (s.status === "COLD" || s.desired_state === "COLD") {
      finished = true;
      stop();
      window.location.reload(); /* the gateway shows the archived page */
    } else if (s.status === "UNKNOWN" || s.desired_state === "DELETED") {
      fail("This workspace is gone.", "It does not exist or is being deleted.");
    }
  }

  function stop() {
    if (source) { source.close(); source = null; }
    if (pollTimer) { clearTimeout(pollTimer); pollTimer = null; }
  }

  function poll() {
    pollTimer = null;
    if (finished) { return; }
    fetch(base + "_codehub/status", { cache: "no-store", credentials: "same-origin" })
      .then(function (r) {
        if (r.status === 401 || r.status === 403) {
          fail("Your access to this workspace ended.", "Open a new access link to continue.");
          return null;
        }
        return r.ok ? r.json() : null;
      })
      .then(function (s) { if (s) { handle(s); } })
      .catch(function () { /* the gateway restarts or the network blips: keep polling */ })
      .then(function () { if (!finished) { pollTimer = setTimeout(poll, 2000); } });
  }

  function startPolling() {
    el("transport").textContent = "polling";
    if (!pollTimer) { poll(); }
  }

  function startEvents() {
    if (!window.EventSource) { startPolling(); return; }
    source = new EventSource(base + "_codehub/events");
    el("transport").textContent = "live";
    source.addEventListener("open", function () { failures = 0; });
    source.addEventListener("state", function (e) {
      failures = 0;
      try { handle(JSON.parse(e.data)); } catch (err) { /* ignore a malformed event */ }
    });
    source.addEventListener("error", function () {
      if (finished) { return; }
      failures += 1;
      if (!source || source.readyState === EventSource.CLOSED || failures >= 3) {
        if (source) { source.close(); source = null; }
        startPolling();
      }
    });
  }

  el("retry").addEventListener("click", function () { window.location.reload(); });
  var initial = JSON.parse(dataEl.textContent);
  handle(initial);
  if (!finished) { startEvents(); }
})();
