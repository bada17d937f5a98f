"""The web console: the fleet, live, with the operators' levers (weight, on/off) and the audit trail.

A small Flask application (``pip install thriftprobe[console]``) served by werkzeug's threaded
server, on 127.0.0.1 by default. Every page and API call needs a login with the credentials of
``console.<env>`` in the config file; state-changing calls also need the session's CSRF token,
so another site cannot drive a logged-in browser. Changes go through ``Governance.set_node`` and
``Governance.set_limit`` / ``clear_limit``: the same rules, persistence, push and audit as the
CLI, with the console user as the actor.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import threading
from typing import Any, Callable, Optional

from ..config import Config, ConsoleConfig
from ..errors import InvalidArgument, ThriftProbeError
from .governance import Governance
from .live import History, Sampler

__all__ = ["ConsoleServer", "create_app", "serve", "stop_live"]

log = logging.getLogger(__name__)


def create_app(gov: Governance, console: ConsoleConfig, prometheus: Optional[str] = None) -> Any:
    """Build the Flask app over a Governance that the caller owns (and closes). The live figures
    are sampled every second from the first visit of the live page on, from the providers'
    metrics endpoints (or the Prometheus at ``prometheus``); ``stop_live(app)`` ends that."""
    try:
        from flask import Flask, jsonify, redirect, render_template_string, request, session, url_for
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ThriftProbeError("the web console needs Flask: pip install 'thriftprobe[console]'") from err

    app = Flask("thriftprobe.console")
    app.config.update(
        SECRET_KEY=secrets.token_bytes(32),  # sessions end when the console restarts
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
    )

    def logged_in() -> bool:
        return session.get("user") == console.username

    def check_csrf() -> bool:
        sent = request.headers.get("X-CSRF-Token", "")
        return bool(sent) and hmac.compare_digest(sent, session.get("csrf", ""))

    @app.get("/login")
    def login_form() -> Any:
        return render_template_string(_LOGIN_PAGE, error=None, env=gov.env)

    @app.post("/login")
    def login() -> Any:
        # Compare bytes: compare_digest refuses non-ASCII str.
        user_ok = hmac.compare_digest(request.form.get("username", "").encode(), console.username.encode())
        pass_ok = hmac.compare_digest(request.form.get("password", "").encode(), console.password.encode())
        if not (user_ok and pass_ok):
            # The attempted name is not logged: it is often a password typed in the wrong field.
            log.warning("console: failed login from %s", request.remote_addr)
            return render_template_string(_LOGIN_PAGE, error="Wrong user name or password.", env=gov.env), 401
        session.clear()
        session["user"] = console.username
        session["csrf"] = secrets.token_urlsafe(32)
        log.info("console: %s logged in from %s", console.username, request.remote_addr)
        return redirect(url_for("index"))

    @app.post("/logout")
    def logout() -> Any:
        session.clear()
        return redirect(url_for("login_form"))

    @app.get("/")
    def index() -> Any:
        if not logged_in():
            return redirect(url_for("login_form"))
        return render_template_string(_MAIN_PAGE, env=gov.env, user=session["user"], csrf=session["csrf"])

    @app.get("/api/fleet")
    def api_fleet() -> Any:
        if not logged_in():
            return jsonify(error="login required"), 401
        return jsonify(env=gov.env, nodes=[n.to_dict() for n in gov.fleet()])

    @app.get("/api/history")
    def api_history() -> Any:
        if not logged_in():
            return jsonify(error="login required"), 401
        return jsonify(entries=[e.to_dict() for e in gov.history(limit=20)])

    @app.get("/dependencies")
    def dependencies() -> Any:
        if not logged_in():
            return redirect(url_for("login_form"))
        return render_template_string(_DEPENDENCIES_PAGE, env=gov.env, user=session["user"])

    @app.get("/api/callers")
    def api_callers() -> Any:
        if not logged_in():
            return jsonify(error="login required"), 401
        try:
            return jsonify(gov.callers().to_dict())
        except ThriftProbeError as err:
            return jsonify(error="%s: %s" % (type(err).__name__, err)), 502

    history = History(Sampler(gov, prometheus=prometheus), interval=1.0, window=5.0, keep=300.0)
    app.extensions["thriftprobe_live"] = history

    @app.get("/live")
    def live_page() -> Any:
        if not logged_in():
            return redirect(url_for("login_form"))
        history.start()
        return render_template_string(_LIVE_PAGE, env=gov.env, user=session["user"],
                                      origin=prometheus or "the providers' metrics endpoints")

    @app.get("/api/live")
    def api_live() -> Any:
        if not logged_in():
            return jsonify(error="login required"), 401
        history.start()
        return jsonify(env=gov.env, **history.snapshot())

    @app.get("/api/limits")
    def api_limits() -> Any:
        if not logged_in():
            return jsonify(error="login required"), 401
        try:
            return jsonify(env=gov.env, services=[v.to_dict() for v in gov.limits()],
                           history=[e.to_dict() for e in gov.limits_history(limit=20)])
        except ThriftProbeError as err:
            return jsonify(error="%s: %s" % (type(err).__name__, err)), 502

    @app.post("/api/limit")
    def api_limit() -> Any:
        if not logged_in():
            return jsonify(error="login required"), 401
        if not check_csrf():
            return jsonify(error="missing or wrong CSRF token"), 403
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            return jsonify(error="expected a JSON object"), 400
        names = [body.get(k) for k in ("appkey", "service", "method")]
        actor = "console:" + session["user"]
        try:
            if not all(isinstance(n, str) for n in names):
                raise InvalidArgument("appkey, service and method must be strings")
            appkey, service, method = (str(n) for n in names)
            if body.get("clear") is True:
                change = gov.clear_limit(appkey, service, method, actor=actor)
                if change is None:
                    return jsonify(error="%s/%s %s has no limits: nothing to clear" % (appkey, service, method)), 404
            else:
                change = gov.set_limit(appkey, service, method, qps=body.get("qps"), burst=body.get("burst"),
                                       concurrency=body.get("concurrency"), actor=actor)
        except InvalidArgument as err:
            return jsonify(error=str(err)), 400
        except ThriftProbeError as err:
            return jsonify(error="%s: %s" % (type(err).__name__, err)), 502
        return jsonify(change=change.to_dict())

    @app.post("/api/node")
    def api_node() -> Any:
        if not logged_in():
            return jsonify(error="login required"), 401
        if not check_csrf():
            return jsonify(error="missing or wrong CSRF token"), 403
        body = request.get_json(silent=True) or {}
        try:
            port = body.get("port")
            if not isinstance(port, int):
                raise InvalidArgument("port must be an integer")
            valid = body.get("valid")
            if valid is not None and not isinstance(valid, bool):
                raise InvalidArgument("valid must be true or false")
            change = gov.set_node(
                str(body.get("appkey", "")),
                str(body.get("service", "")),
                str(body.get("host", "")),
                port,
                weight=body.get("weight"),
                valid=valid,
                actor="console:" + session["user"],
            )
        except InvalidArgument as err:
            return jsonify(error=str(err)), 400
        except ThriftProbeError as err:
            return jsonify(error="%s: %s" % (type(err).__name__, err)), 502
        return jsonify(change=change.to_dict())

    return app


def stop_live(app: Any) -> None:
    """Stop the live figures' sampling thread of an app made by create_app."""
    history = app.extensions.get("thriftprobe_live")
    if history is not None:
        history.stop()


