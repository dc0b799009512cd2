// stepup-authz passkey pages: WebAuthn ceremonies in the browser. The server checks
// everything; this only moves bytes between navigator.credentials and the JSON endpoints.
"use strict";
(function () {
  const main = document.getElementById("main");
  const status = document.getElementById("status");
  const d = main.dataset;

  function b64u(buf) {
    const bytes = new Uint8Array(buf);
    let s = "";
    for (const b of bytes) s += String.fromCharCode(b);
    return btoa(s).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }
  function unb64u(text) {
    const s = atob(text.replace(/-/g, "+").replace(/_/g, "/"));
    const out = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
    return out.buffer;
  }
  function say(text, isError) {
    status.textContent = text;
    status.className = isError ? "error" : "progress";
    status.focus();
  }
  async function post(path, body) {
    const resp = await fetch(d.api + path, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      body: JSON.stringify(body),
    });
    let doc = {};
    try { doc = await resp.json(); } catch (e) { doc = {}; }
    if (!resp.ok) {
      const err = new Error(doc.error || "The service refused (" + resp.status + ").");
      err.reference = doc.decision_id;
      throw err;
    }
    return doc;
  }
  function explain(err) {
    if (err && err.name === "NotAllowedError") {
      return "The security key did not answer, or you cancelled. You can try again.";
    }
    if (err && err.name === "InvalidStateError") {
      return "This security key is already registered.";
    }
    let text = (err && err.message) || "Something went wrong.";
    if (err && err.reference) text += " Reference: " + err.reference;
    return text;
  }
  function creds(list) {
    return (list || []).map((c) => Object.assign({}, c, { id: unb64u(c.id) }));
  }
  function credentialJSON(cred) {
    const r = cred.response;
    const response = { clientDataJSON: b64u(r.clientDataJSON) };
    if (r.attestationObject) {
      response.attestationObject = b64u(r.attestationObject);
      if (r.getTransports) response.transports = r.getTransports();
    } else {
      response.authenticatorData = b64u(r.authenticatorData);
      response.signature = b64u(r.signature);
      if (r.userHandle) response.userHandle = b64u(r.userHandle);
    }
    return {
      id: cred.id,
      rawId: b64u(cred.rawId),
      type: cred.type,
      response: response,
      clientExtensionResults: cred.getClientExtensionResults(),
      authenticatorAttachment: cred.authenticatorAttachment || null,
    };
  }
  const supported = !!(window.PublicKeyCredential && navigator.credentials);

  if (d.page === "stepup") {
    const go = document.getElementById("go");
    if (!supported) {
      go.disabled = true;
      if (d.fallback) {
        say("This browser cannot use security keys: taking you to your sign-in provider.");
        window.location.replace(d.fallback);
      } else {
        say("This browser cannot use security keys, and this page accepts nothing else.", true);
      }
      return;
    }
    go.addEventListener("click", async () => {
      go.disabled = true;
      try {
        say("Waiting for your security key…");
        const opts = await post("/authenticate/options",
          { level: d.level, rd: d.rd, ctx: d.ctx || "", tx: d.tx || "", st: d.st });
        const pk = opts.publicKey;
        pk.challenge = unb64u(pk.challenge);
        pk.allowCredentials = creds(pk.allowCredentials);
        const cred = await navigator.credentials.get({ publicKey: pk });
        say("Checking…");
        const done = await post("/authenticate/verify", { credential: credentialJSON(cred) });
        if (done.approved) {
          // A transaction: the approval is for the request shown, which the user submits
          // again from where they were (a redirect cannot replay a POST).
          say(done.approved);
          const back = document.getElementById("resubmit");
          back.hidden = false;
          back.querySelector("a").focus();
          return;
        }
        say("Done. Taking you back…");
        window.location.assign(done.redirect);
      } catch (err) {
        say(explain(err), true);
        go.disabled = false;
      }
    });
  }

  if (d.page === "keys") {
    const form = document.getElementById("enrol");
    if (form) {
      if (!supported) {
        form.querySelector("button").disabled = true;
        say("This browser cannot use security keys.", true);
      }
      form.addEventListener("submit", async (ev) => {
        ev.preventDefault();
        const name = document.getElementById("key-name").value.trim();
        if (!name) { say("Give the key a name first.", true); return; }
        try {
          say("Touch your security key to add it…");
          const opts = await post("/register/options", { name: name, for: d.for || "" });
          const pk = opts.publicKey;
          pk.challenge = unb64u(pk.challenge);
          pk.user.id = unb64u(pk.user.id);
          pk.excludeCredentials = creds(pk.excludeCredentials);
          const cred = await navigator.credentials.create({ publicKey: pk });
          say("Checking…");
          await post("/register/verify", { credential: credentialJSON(cred) });
          window.location.assign(d.self + (d.self.indexOf("?") < 0 ? "?" : "&") + "added=1");
        } catch (err) {
          say(explain(err), true);
        }
      });
    }
    for (const btn of document.querySelectorAll("button.remove")) {
      btn.addEventListener("click", async () => {
        btn.disabled = true;
        try {
          await post("/keys/remove", { credential_id: btn.dataset.credential });
          window.location.assign(d.self + (d.self.indexOf("?") < 0 ? "?" : "&") + "removed=1");
        } catch (err) {
          say(explain(err), true);
          btn.disabled = false;
        }
      });
    }
  }
})();
