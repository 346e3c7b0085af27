// medvault console: the WebAuthn ceremonies (W3C Web Authentication Level 2) the platform
// requires script for — signing in with a passkey after the password, and registering a
// new passkey from "My account". Options come from the server as webauthn-rs produces them
// (base64url binary fields); credentials go back in the same JSON form.
(function () {
  'use strict';
  var meta = document.querySelector('meta[name="csrf-token"]');
  var csrf = meta ? meta.getAttribute('content') : '';
  var errorBox = document.getElementById('passkey-error');

  function dec(s) {
    s = s.replace(/-/g, '+').replace(/_/g, '/');
    while (s.length % 4) { s += '='; }
    return Uint8Array.from(atob(s), function (c) { return c.charCodeAt(0); });
  }
  function enc(buf) {
    var bytes = new Uint8Array(buf);
    var s = '';
    for (var i = 0; i < bytes.length; i++) { s += String.fromCharCode(bytes[i]); }
    return btoa(s).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
  }
  function fail(message) {
    if (errorBox) { errorBox.textContent = message; errorBox.hidden = false; errorBox.focus(); }
  }
  function post(path, body) {
    return fetch(path, {
      method: 'POST', credentials: 'same-origin',
      headers: { 'Content-Type': 'application/json', 'X-CSRF-Token': csrf },
      body: JSON.stringify(body || {})
    }).then(function (r) {
      return r.text().then(function (t) {
        var j = null;
        try { j = t ? JSON.parse(t) : null; } catch (e) { j = null; }
        if (!r.ok) { throw new Error((j && j.error) || 'the server refused the request'); }
        return j;
      });
    });
  }

  var signin = document.getElementById('passkey-signin');
  if (signin) {
    signin.addEventListener('click', function () {
      post('/login/passkey/start').then(function (opts) {
        var o = opts.publicKey;
        o.challenge = dec(o.challenge);
        (o.allowCredentials || []).forEach(function (c) { c.id = dec(c.id); });
        return navigator.credentials.get({ publicKey: o });
      }).then(function (cred) {
        return post('/login/passkey/finish', {
          id: cred.id, rawId: enc(cred.rawId), type: cred.type,
          response: {
            authenticatorData: enc(cred.response.authenticatorData),
            clientDataJSON: enc(cred.response.clientDataJSON),
            signature: enc(cred.response.signature),
            userHandle: cred.response.userHandle ? enc(cred.response.userHandle) : null
          },
          extensions: cred.getClientExtensionResults()
        });
      }).then(function (j) {
        window.location.assign((j && j.location) || '/');
      }).catch(function (e) { fail('Passkey sign-in failed: ' + e.message); });
    });
  }

  var register = document.getElementById('passkey-register');
  if (register) {
    register.addEventListener('submit', function (ev) {
      ev.preventDefault();
      var name = document.getElementById('passkey-name').value || 'passkey';
      var code = document.getElementById('passkey-code').value || '';
      post('/account/passkeys/start', { code: code }).then(function (opts) {
        var o = opts.publicKey;
        o.challenge = dec(o.challenge);
        o.user.id = dec(o.user.id);
        (o.excludeCredentials || []).forEach(function (c) { c.id = dec(c.id); });
        return navigator.credentials.create({ publicKey: o });
      }).then(function (cred) {
        return post('/account/passkeys/finish', {
          name: name,
          credential: {
            id: cred.id, rawId: enc(cred.rawId), type: cred.type,
            response: {
              attestationObject: enc(cred.response.attestationObject),
              clientDataJSON: enc(cred.response.clientDataJSON)
            },
            extensions: cred.getClientExtensionResults()
          }
        });
      }).then(function () {
        window.location.assign('/account?done=passkey');
      }).catch(function (e) { fail('Passkey registration failed: ' + e.message); });
    });
  }
}());