class ConsoleServer:
    """The console on a werkzeug threaded server, in a background thread (``thriftprobe-console``)."""

    def __init__(self, cfg: Config, console: ConsoleConfig, host: str = "127.0.0.1", port: int = 8700,
                 prometheus: Optional[str] = None) -> None:
        from werkzeug.serving import make_server

        self._gov = Governance(cfg, source="console")
        try:
            self._app = create_app(self._gov, console, prometheus)
            self._server = make_server(host, port, self._app, threaded=True)
        except BaseException:
            self._gov.close()
            raise
        self.host = host
        self.port: int = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, name="thriftprobe-console", daemon=True)

    @property
    def url(self) -> str:
        return "http://%s:%d/" % (self.host, self.port)

    def start(self) -> "ConsoleServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()
        stop_live(self._app)
        self._gov.close()

    def __enter__(self) -> "ConsoleServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(cfg: Config, console: ConsoleConfig, host: str, port: int, out: Callable[[str], None],
          prometheus: Optional[str] = None) -> None:
    """Serve until Ctrl-C (the ``thriftprobe console`` command)."""
    server = ConsoleServer(cfg, console, host, port, prometheus)
    out("thriftprobe console for env %s on %s (Ctrl-C stops)" % (cfg.env, server.url))
    server.start()
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #1d2330; background: #f5f6f8; }
header { background: #1d2330; color: #fff; padding: 10px 20px; display: flex; align-items: center; gap: 16px; }
header h1 { font-size: 17px; margin: 0; } header .env { background: #3b82f6; border-radius: 4px; padding: 1px 8px; }
header form { margin-left: auto; } main { padding: 16px 20px; }
table { border-collapse: collapse; width: 100%; background: #fff; margin-bottom: 20px; }
th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid #e4e7ec; }
th { background: #eef0f4; font-weight: 600; }
.on { color: #15803d; font-weight: 600; } .off { color: #b91c1c; font-weight: 600; }
.offline { color: #6b7280; } .live { color: #15803d; } .corrupt { color: #b45309; font-weight: 600; }
input[type=number] { width: 70px; } button { cursor: pointer; }
#status { min-height: 20px; margin-bottom: 8px; } .error { color: #b91c1c; }
.login { max-width: 320px; margin: 80px auto; background: #fff; padding: 24px; border-radius: 8px; }
.login input { width: 100%; margin: 4px 0 12px; padding: 6px; box-sizing: border-box; }
"""

_LOGIN_PAGE = (
    """<!doctype html><html><head><meta charset="utf-8"><title>thriftprobe console - login</title>
<style>"""
    + _STYLE
    + """</style></head><body>
<form class="login" method="post" action="/login">
  <h2>thriftprobe console ({{ env }})</h2>
  {% if error %}<p class="error" id="login-error">{{ error }}</p>{% endif %}
  <label>User name <input name="username" id="username" autocomplete="username" autofocus></label>
  <label>Password <input name="password" id="password" type="password" autocomplete="current-password"></label>
  <button type="submit" id="login">Log in</button>
</form></body></html>"""
)

_MAIN_PAGE = (
    """<!doctype html><html><head><meta charset="utf-8"><title>thriftprobe console - {{ env }}</title>
<meta name="csrf-token" content="{{ csrf }}"><style>"""
    + _STYLE
    + """</style></head><body>
<header><h1>thriftprobe</h1><span class="env">env {{ env }}</span>
<a href="/live" id="nav-live" style="color:#fff">live calls</a>
<a href="/dependencies" id="nav-dependencies" style="color:#fff">who calls whom</a><span id="updated"></span>
<form method="post" action="/logout">{{ user }} <button type="submit">Log out</button></form></header>
<main>
<p><input id="filter" placeholder="filter: appkey, service or host" size="40">
<label><input type="checkbox" id="hide-offline"> hide offline nodes</label></p>
<div id="status"></div>
<table id="fleet"><thead><tr><th>appkey</th><th>service</th><th>node</th><th>weight</th><th>switch</th>
<th>state</th><th>uptime</th><th>change</th></tr></thead><tbody></tbody></table>
<h3>Request limits <small>(per provider node; method * = the service as a whole)</small></h3>
<table id="limits"><thead><tr><th>appkey</th><th>service</th><th>method</th><th>limits</th><th>rev</th><th>pushed</th>
<th>change</th></tr></thead><tbody></tbody></table>
<form id="limit-form"><input id="limit-appkey" placeholder="appkey" required>
<input id="limit-service" placeholder="service" required> <input id="limit-method" placeholder="method or *" required>
qps <input id="limit-qps" type="number" min="0" step="any"> burst <input id="limit-burst" type="number" min="1">
concurrency <input id="limit-concurrency" type="number" min="1">
<button type="submit" id="limit-set">Set limits</button> <button type="button" id="limit-clear">Clear limits</button>
</form>
<h3>Recent changes</h3>
<table id="history"><thead><tr><th>when</th><th>who</th><th>node</th><th>old</th><th>new</th><th>live</th></tr>
</thead><tbody></tbody></table>
<h3>Recent changes of limits</h3>
<table id="limits-history"><thead><tr><th>when</th><th>who</th><th>method</th><th>old</th><th>new</th><th>rev</th>
<th>pushed</th></tr></thead><tbody></tbody></table>
</main>
<script>
const csrf = document.querySelector('meta[name=csrf-token]').content;
const esc = s => String(s).replace(/[&<>"']/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;',"'":'&#39;'}[c]));
const uptime = s => s === null ? '-'
                 : s < 3600 ? Math.floor(s/60)+'m'+String(Math.floor(s%60)).padStart(2,'0')+'s'
                 : Math.floor(s/3600)+'h'+String(Math.floor(s%3600/60)).padStart(2,'0')+'m';
function status(text, error) { const el = document.getElementById('status'); el.textContent = text;
                               el.className = error ? 'error' : ''; }
async function api(path, body) {
  const r = await fetch(path, body ? {method: 'POST', headers: {'Content-Type': 'application/json',
                                      'X-CSRF-Token': csrf}, body: JSON.stringify(body)} : {});
  if (r.status === 401) { location.href = '/login'; throw new Error('login required'); }
  const data = await r.json();
  if (!r.ok) throw new Error(data.error || r.statusText);
  return data;
}
let lastNodes = [];
function renderFleet(nodes) {
  lastNodes = nodes;
  const editing = document.activeElement && document.activeElement.matches('input.weight');
  if (editing) return;  // do not overwrite what the operator is typing
  const words = document.getElementById('filter').value.toLowerCase().split(/ +/).filter(Boolean);
  const hideOffline = document.getElementById('hide-offline').checked;
  const shown = nodes.filter(n => !(hideOffline && n.state === 'offline') &&
    words.every(w => `${n.appkey} ${n.service} ${n.host}:${n.port}`.toLowerCase().includes(w)));
  document.querySelector('#fleet tbody').innerHTML = shown.map(n => {
    const id = `${n.appkey}/${n.service}/${n.host}:${n.port}`;
    const onoff = n.valid === null ? '-' : (n.valid ? 'on' : 'off');
    return `<tr data-node="${esc(id)}"><td>${esc(n.appkey)}</td><td>${esc(n.service)}</td>
      <td>${esc(n.host)}:${n.port}</td><td class="weight-value">${n.weight === null ? '-' : n.weight}</td>
      <td class="${onoff} switch">${onoff}</td>
      <td class="${n.state} state" title="${esc(n.problem || '')}">${n.state}</td><td>${uptime(n.uptime)}</td>
      <td><input class="weight" type="number" min="0" max="1000" value="${n.weight === null ? '' : n.weight}">
          <button class="set-weight">Set weight</button>
          <button class="toggle">${n.valid ? 'Disable' : 'Enable'}</button></td></tr>`;
  }).join('') || '<tr><td colspan="8">no nodes</td></tr>';
}
function renderHistory(entries) {
  const onoff = v => v === null ? '' : (v ? 'on' : 'off');
  document.querySelector('#history tbody').innerHTML = entries.map(e => `<tr><td>${esc(e.changed_at)}</td>
    <td>${esc(e.actor)}</td><td>${esc(e.appkey)}/${esc(e.service)} ${esc(e.host)}:${e.port}</td>
    <td>${e.old_weight === null ? 'none' : e.old_weight + ' ' + onoff(e.old_valid)}</td>
    <td>${e.new_weight === null ? esc(e.action) : e.new_weight + ' ' + onoff(e.new_valid)}</td>
    <td>${e.live ? 'yes' : 'no'}</td></tr>`).join('');
}
const describeLimit = l => !l ? 'none' : [l.qps !== undefined ? `qps ${l.qps}` : '',
  l.burst !== undefined ? `burst ${l.burst}` : '', l.concurrency !== undefined ? `concurrency ${l.concurrency}` : '']
  .filter(Boolean).join(' ');
function limitsStatus(v) {
  if (v.in_step) return ['on', 'yes'];
  if (v.methods === null) return ['off', (v.recorded ? 'record CORRUPT' : 'record LOST') +
    `; providers follow the pushed rev ${v.pushed_rev}`];
  if (v.pushed_methods === null) return ['off', 'NOT PUSHED'];
  const record = `record rev ${v.rev}: ` + (Object.entries(v.methods).map(([m, l]) => `${m} ${describeLimit(l)}`)
    .join(', ') || 'no limits');
  return ['off', {pushed: `DIFFERS: providers follow the pushed rev ${v.pushed_rev}; ${record}`,
    record: `NOT PUSHED (pushed rev ${v.pushed_rev}); providers follow the record from their next audit`,
    either: `DIFFERS at rev ${v.rev}: providers keep the one they saw first; ${record}`}[v.follows]];
}
function renderLimits(data) {
  document.querySelector('#limits tbody').innerHTML = data.services.flatMap(v => {
    const shown = v.follows === 'pushed' ? v.pushed_methods : v.methods;  // the limits in force
    if (shown === null) return [`<tr><td>${esc(v.appkey)}</td><td>${esc(v.service)}</td><td colspan="5"
      class="corrupt">corrupt: ${esc(v.problem)}</td></tr>`];
    const [cls, text] = limitsStatus(v);
    const rev = v.follows === 'pushed' ? v.pushed_rev : v.rev;
    const rows = Object.entries(shown);
    if (!rows.length && v.in_step) return [];
    return (rows.length ? rows : [['(none)', null]]).map(([m, l]) => `<tr
      data-limit="${esc(v.appkey)}/${esc(v.service)}/${esc(m)}">
      <td>${esc(v.appkey)}</td><td>${esc(v.service)}</td><td>${esc(m)}</td>
      <td class="limit">${esc(describeLimit(l))}</td>
      <td>${rev}</td><td class="${cls}">${esc(text)}</td>
      <td>${l ? '<button class="clear-limit">Clear</button>' : ''}</td></tr>`);
  }).join('') || '<tr><td colspan="7">no limits set</td></tr>';
  document.querySelector('#limits-history tbody').innerHTML = data.history.map(e => `<tr><td>${esc(e.changed_at)}</td>
    <td>${esc(e.actor)}</td><td>${esc(e.appkey)}/${esc(e.service)} ${esc(e.method)}</td>
    <td>${esc(describeLimit(e.old))}</td><td>${esc(describeLimit(e.new))}</td><td>${e.rev}</td>
    <td>${e.pushed ? 'yes' : 'no'}</td></tr>`).join('');
}
async function changeLimit(body, what) {
  if (!confirm(`${what}?`)) return;
  try {
    const r = await api('/api/limit', body);
    const warnings = (r.change.warnings || []).map(w => ' WARNING: ' + w).join('');
    status(`${what}: stored (rev ${r.change.rev}) and pushed to the running providers.${warnings}`,
           warnings !== '');
  } catch (e) { status(`${what} failed: ${e.message}`, true); }
  refresh();
}
const num = id => { const v = document.getElementById(id).value; return v === '' ? null : Number(v); };
const limitTarget = () => ({appkey: document.getElementById('limit-appkey').value,
  service: document.getElementById('limit-service').value, method: document.getElementById('limit-method').value});
document.getElementById('limit-form').addEventListener('submit', ev => {
  ev.preventDefault(); const t = limitTarget();
  changeLimit({...t, qps: num('limit-qps'), burst: num('limit-burst'), concurrency: num('limit-concurrency')},
              `Set the limits of ${t.appkey}/${t.service} ${t.method}`);
});
document.getElementById('limit-clear').addEventListener('click', () => {
  const t = limitTarget(); changeLimit({...t, clear: true}, `Clear the limits of ${t.appkey}/${t.service} ${t.method}`);
});
document.querySelector('#limits').addEventListener('click', ev => {
  const row = ev.target.closest('tr[data-limit]'); if (!row || !ev.target.matches('button.clear-limit')) return;
  const parts = row.dataset.limit.split('/'); const [appkey, service] = parts; const method = parts.slice(2).join('/');
  changeLimit({appkey, service, method, clear: true}, `Clear the limits of ${appkey}/${service} ${method}`);
});
async function refresh() {
  try {
    const [fleet, hist, lim] = await Promise.all([api('/api/fleet'), api('/api/history'), api('/api/limits')]);
    renderFleet(fleet.nodes); renderHistory(hist.entries); renderLimits(lim);
    document.getElementById('updated').textContent = 'updated ' + new Date().toLocaleTimeString();
  } catch (e) { status('Refresh failed: ' + e.message, true); }
}
document.querySelector('#fleet').addEventListener('click', async ev => {
  const row = ev.target.closest('tr[data-node]'); if (!row || ev.target.tagName !== 'BUTTON') return;
  const [appkey, service, addr] = row.dataset.node.split('/');
  const i = addr.lastIndexOf(':'); const host = addr.slice(0, i), port = Number(addr.slice(i + 1));
  const body = {appkey, service, host, port}; let what;
  if (ev.target.classList.contains('toggle')) {
    body.valid = ev.target.textContent === 'Enable'; what = (body.valid ? 'Enable ' : 'Disable ') + addr;
  } else {
    body.weight = Number(row.querySelector('input.weight').value); what = `Set weight ${body.weight} on ${addr}`;
  }
  if (!confirm(`${what} of ${appkey}/${service}?`)) return;
  try {
    const r = await api('/api/node', body);
    status(`${what}: done${r.change.live ? '' : ' (node not live: applies when it starts)'}`, false);
  } catch (e) { status(`${what} failed: ${e.message}`, true); }
  document.activeElement.blur(); refresh();
});
document.getElementById('filter').addEventListener('input', () => renderFleet(lastNodes));
document.getElementById('hide-offline').addEventListener('change', () => renderFleet(lastNodes));
refresh(); setInterval(refresh, 1000);
</script></body></html>"""
)

# The dependency view: who calls whom, from the consumers' entries in the registry.
_DEPENDENCIES_PAGE = (
    """<!doctype html><html><head><meta charset="utf-8"><title>thriftprobe console - {{ env }} - who calls whom</title>
<style>"""
    + _STYLE
    + """ td.hosts { color: #4b5563; } .none { color: #6b7280; }</style></head><body>
<header><h1>thriftprobe</h1><span class="env">env {{ env }}</span>
<a href="/" id="nav-fleet" style="color:#fff">fleet</a><span id="updated"></span>
<form method="post" action="/logout">{{ user }} <button type="submit">Log out</button></form></header>
<main>
<p>Each client registers itself as a consumer of the service it calls, under the appkey of the application
making the calls (<code>build_client(..., caller=)</code>, or <code>client.{{ env }}.caller</code> in the config).</p>
<div id="status"></div>
<h3>Who calls each service</h3>
<table id="callers-by-service"><thead><tr><th>service</th><th>caller</th><th>clients</th><th>hosts</th></tr></thead>
<tbody></tbody></table>
<h3>What each caller calls</h3>
<table id="calls-by-caller"><thead><tr><th>caller</th><th>service</th><th>clients</th><th>hosts</th></tr></thead>
<tbody></tbody></table>
</main>
<script>
const esc = s => String(s).replace(/[&<>"']/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;',"'":'&#39;'}[c]));
function status(text, error) { const el = document.getElementById('status'); el.textContent = text;
                               el.className = error ? 'error' : ''; }
const none = cols => `<tr><td colspan="${cols}" class="none">no consumers registered</td></tr>`;
function render(deps) {
  document.querySelector('#callers-by-service tbody').innerHTML = deps.services.flatMap(s => s.callers.map(c =>
    `<tr data-service="${esc(s.appkey)}/${esc(s.service)}" data-caller="${esc(c.caller)}">
     <td>${esc(s.appkey)}/${esc(s.service)}</td><td class="caller">${esc(c.caller)}</td>
     <td class="count">${c.count}</td><td class="hosts">${c.hosts.map(esc).join(', ')}</td></tr>`)).join('') || none(4);
  document.querySelector('#calls-by-caller tbody').innerHTML = deps.callers.flatMap(c => c.calls.map(s =>
    `<tr data-caller="${esc(c.caller)}" data-service="${esc(s.appkey)}/${esc(s.service)}">
     <td class="caller">${esc(c.caller)}</td><td>${esc(s.appkey)}/${esc(s.service)}</td>
     <td class="count">${s.count}</td><td class="hosts">${s.hosts.map(esc).join(', ')}</td></tr>`)).join('') || none(4);
}
async function refresh() {
  try {
    const r = await fetch('/api/callers');
    if (r.status === 401) { location.href = '/login'; return; }
    const data = await r.json();
    if (!r.ok) throw new Error(data.error || r.statusText);
    render(data); status('', false);
    document.getElementById('updated').textContent = 'updated ' + new Date().toLocaleTimeString();
  } catch (e) { status('Refresh failed: ' + e.message, true); }
}
refresh(); setInterval(refresh, 2000);
</script></body></html>"""
)

# The live view: QPS, error rate, p50 and p99 per service, node and method, with charts of the
# last minutes (plain SVG drawn by the page's own script: no CDN).
_LIVE_PAGE = (
    """<!doctype html><html><head><meta charset="utf-8"><title>thriftprobe console - {{ env }} - live calls</title>
<style>"""
    + _STYLE
    + """ td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.svc td { font-weight: 600; background: #f8fafc; }
tr.method td:first-child { padding-left: 26px; color: #4b5563; } tr.node td:first-child { padding-left: 14px; }
tr.node-method td:first-child { padding-left: 40px; color: #4b5563; }
.card { background: #fff; padding: 10px 14px; margin-bottom: 14px; border-radius: 6px; }
.card h3 { margin: 0 0 6px; font-size: 15px; } .legend span { margin-right: 14px; } .legend i { display: inline-block;
width: 10px; height: 10px; margin-right: 4px; border-radius: 2px; }
svg.chart { background: #fbfcfd; border: 1px solid #e4e7ec; }
.bad { color: #b91c1c; font-weight: 600; } .muted { color: #6b7280; }</style></head><body>
<header><h1>thriftprobe</h1><span class="env">env {{ env }}</span>
<a href="/" id="nav-fleet" style="color:#fff">fleet</a>
<a href="/dependencies" id="nav-dependencies" style="color:#fff">who calls whom</a><span id="updated"></span>
<form method="post" action="/logout">{{ user }} <button type="submit">Log out</button></form></header>
<main>
<p class="muted">Calls answered by the providers, read every second from {{ origin }}: figures over the last
5 seconds; charts over the last minutes (calls per second per node, and p99 latency).</p>
<p><input id="filter" placeholder="filter: appkey, service or node" size="40"></p>
<div id="status"></div>
<div id="charts"></div>
<table id="live"><thead><tr><th>service / node / #method</th><th>QPS</th><th>errors</th><th>p50 ms</th><th>p99 ms</th>
<th>calls (5 s)</th><th>QPS, last minutes</th></tr></thead><tbody></tbody></table>
</main>
<script>
const esc = s => String(s).replace(/[&<>"']/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;',"'":'&#39;'}[c]));
const COLORS = ['#2563eb', '#dc2626', '#16a34a', '#d97706', '#7c3aed', '#0891b2', '#db2777', '#4b5563'];
function status(text, error) { const el = document.getElementById('status'); el.textContent = text;
                               el.className = error ? 'error' : ''; }
const fmt = (v, d) => v === null || v === undefined ? '-' : Number(v).toFixed(d);
// One SVG chart: series = [{name, color, values}], values aligned on the points' times.
function chart(series, width, height, opts) {
  const all = series.flatMap(s => s.values.filter(v => v !== null));
  const max = Math.max(1e-9, ...all) * 1.1, n = Math.max(2, ...series.map(s => s.values.length));
  const x = i => (i * (width - 2) / (n - 1) + 1).toFixed(1), y = v => (height - 1 - v * (height - 2) / max).toFixed(1);
  const lines = series.map(s => {
    const pts = s.values.map((v, i) => v === null ? null : x(i + n - s.values.length) + ',' + y(v)).filter(Boolean);
    return `<polyline fill="none" stroke="${s.color}" stroke-width="1.5" points="${pts.join(' ')}"
             data-series="${esc(s.name)}" data-values="${s.values.map(v => v === null ? '' : v).join(',')}"/>`;
  }).join('');
  const label = opts && opts.label
    ? `<text x="4" y="12" font-size="10" fill="#6b7280">${esc(opts.label)} max ${fmt(max / 1.1, 1)}</text>` : '';
  return `<svg class="chart" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}">
          ${label}${lines}</svg>`;
}
function row(cls, id, label, f, spark) {
  const err = f.error_rate > 0 ? 'bad' : '';
  return `<tr class="${cls}" data-row="${esc(id)}"><td>${esc(label)}</td><td class="num qps">${fmt(f.qps, 1)}</td>
    <td class="num ${err} err">${fmt(100 * f.error_rate, 1)}%</td><td class="num p50">${fmt(f.p50_ms, 2)}</td>
    <td class="num p99">${fmt(f.p99_ms, 2)}</td><td class="num calls">${f.calls}</td><td>${spark}</td></tr>`;
}
function render(data) {
  const points = data.points, figures = data.figures;
  const values = (id, k) => points.map(p => p.rows[id] ? p.rows[id][k] : null);
  const spark = id => chart([{name: id, color: '#2563eb', values: values(id, 0)}], 160, 26);
  const words = document.getElementById('filter').value.toLowerCase().split(/ +/).filter(Boolean);
  const services = (figures ? figures.services : []).filter(s =>
    words.every(w => `${s.appkey}/${s.service} ${s.nodes.map(n => n.node).join(' ')}`.toLowerCase().includes(w)));
  let rows = '', cards = '';
  for (const s of services) {
    const sid = `${s.appkey}/${s.service}`;
    rows += row('svc', sid, sid, s, spark(sid));
    for (const m of s.methods.filter(m => m.calls)) {
      rows += row('method', `${sid}#${m.method}`, '#' + m.method, m, spark(`${sid}#${m.method}`));
    }
    const line = k => (n, i) =>
      ({name: n.node, color: COLORS[i % COLORS.length], values: values(`${sid}/${n.node}`, k)});
    const series = s.nodes.map(line(0)), p99 = s.nodes.map(line(3));
    s.nodes.forEach((n, i) => {
      const nid = `${sid}/${n.node}`;
      rows += row('node', nid, n.node, n, spark(nid));
      for (const m of n.methods.filter(m => m.calls)) {
        rows += row('node-method', `${nid}#${m.method}`, '#' + m.method, m, spark(`${nid}#${m.method}`));
      }
    });
    cards += `<div class="card" data-service="${esc(sid)}"><h3>${esc(sid)}: ${fmt(s.qps, 1)} calls/s,
      ${fmt(100 * s.error_rate, 1)}% errors, p50 ${fmt(s.p50_ms, 2)} ms, p99 ${fmt(s.p99_ms, 2)} ms</h3>
      <div class="legend">${series.map(x =>
        `<span><i style="background:${x.color}"></i>${esc(x.name)}</span>`).join('')}</div>
      <span class="qps-chart">${chart(series, 560, 120, {label: 'calls/s per node'})}</span>
      <span class="p99-chart">${chart(p99, 360, 120, {label: 'p99 ms per node'})}</span></div>`;
  }
  document.getElementById('charts').innerHTML = cards;
  document.querySelector('#live tbody').innerHTML = rows ||
    '<tr><td colspan="7" class="muted">no figures yet (providers show here when started with metrics_port)</td></tr>';
  const problems = (data.stale ? [`figures are ${fmt(data.age, 0)} s old: sampling is behind`] : [])
    .concat(data.failure ? ['sampling failed: ' + data.failure] : [])
    .concat(data.unreachable.length ? ['unreachable: ' + data.unreachable.join(', ')] : []);
  status(problems.join('; '), problems.length > 0);
}
let last = null;
async function refresh() {
  try {
    const r = await fetch('/api/live');
    if (r.status === 401) { location.href = '/login'; return; }
    const data = await r.json();
    if (!r.ok) throw new Error(data.error || r.statusText);
    last = data; render(data);
    document.getElementById('updated').textContent = 'updated ' + new Date().toLocaleTimeString();
  } catch (e) { status('Refresh failed: ' + e.message, true); }
}
document.getElementById('filter').addEventListener('input', () => last && render(last));
refresh(); setInterval(refresh, 1000);
</script></body></html>"""
)
