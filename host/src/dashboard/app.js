// The wasmtask dashboard's one script: keeps a server-rendered page live.
//
// - Listens to the page's SSE stream (body[data-stream]) and, on each event,
//   re-fetches the page's fragments ([data-fragment]) and the new rows of its
//   event trail (#trail), at most one refresh at a time (events arriving
//   meanwhile cause one more refresh, not one each).
// - Sends the actions (cancel, force, abort) to the /v1 API with the bearer
//   token the page asks for once and keeps in sessionStorage (this tab only).
//
// It never builds markup from data: fragments come rendered (and escaped)
// by the server, and messages are set with textContent.
'use strict';

(function () {
  const TOKEN_KEY = 'wasmtask.token';
  const KINDS = [
    'task.queued', 'task.started', 'task.log', 'task.progress', 'task.checkpoint',
    'task.cancel_requested', 'task.cancel_acknowledged', 'task.cancel_forced',
    'task.cancel_failed', 'task.succeeded', 'task.failed', 'task.timed_out',
    'task.canceled', 'task.lock_acquired', 'task.lock_released', 'run.created',
    'run.abort_requested', 'run.finished', 'change',
  ];
  // Most rows an event trail keeps on the page (the JSON events have all).
  const MAX_TRAIL_ROWS = 2000;

  const body = document.body;
  const authRequired = body.dataset.auth === 'token';
  const byId = (id) => document.getElementById(id);

  // ------------------------------------------------------------------
  // Live status
  // ------------------------------------------------------------------

  function setLive(state, text) {
    const el = byId('live-status');
    if (!el) return;
    el.dataset.state = state;
    el.textContent = text;
  }

  // ------------------------------------------------------------------
  // Refresh: fragments and trail rows, one at a time
  // ------------------------------------------------------------------

  let refreshing = false;
  let again = false;

  async function refresh() {
    if (refreshing) {
      again = true;
      return;
    }
    refreshing = true;
    try {
      do {
        again = false;
        await refreshOnce();
      } while (again);
    } finally {
      refreshing = false;
    }
  }

  async function refreshOnce() {
    const jobs = [];
    document.querySelectorAll('[data-fragment]').forEach((el) => jobs.push(loadFragment(el)));
    const trail = byId('trail');
    if (trail) jobs.push(loadTrail(trail));
    await Promise.all(jobs);
    syncActions();
  }

  async function loadFragment(el) {
    try {
      const r = await fetch(el.dataset.fragment, { cache: 'no-store' });
      const html = await r.text();
      if (r.ok) {
        el.innerHTML = html;
        stampElapsed(el);
        delete el.dataset.stale;
      } else {
        el.dataset.stale = 'true';
        setLive('down', 'cannot refresh (' + r.status + ')');
      }
    } catch (e) {
      el.dataset.stale = 'true';
      setLive('down', 'server unreachable');
    }
  }

  async function loadTrail(tbody) {
    // Pages of rows until the server says there are no more.
    for (let i = 0; i < 50; i++) {
      const after = tbody.dataset.after || '0';
      let r;
      try {
        r = await fetch(tbody.dataset.url + '?after=' + encodeURIComponent(after), { cache: 'no-store' });
      } catch (e) {
        setLive('down', 'server unreachable');
        return;
      }
      if (!r.ok) return;
      const html = await r.text();
      if (html) appendRows(tbody, html);
      const last = r.headers.get('x-wasmtask-last-seq');
      if (last) tbody.dataset.after = last;
      while (tbody.rows.length > MAX_TRAIL_ROWS) tbody.deleteRow(0);
      if (r.headers.get('x-wasmtask-more') !== 'true') return;
    }
  }

  // Appends server-rendered rows; a folded progress row that continues the
  // last one on the page (same task) replaces it, adding up the counts.
  function appendRows(tbody, html) {
    const tpl = document.createElement('template');
    tpl.innerHTML = '<table><tbody>' + html + '</tbody></table>';
    tpl.content.querySelectorAll('tr').forEach((row) => {
      const prev = tbody.rows[tbody.rows.length - 1];
      const a = prev && prev.querySelector('.fold');
      const b = row.querySelector('.fold');
      if (a && b && taskOf(prev) === taskOf(row)) {
        const p = Number(a.dataset.progress) + Number(b.dataset.progress);
        const c = Number(a.dataset.checkpoints) + Number(b.dataset.checkpoints);
        b.dataset.progress = p;
        b.dataset.checkpoints = c;
        b.textContent = '(' + p + ' progress report(s), ' + c + ' checkpoint(s))';
        prev.replaceWith(row);
      } else {
        tbody.appendChild(row);
      }
    });
  }

  // The task a trail row is about ('' on a task's own page).
  function taskOf(row) {
    const link = row.querySelector('td a.id');
    return link ? link.textContent : '';
  }

  // ------------------------------------------------------------------
  // Ticking times of tasks that have not ended
  // ------------------------------------------------------------------

  // `1.2s`, `340ms`, `2m 5s`: as the server writes them.
  function fmtSpan(ms) {
    if (ms < 1000) return Math.floor(ms) + 'ms';
    if (ms < 60000) return (Math.floor(ms / 100) / 10).toFixed(1) + 's';
    let s = Math.floor(ms / 1000);
    const parts = [];
    const d = Math.floor(s / 86400); s -= d * 86400;
    const h = Math.floor(s / 3600); s -= h * 3600;
    const m = Math.floor(s / 60); s -= m * 60;
    if (d) parts.push(d === 1 ? '1day' : d + 'days');
    if (h) parts.push(h + 'h');
    if (m) parts.push(m + 'm');
    if (s) parts.push(s + 's');
    return parts.join(' ');
  }

  // Notes when the elements under `root` were rendered.
  function stampElapsed(root) {
    const t0 = String(performance.now());
    root.querySelectorAll('.elapsed[data-elapsed]').forEach((el) => { el.dataset.t0 = t0; });
  }

  function tick() {
    const now = performance.now();
    document.querySelectorAll('.elapsed[data-elapsed]').forEach((el) => {
      const ms = Number(el.dataset.elapsed) + (now - Number(el.dataset.t0 || now));
      el.textContent = (el.dataset.prefix || '') + fmtSpan(ms);
    });
  }

  // ------------------------------------------------------------------
  // The stream
  // ------------------------------------------------------------------

  function follow() {
    const url = body.dataset.stream;
    if (!url) {
      setLive('ended', 'finished');
      return;
    }
    const ends = (body.dataset.streamEnd || '').split(' ').filter(Boolean);
    const es = new EventSource(url);
    es.onopen = () => setLive('live', 'live');
    es.onerror = () => {
      if (es.readyState === EventSource.CLOSED) setLive('down', 'disconnected');
      else setLive('retry', 'reconnecting…');
    };
    const onEvent = (ev) => {
      if (ends.includes(ev.type)) {
        es.close();
        setLive('ended', 'finished');
      }
      refresh();
    };
    KINDS.forEach((k) => es.addEventListener(k, onEvent));
    window.addEventListener('pagehide', () => es.close());
  }

  // ------------------------------------------------------------------
  // Token
  // ------------------------------------------------------------------

  let retryAfterToken = null;

  function token() {
    try {
      return sessionStorage.getItem(TOKEN_KEY);
    } catch (e) {
      return null;
    }
  }

  function showTokenStatus() {
    const el = byId('token-status');
    if (el) el.hidden = !token();
  }

  function askToken(why, retry) {
    retryAfterToken = retry;
    const form = byId('token-form');
    byId('token-why').textContent = why;
    form.hidden = false;
    byId('token-input').focus();
  }

  function setupToken() {
    const form = byId('token-form');
    if (!form) return;
    form.addEventListener('submit', (e) => {
      e.preventDefault();
      const input = byId('token-input');
      const value = input.value.trim();
      if (!value) return;
      try {
        sessionStorage.setItem(TOKEN_KEY, value);
      } catch (err) {
        say('error', 'This browser does not let the page keep the token: ' + err.message);
        return;
      }
      input.value = '';
      form.hidden = true;
      showTokenStatus();
      const retry = retryAfterToken;
      retryAfterToken = null;
      if (retry) act(retry);
    });
    byId('token-cancel').addEventListener('click', () => {
      form.hidden = true;
      if (retryAfterToken) say('error', 'Not sent: this server needs its token for actions.');
      retryAfterToken = null;
    });
    byId('token-forget').addEventListener('click', () => {
      try {
        sessionStorage.removeItem(TOKEN_KEY);
      } catch (e) { /* nothing kept */ }
      showTokenStatus();
    });
    showTokenStatus();
  }

  // ------------------------------------------------------------------
  // Actions
  // ------------------------------------------------------------------

  // What the last action is waiting for: 'cancel' or 'abort', until the
  // subject reaches a terminal state.
  let waiting = null;

  function say(kind, text) {
    const el = byId('action-result');
    if (!el) return;
    el.dataset.kind = kind;
    el.textContent = text;
  }

  async function post(path, payload) {
    const headers = { 'Content-Type': 'application/json', 'Accept': 'application/json' };
    const t = token();
    if (t) headers['Authorization'] = 'Bearer ' + t;
    const r = await fetch(path, { method: 'POST', headers, body: JSON.stringify(payload), cache: 'no-store' });
    let data = null;
    try {
      data = await r.json();
    } catch (e) { /* not JSON */ }
    return { status: r.status, data: data || {} };
  }

  // Runs an action, first asking for the token when the server needs one,
  // and again when the server refuses it.
  async function act(send) {
    if (authRequired && !token()) {
      askToken('', send);
      return;
    }
    const res = await send();
    if (res && res.status === 401) {
      try {
        sessionStorage.removeItem(TOKEN_KEY);
      } catch (e) { /* nothing kept */ }
      showTokenStatus();
      say('error', 'The server refused the token (401). Enter it again.');
      askToken('The token was refused.', send);
    }
  }

  function graceMs(inputId) {
    const text = byId(inputId).value.trim();
    if (text === '') return undefined;
    const s = Number(text);
    if (!Number.isFinite(s) || s < 0) return NaN;
    return Math.round(s * 1000);
  }

  function fmtMicros(us) {
    if (us == null) return '';
    if (us < 1000) return us + ' µs';
    if (us < 1e6) return (us / 1000).toFixed(2) + ' ms';
    return (us / 1e6).toFixed(2) + ' s';
  }

  function message(data, fallback) {
    return (data && data.message) || fallback;
  }

  function describeCancel(res) {
    const d = res.data;
    const t = d.task || {};
    const c = t.cancel || {};
    switch (res.status) {
      case 200:
        if (!t.started_at) say('ok', 'Canceled before it started.');
        else say('ok', 'Canceled: ' + (c.acknowledged ? 'the guest stopped by itself' : 'stopped by force') +
          (c.latency_us != null ? ' in ' + fmtMicros(c.latency_us) : '') + '.');
        waiting = null;
        break;
      case 202:
        say('busy', 'Cancel requested' + (c.grace_ms ? ' with ' + c.grace_ms / 1000 + ' s grace' : '') +
          ': waiting for the task to stop…');
        waiting = 'cancel';
        break;
      case 409:
        say('error', 'Refused (409): the task had already finished as ' + (t.state || 'finished').replace('_', ' ') +
          '; nothing was changed.');
        waiting = null;
        break;
      case 404:
        say('error', 'No such task (404).');
        break;
      case 401:
        break;
      case 503:
        say('error', 'The server is shutting down (503): ' + message(d, 'try again later'));
        break;
      default:
        say('error', 'Refused (' + res.status + '): ' + message(d, 'unexpected answer'));
    }
  }

  function describeAbort(res) {
    const d = res.data;
    switch (res.status) {
      case 200:
        say('ok', 'Aborted: every task of the run has ended.');
        waiting = null;
        break;
      case 202: {
        const open = (d.tasks || []).filter((t) => !['succeeded', 'failed', 'timed_out', 'canceled'].includes(t.state)).length;
        say('busy', 'Abort requested: stopping ' + open + ' task(s)…');
        waiting = 'abort';
        break;
      }
      case 409:
        say('error', 'Refused (409): the run had already finished; nothing was changed.');
        waiting = null;
        break;
      case 404:
        say('error', 'No such run (404).');
        break;
      case 401:
        break;
      case 503:
        say('error', 'The server is shutting down (503): ' + message(d, 'try again later'));
        break;
      default:
        say('error', 'Refused (' + res.status + '): ' + message(d, 'unexpected answer'));
    }
  }

  function cancelSender(force) {
    const form = byId('cancel-form');
    return async () => {
      const payload = {};
      const reason = byId('cancel-reason').value.trim();
      if (reason) payload.reason = reason;
      if (force) {
        payload.grace_ms = 0;
      } else {
        const g = graceMs('cancel-grace');
        if (Number.isNaN(g)) {
          say('error', 'Grace must be a number of seconds, 0 or more.');
          return null;
        }
        if (g !== undefined) payload.grace_ms = g;
      }
      say('busy', force ? 'Forcing the stop…' : 'Sending the cancel…');
      let res;
      try {
        res = await post('/v1/tasks/' + encodeURIComponent(form.dataset.task) + '/cancel', payload);
      } catch (e) {
        say('error', 'Could not reach the server: the cancel was not sent.');
        return null;
      }
      describeCancel(res);
      refresh();
      return res;
    };
  }

  function abortSender() {
    const form = byId('abort-form');
    return async () => {
      const payload = {};
      const reason = byId('abort-reason').value.trim();
      if (reason) payload.reason = reason;
      const g = graceMs('abort-grace');
      if (Number.isNaN(g)) {
        say('error', 'Grace must be a number of seconds, 0 or more.');
        return null;
      }
      if (g !== undefined) payload.grace_ms = g;
      say('busy', 'Sending the abort…');
      let res;
      try {
        res = await post('/v1/runs/' + encodeURIComponent(form.dataset.run) + '/abort', payload);
      } catch (e) {
        say('error', 'Could not reach the server: the abort was not sent.');
        return null;
      }
      describeAbort(res);
      refresh();
      return res;
    };
  }

  function setFormDisabled(form, disabled) {
    form.querySelectorAll('input, button').forEach((el) => {
      if (el.id !== 'force-btn') el.disabled = disabled;
    });
  }

  // Brings the action forms in line with the state the fragment shows.
  function syncActions() {
    const task = document.querySelector('#live .task');
    const cancelForm = byId('cancel-form');
    if (task && cancelForm) {
      const done = task.dataset.terminal === 'true';
      setFormDisabled(cancelForm, done);
      byId('force-btn').disabled = task.dataset.state !== 'cancel_requested';
      if (waiting === 'cancel' && done) {
        say(task.dataset.state === 'canceled' ? 'ok' : 'warn',
          'The task is now ' + task.dataset.state.replace('_', ' ') + '.');
        waiting = null;
      } else if (waiting === 'cancel' && byId('cancel-failed')) {
        say('warn', 'The cancel is recorded but could not be delivered (see above); retrying is safe.');
      }
    }
    const run = document.querySelector('#live .run');
    const abortForm = byId('abort-form');
    if (run && abortForm) {
      const done = run.dataset.terminal === 'true';
      setFormDisabled(abortForm, done);
      if (waiting === 'abort' && done) {
        say('ok', 'The run is now ' + run.dataset.state + '.');
        waiting = null;
      }
    }
  }

  function setupActions() {
    const cancelForm = byId('cancel-form');
    if (cancelForm) {
      cancelForm.addEventListener('submit', (e) => {
        e.preventDefault();
        act(cancelSender(false));
      });
      byId('force-btn').addEventListener('click', () => act(cancelSender(true)));
    }
    const abortForm = byId('abort-form');
    if (abortForm) {
      abortForm.addEventListener('submit', (e) => {
        e.preventDefault();
        act(abortSender());
      });
    }
    const r = byId('refresh');
    if (r) r.addEventListener('click', () => refresh());
  }

  setupToken();
  setupActions();
  stampElapsed(document);
  window.setInterval(tick, 1000);
  follow();
})();
