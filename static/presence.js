// CodeHub's presence script, added by the gateway to code-server's workbench page only
// (codehub/gateway/presence.py). It tells the gateway that a person is at the keyboard or
// the mouse, at most once per `every` seconds, and when the workspace has stepped down
// (stopped for being idle) it reloads the tab: the reload lands on CodeHub's loading
// page, which opens a fresh workbench once the workspace is back.
(() => {
  'use strict';
  const script = document.currentScript;
  if (!script || window.__codehubPresence) return;
  window.__codehubPresence = true;
  const endpoint = new URL('activity', script.src).toString();
  let every = 60000;
  let last = 0;
  let busy = false;
  let reloading = false;

  function report() {
    busy = true;
    last = Date.now();
    fetch(endpoint, {
      method: 'POST', credentials: 'same-origin', cache: 'no-store',
      headers: {'Content-Type': 'application/json'}, body: '{}',
    }).then((resp) => (resp.ok ? resp.json() : null)).then((answer) => {
      if (!answer) return;
      if (answer.running === false && !reloading) {
        reloading = true;
        window.location.reload();
        return;
      }
      if (typeof answer.every === 'number' && answer.every > 0) every = answer.every * 1000;
    }).catch(() => { last = Date.now() - every + 5000; })  // failed: again in 5 s
      .finally(() => { busy = false; });
  }

  function input() {
    if (!busy && !reloading && Date.now() - last >= every) report();
  }

  for (const name of ['keydown', 'pointerdown', 'wheel', 'touchstart']) {
    window.addEventListener(name, input, {capture: true, passive: true});
  }
})();
