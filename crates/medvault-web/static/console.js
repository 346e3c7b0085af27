// medvault console: the idle-logoff warning. The server ends a session after
// session.idle_timeout_secs without requests; this script polls how long is left (a poll
// never extends the session), warns a minute before, offers "Stay signed in" (a request,
// which counts as activity), and returns the page to sign-in when the session has ended —
// idled out, signed out elsewhere, or the account disabled by an administrator — so no
// patient information stays on an unattended screen.
(function () {
  'use strict';
  var body = document.body;
  var idle = parseInt(body.getAttribute('data-idle-secs') || '0', 10);
  if (!idle) { return; }
  var meta = document.querySelector('meta[name="csrf-token"]');
  var csrf = meta ? meta.getAttribute('content') : '';
  var box = document.getElementById('idle-warning');
  var left = document.getElementById('idle-left');
  var stay = document.getElementById('idle-stay');
  var WARN = 60;
  var POLL = 10;
  var remaining = idle;
  var ended = false;

  function signIn(reason) {
    if (ended) { return; }
    ended = true;
    window.location.replace('/login?reason=' + reason);
  }

  function show(secs) {
    if (!box) { return; }
    if (secs <= WARN) {
      left.textContent = String(Math.max(0, Math.floor(secs)));
      if (box.hidden) { box.hidden = false; stay.focus(); }
    } else if (!box.hidden) {
      box.hidden = true;
    }
  }

  function poll() {
    fetch('/session/status', { credentials: 'same-origin', cache: 'no-store' })
      .then(function (r) {
        if (r.status === 401) { signIn('ended'); return null; }
        return r.ok ? r.json() : null;
      })
      .then(function (j) {
        if (j && typeof j.remaining === 'number') { remaining = j.remaining; show(remaining); }
      })
      .catch(function () { /* offline: the local countdown still runs */ });
  }

  if (stay) {
    stay.addEventListener('click', function () {
      fetch('/session/keepalive', {
        method: 'POST', credentials: 'same-origin', headers: { 'X-CSRF-Token': csrf }
      }).then(function (r) {
        if (r.status === 401 || r.redirected) { signIn('ended'); return; }
        remaining = idle; show(remaining); box.hidden = true; poll();
      });
    });
  }

  setInterval(function () {
    remaining -= 1;
    if (remaining <= 0) { signIn('idle'); return; }
    show(remaining);
  }, 1000);
  setInterval(poll, POLL * 1000);
  poll();
}());
