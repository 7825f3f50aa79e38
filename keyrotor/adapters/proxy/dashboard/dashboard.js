// keyrotor operator dashboard: plain ES2020, no framework, no external resource.
// Every server string reaches the DOM through textContent (never innerHTML).
'use strict';

(() => {
  const TOKEN_KEY = 'keyrotor.adminToken';
  const TABS = ['pool', 'usage', 'performance', 'models', 'routes', 'alerts'];
  const STATES = ['healthy', 'recovering', 'degraded', 'rate_limited', 'depleted', 'failed', 'disabled'];
  const USABLE = new Set(['healthy', 'recovering']);
  const RANGES = {
    '1h': { ms: 3600e3, group: 'minute' },
    '24h': { ms: 86400e3, group: 'hour' },
    '7d': { ms: 7 * 86400e3, group: 'hour' },
    '30d': { ms: 30 * 86400e3, group: 'day' },
  };
  const STEP = { minute: 60e3, hour: 3600e3, day: 86400e3 };
  const SVGNS = 'http://www.w3.org/2000/svg';
  const COLORS = ['#3b82f6', '#ef4444', '#10b981', '#f59e0b', '#8b5cf6', '#ec4899', '#14b8a6', '#64748b'];

  const $ = (sel, root = document) => root.querySelector(sel);
  const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));

  // ------------------------------------------------------------ DOM helpers

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    if (attrs) {
      for (const [k, v] of Object.entries(attrs)) {
        if (v === null || v === undefined || v === false) continue;
        if (k === 'text') node.textContent = String(v);
        else if (k === 'class') node.className = v;
        else if (k === 'dataset') Object.assign(node.dataset, v);
        else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
        else if (v === true) node.setAttribute(k, '');
        else node.setAttribute(k, String(v));
      }
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  function svgEl(tag, attrs, text) {
    const node = document.createElementNS(SVGNS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  function setText(node, text) {
    const s = String(text);
    if (node && node.textContent !== s) node.textContent = s;
  }

  function emptyNote(text) {
    return el('p', { class: 'empty', text });
  }

  // ------------------------------------------------------------ formatting

  function isNum(v) {
    return typeof v === 'number' && Number.isFinite(v);
  }

  function fmtInt(v) {
    return isNum(v) ? Math.round(v).toLocaleString('en-US') : '–';
  }

  function fmtUsd(v) {
    if (!isNum(v)) return '–';
    const a = Math.abs(v);
    const sign = v < 0 ? '-' : '';
    if (a === 0) return '$0.00';
    if (a >= 0.01) {
      return sign + '$' + a.toLocaleString('en-US', { minimumFractionDigits: 2, maximumFractionDigits: 2 });
    }
    if (a < 1e-8) return sign + '<$0.00000001';
    const digits = Math.min(8, 1 - Math.floor(Math.log10(a)));
    return sign + '$' + a.toFixed(digits);
  }

  function fmtMs(v) {
    if (!isNum(v)) return '–';
    if (v < 10) return `${v.toFixed(1)} ms`;
    if (v < 1000) return `${Math.round(v)} ms`;
    return `${(v / 1000).toFixed(v < 10000 ? 2 : 1)} s`;
  }

  function fmtPct(v) {
    if (!isNum(v)) return '–';
    const p = v * 100;
    return `${p === 100 || p === 0 ? p.toFixed(0) : p.toFixed(1)}%`;
  }

  function fmtTokens(v) {
    if (!isNum(v)) return '–';
    if (v >= 1e6) return `${+(v / 1e6).toFixed(2)}M`;
    if (v >= 1000) return `${Math.round(v / 1000)}K`;
    return String(v);
  }

  function fmtCompact(v) {
    if (!isNum(v)) return '–';
    const a = Math.abs(v);
    if (a >= 1e6) return `${+(v / 1e6).toFixed(1)}M`;
    if (a >= 1e4) return `${+(v / 1e3).toFixed(1)}K`;
    return String(+v.toFixed(a < 10 && a % 1 ? 2 : 0));
  }

  function fmtDuration(s) {
    s = Math.max(0, Math.round(s));
    if (s < 90) return `${s} s`;
    if (s < 5400) return `${Math.round(s / 60)} min`;
    if (s < 129600) return `${+(s / 3600).toFixed(1)} h`;
    return `${+(s / 86400).toFixed(1)} d`;
  }

  function fmtIn(seconds) {
    return seconds <= 0.5 ? 'now' : `in ${fmtDuration(seconds)}`;
  }

  function fmtAgo(epoch) {
    if (!isNum(epoch)) return '–';
    const s = Date.now() / 1000 - epoch;
    return s < 1 ? 'just now' : `${fmtDuration(s)} ago`;
  }

  function fmtClock(epochMs) {
    return new Date(epochMs).toLocaleTimeString('en-GB', { hour12: false });
  }

  function fmtPrice(perToken) {
    const v = Number(perToken);
    if (perToken === undefined || perToken === null || perToken === '' || !Number.isFinite(v)) return '–';
    if (v < 0) return 'varies';
    if (v === 0) return 'free';
    const m = v * 1e6;
    return '$' + (m >= 0.01 ? m.toFixed(2) : +m.toPrecision(2));
  }

  function fmtTick(ms, group) {
    const d = new Date(ms);
    const pad = (n) => String(n).padStart(2, '0');
    const month = d.toLocaleString('en-US', { month: 'short', timeZone: 'UTC' });
    if (group === 'day') return `${month} ${d.getUTCDate()}`;
    const hm = `${pad(d.getUTCHours())}:${pad(d.getUTCMinutes())}`;
    return group === 'hour' && d.getUTCHours() === 0 ? `${month} ${d.getUTCDate()}` : hm;
  }

  function fmtStamp(ms, group) {
    const iso = new Date(ms).toISOString();
    return group === 'day' ? iso.slice(0, 10) : `${iso.slice(0, 10)} ${iso.slice(11, 16)} UTC`;
  }

  function isoSeconds(ms) {
    return new Date(ms).toISOString().replace(/\.\d{3}Z$/, 'Z');
  }

  function prettyName(k) {
    return String(k).replace(/_/g, ' ').replace(/([a-z])([A-Z])/g, '$1 $2').toLowerCase();
  }

  function fmtValue(v) {
    if (v === null || v === undefined) return '–';
    if (Array.isArray(v)) return v.map(fmtValue).join(', ');
    if (typeof v === 'object') return JSON.stringify(v);
    if (typeof v === 'number') return Number.isInteger(v) ? fmtInt(v) : String(+v.toPrecision(4));
    return String(v);
  }

  // ------------------------------------------------------------ API

  class ApiError extends Error {
    constructor(status, message, data) {
      super(message);
      this.status = status;
      this.data = data;
    }
  }

  const session = { token: null, abort: null, epoch: 0 };

  function errorMessage(status, data, text) {
    if (data && data.error) {
      if (typeof data.error === 'string') return data.error;
      if (data.error.message) return String(data.error.message);
    }
    return text ? text.slice(0, 300) : `HTTP ${status}`;
  }

  // authExit: a 401/403 ends the session (back to the login form with its message).
  async function api(path, { method = 'GET', body, authExit = true } = {}) {
    const epoch = session.epoch;
    const headers = { Authorization: `Bearer ${session.token}`, Accept: 'application/json' };
    const init = { method, headers, cache: 'no-store' };
    if (body !== undefined) {
      headers['Content-Type'] = 'application/json';
      init.body = typeof body === 'string' ? body : JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (err) {
      throw new ApiError(0, `the proxy did not answer (${err.message})`, null);
    }
    const text = await response.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch (_) {
      data = null;
    }
    if (!response.ok) {
      const message = errorMessage(response.status, data, text);
      if (authExit && (response.status === 401 || response.status === 403) && epoch === session.epoch) logout(message);
      throw new ApiError(response.status, message, data);
    }
    return data;
  }

  // ------------------------------------------------------------ login

  function showLogin(message) {
    $('#app').hidden = true;
    $('#login-view').hidden = false;
    setText($('#login-error'), message || '');
    $('#login-submit').disabled = false;
    $('#login-token').value = '';
    $('#login-token').focus();
  }

  function logout(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    session.token = null;
    session.epoch += 1;
    if (session.abort) session.abort.abort();
    session.abort = null;
    stopTimers();
    showLogin(message);
  }

  async function onLogin(event) {
    event.preventDefault();
    const token = $('#login-token').value.trim();
    if (!token) {
      setText($('#login-error'), 'Enter the admin token.');
      return;
    }
    $('#login-submit').disabled = true;
    setText($('#login-error'), '');
    session.token = token;
    try {
      const status = await api('/status', { authExit: false });
      sessionStorage.setItem(TOKEN_KEY, token);
      startApp(status);
    } catch (err) {
      session.token = null;
      showLogin(err.message);
    }
  }

  // ------------------------------------------------------------ app state

  const state = {
    tab: 'pool',
    status: null,
    statusAt: 0,
    deadlines: new Map(), // alias -> local ms when its cooldown ends
    adminKeys: new Map(), // alias -> /admin/keys entry (budgets)
    alerts: new Map(), // name|subject -> alert
    models: null,
    modelSort: { key: 'id', dir: 1 },
    compare: [],
    timers: [],
    loaded: {},
  };

  function stopTimers() {
    state.timers.forEach(clearInterval);
    state.timers = [];
  }

  function startApp(initialStatus) {
    $('#login-view').hidden = true;
    $('#app').hidden = false;
    setText($('#login-error'), '');
    state.loaded = {};
    state.alerts.clear();
    if (initialStatus) renderStatus(initialStatus);
    loadAdminKeys();
    loadAlerts(true);
    showTab(tabFromHash());
    streamEvents(session.epoch);
    state.timers.push(setInterval(tickUntil, 1000));
    state.timers.push(setInterval(refreshVisible, 30000));
    state.timers.push(setInterval(() => state.tab === 'routes' && loadRoutes(), 5000));
  }

  // ------------------------------------------------------------ tabs

  function tabFromHash() {
    const name = location.hash.replace(/^#/, '');
    return TABS.includes(name) ? name : 'pool';
  }

  function showTab(tab) {
    state.tab = tab;
    for (const view of $$('.view')) view.hidden = view.dataset.view !== tab;
    for (const link of $$('#tabs a')) {
      if (link.dataset.tab === tab) {
        link.setAttribute('aria-current', 'page');
        const nav = link.parentNode; // keep the current tab in sight on a narrow screen
        if (link.offsetLeft < nav.scrollLeft || link.offsetLeft + link.offsetWidth > nav.scrollLeft + nav.clientWidth) {
          nav.scrollLeft = link.offsetLeft - 8;
        }
      }
      else link.removeAttribute('aria-current');
    }
    loadTab(tab, false);
  }

  function loadTab(tab, force) {
    if (!force && state.loaded[tab]) return;
    state.loaded[tab] = true;
    const run = {
      pool: () => loadAdminKeys(),
      usage: loadUsage,
      performance: loadPerformance,
      models: loadModels,
      routes: loadRoutes,
      alerts: () => loadAlerts(false),
    }[tab];
    Promise.resolve(run()).catch(() => {});
  }

  function refreshVisible() {
    if (session.token && ['usage', 'performance', 'alerts'].includes(state.tab)) loadTab(state.tab, true);
  }

  // ------------------------------------------------------------ banner & notes

  let bannerTimer = 0;
  function banner(text, kind) {
    const node = $('#banner');
    setText($('#banner-text'), text);
    node.className = `banner ${kind || ''}`;
    node.hidden = false;
    clearTimeout(bannerTimer);
    bannerTimer = setTimeout(() => (node.hidden = true), 12000);
  }

  function note(node, text, kind) {
    node.hidden = !text;
    node.className = `note ${kind || ''}`;
    setText(node, text || '');
  }

  // ------------------------------------------------------------ SSE

  function setConn(text, kind) {
    const node = $('#conn');
    setText(node, text);
    node.className = `conn ${kind}`;
  }

  async function streamEvents(epoch) {
    while (session.token && session.epoch === epoch) {
      const controller = new AbortController();
      session.abort = controller;
      let failure = null;
      try {
        const response = await fetch('/dashboard/events', {
          headers: { Authorization: `Bearer ${session.token}`, Accept: 'text/event-stream' },
          cache: 'no-store',
          signal: controller.signal,
        });
        if (response.status === 401 || response.status === 403) {
          const text = await response.text();
          let data = null;
          try { data = JSON.parse(text); } catch (_) { /* not JSON */ }
          if (session.epoch === epoch) logout(errorMessage(response.status, data, text));
          return;
        }
        if (!response.ok || !response.body) {
          await response.text().catch(() => '');
          throw new Error(`HTTP ${response.status}`);
        }
        setConn('live', 'live');
        await readFrames(response.body.getReader(), epoch);
      } catch (err) {
        failure = err;
      }
      if (session.epoch !== epoch) return;
      setConn(failure ? 'reconnecting' : 'stream ended', 'down');
      // Keep the pool fresh while the stream is down.
      api('/status').then(renderStatus).catch(() => {});
      await new Promise((resolve) => setTimeout(resolve, 2000));
    }
  }

  async function readFrames(reader, epoch) {
    const decoder = new TextDecoder();
    let buffer = '';
    let event = 'message';
    let data = [];
    for (;;) {
      const { value, done } = await reader.read();
      if (done || session.epoch !== epoch) return;
      buffer += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buffer.search(/\r\n|\r|\n/)) >= 0) {
        const line = buffer.slice(0, nl);
        const len = buffer[nl] === '\r' && buffer[nl + 1] === '\n' ? 2 : 1;
        if (buffer[nl] === '\r' && nl + 1 === buffer.length) break; // wait: may be \r\n split
        buffer = buffer.slice(nl + len);
        if (line === '') {
          if (data.length) dispatch(event, data.join('\n'));
          event = 'message';
          data = [];
        } else if (line[0] !== ':') {
          const colon = line.indexOf(':');
          const field = colon < 0 ? line : line.slice(0, colon);
          let val = colon < 0 ? '' : line.slice(colon + 1);
          if (val[0] === ' ') val = val.slice(1);
          if (field === 'event') event = val || 'message';
          else if (field === 'data') data.push(val);
        }
      }
    }
  }

  function dispatch(event, raw) {
    let data;
    try {
      data = JSON.parse(raw);
    } catch (_) {
      return;
    }
    if (event === 'status') renderStatus(data);
    else if (event === 'key') onKeyEvent(data);
    else if (event === 'alert') onAlertEvent(data);
  }

  // ------------------------------------------------------------ pool

  function keyBudget(key) {
    const admin = state.adminKeys.get(key.alias);
    const opts = key.options || (admin && admin.options) || {};
    const budget = isNum(key.budget) ? key.budget : opts.budget;
    const window = isNum(key.budget_window) ? key.budget_window : opts.budget_window;
    return { budget: isNum(budget) ? budget : null, window: isNum(window) ? window : null };
  }

  async function loadAdminKeys() {
    try {
      const data = await api('/admin/keys', { authExit: false });
      state.adminKeys = new Map((data && data.keys ? data.keys : []).map((k) => [k.alias, k]));
      if (state.status) renderStatus(state.status);
    } catch (_) {
      /* budgets are optional detail */
    }
  }

  function renderStatus(status) {
    if (!status || !Array.isArray(status.keys)) return;
    state.status = status;
    state.statusAt = Date.now();
    const stats = status.stats || {};
    const keys = status.keys.filter((k) => k && typeof k.alias === 'string');
    const present = keys.filter((k) => !k.removing);
    const usable = present.filter((k) => USABLE.has(k.state)).length;
    setText($('#total-usable'), `${usable} / ${isNum(status.totalKeys) ? status.totalKeys : present.length}`);
    $('#total-usable').className = `value ${usable === 0 ? 'bad' : usable < present.length ? 'warn' : 'good'}`;
    setText($('#total-requests'), fmtInt(stats.totalRequests));
    setText($('#total-cost'), fmtUsd(isNum(stats.totalCostToday) ? stats.totalCostToday : stats.totalCost));
    setText($('#total-success'), fmtPct(stats.successRate));
    setText($('#total-inflight'), `${fmtInt(stats.inFlight)} / ${fmtInt(stats.queued)}`);
    setText($('#total-failovers'), fmtInt(stats.failovers));
    const storage = status.storage;
    setText($('#storage'), storage ? (storage.ok === false ? `state file: ${storage.last_error || 'failing'}` : 'state file ok') : '');
    $('#storage').classList.toggle('bad', !!(storage && storage.ok === false));

    const tbody = $('#keys tbody');
    const rows = new Map($$('tr', tbody).map((tr) => [tr.dataset.key, tr]));
    keys.forEach((key, index) => {
      let tr = rows.get(key.alias);
      if (!tr) tr = keyRow(key.alias);
      rows.delete(key.alias);
      if (tbody.children[index] !== tr) tbody.insertBefore(tr, tbody.children[index] || null);
      if (isNum(key.until_in)) state.deadlines.set(key.alias, state.statusAt + key.until_in * 1000);
      else if (isNum(key.until_wall)) state.deadlines.set(key.alias, key.until_wall * 1000);
      else state.deadlines.delete(key.alias);
      updateRow(tr, key);
    });
    for (const [alias, tr] of rows) {
      tr.remove();
      state.deadlines.delete(alias);
    }
    $('#keys-empty').hidden = keys.length > 0;
    renderSpendToday(status.spend);
    if (state.tab === 'routes') renderRoutingStatus();
  }

  function keyRow(alias) {
    const cell = (cls) => el('td', { class: cls });
    const tr = el('tr', { dataset: { key: alias } });
    const aliasCell = el('td', { class: 'alias' }, el('span', { class: 'alias-name', text: alias }), el('span', { class: 'masked muted small' }));
    const actions = el('td', { class: 'actions' },
      el('button', { type: 'button', class: 'mark-healthy small-btn', title: 'mark healthy', text: 'healthy' }),
      el('button', { type: 'button', class: 'disable small-btn secondary', title: 'disable', text: 'disable' }),
      el('button', { type: 'button', class: 'probe small-btn secondary', title: 'probe now', text: 'probe' }));
    const spend = el('td', { class: 'spend' }, el('span', { class: 'spend-text' }), el('span', { class: 'meter', hidden: true }, el('span', { class: 'meter-fill' })));
    tr.append(aliasCell, cell('state'), cell('until'), cell('inflight num'), cell('requests num'), cell('success num'), spend, actions);
    return tr;
  }

  function updateRow(tr, key) {
    setText($('.masked', tr), key.masked ? ` ${key.masked}` : '');
    setState($('.state', tr), key.state, key.reason);
    tr.classList.toggle('removing', !!key.removing);
    setText($('.inflight', tr), fmtInt(key.in_flight) + (key.probing ? ' (probing)' : ''));
    setText($('.requests', tr), fmtInt(key.requests));
    setText($('.success', tr), fmtPct(key.success_rate));
    const { budget, window } = keyBudget(key);
    const per = window ? ` per ${fmtDuration(window)}` : '';
    setText($('.spend-text', tr), budget !== null ? `${fmtUsd(key.spend)} / ${fmtUsd(budget)}${per}` : fmtUsd(key.spend));
    const meter = $('.meter', tr);
    meter.hidden = budget === null;
    if (budget !== null) {
      const share = budget > 0 ? Math.min(1, (key.spend || 0) / budget) : 1;
      const fill = $('.meter-fill', tr);
      fill.style.width = `${(share * 100).toFixed(1)}%`;
      fill.className = `meter-fill ${share >= 0.9 ? 'bad' : share >= 0.7 ? 'warn' : ''}`;
    }
    updateUntil(tr, key.alias);
  }

  function setState(td, value, reason) {
    const s = String(value || '');
    setText(td, s);
    td.className = `state st-${s.replace(/[^a-z_]/gi, '')}`;
    td.title = reason ? `reason: ${reason}` : '';
  }

  function updateUntil(tr, alias) {
    const deadline = state.deadlines.get(alias);
    setText($('.until', tr), deadline === undefined ? '–' : fmtIn((deadline - Date.now()) / 1000));
  }

  function tickUntil() {
    for (const tr of $$('#keys tbody tr')) updateUntil(tr, tr.dataset.key);
  }

  function onKeyEvent(ev) {
    if (!ev || typeof ev.key !== 'string') return;
    const tr = $$('#keys tbody tr').find((row) => row.dataset.key === ev.key);
    if (isNum(ev.until)) {
      const at = isNum(ev.at) ? ev.at : Date.now() / 1000;
      state.deadlines.set(ev.key, Date.now() + (ev.until - at) * 1000);
    } else {
      state.deadlines.delete(ev.key);
    }
    if (tr) {
      setState($('.state', tr), ev.state, ev.reason);
      updateUntil(tr, ev.key);
      tr.classList.remove('flash');
      void tr.offsetWidth; // restart the animation
      tr.classList.add('flash');
    }
    const when = isNum(ev.at) ? ev.at * 1000 : Date.now();
    const stateSpan = el('span', { class: `state st-${String(ev.state).replace(/[^a-z_]/gi, '')}`, text: ev.state });
    const li = el('li', { dataset: { key: ev.key } },
      el('time', { class: 'muted', text: fmtClock(when) }), ' ',
      el('strong', { text: ev.key }), ' → ', stateSpan,
      ev.reason ? el('span', { class: 'muted', text: ` (${ev.reason})` }) : null,
      isNum(ev.until) && isNum(ev.at) ? el('span', { class: 'muted', text: ` for ${fmtDuration(ev.until - ev.at)}` }) : null);
    const list = $('#changes');
    list.prepend(li);
    while (list.children.length > 100) list.lastChild.remove();
    $('#changes-empty').hidden = true;
  }

  function renderSpendToday(spend) {
    const box = $('#spend-today');
    box.replaceChildren();
    if (!spend || typeof spend !== 'object') {
      box.append(emptyNote('No spend data yet.'));
      return;
    }
    const models = Object.entries(spend.models || {}).sort((a, b) => (b[1].cost || 0) - (a[1].cost || 0));
    if (!models.length) box.append(emptyNote('Nothing spent today yet.'));
    else {
      box.append(table(['Model', 'Requests', 'Cost'], models.slice(0, 8).map(([name, row]) => [name, fmtInt(row.requests), fmtUsd(row.cost)]), [false, true, true]));
    }
    const budgets = Array.isArray(spend.budgets) ? spend.budgets : [];
    if (budgets.length) {
      box.append(el('h3', { text: 'Budgets' }), table(['Scope', 'Name', 'Spent', 'Budget', 'Left'],
        budgets.map((b) => [b.scope, b.name, fmtUsd(b.spent), fmtUsd(b.budget), b.exhausted ? 'exhausted' : fmtUsd(b.remaining)]), [false, false, true, true, true]));
    }
  }

  function table(headers, rows, numeric = []) {
    return el('div', { class: 'scroll' }, el('table', { class: 'plain' },
      el('thead', null, el('tr', null, headers.map((h, i) => el('th', { class: numeric[i] ? 'num' : null, text: h })))),
      el('tbody', null, rows.map((r) => el('tr', null, r.map((c, i) => el('td', { class: numeric[i] ? 'num' : null }, c)))))));
  }

  async function keyAction(button, alias, kind) {
    const result = $('#action-result');
    button.disabled = true;
    try {
      if (kind === 'probe') {
        await api('/admin/probe', { method: 'POST', body: { alias }, authExit: false });
        note(result, `Probing ${alias}.`, 'ok');
      } else {
        const target = kind === 'disable' ? 'disabled' : 'healthy';
        const answer = await api(`/admin/keys/${encodeURIComponent(alias)}/state`, { method: 'POST', body: { state: target }, authExit: false });
        note(result, `${alias} marked ${target}${answer && answer.stored === false ? ' (not stored: lost at restart)' : ''}.`, 'ok');
      }
      api('/status').then(renderStatus).catch(() => {});
    } catch (err) {
      note(result, `${alias}: ${err.message}`, 'bad');
    } finally {
      button.disabled = false;
    }
  }

  async function probeAll(event) {
    const button = event.currentTarget;
    button.disabled = true;
    try {
      const answer = await api('/admin/probe', { method: 'POST', authExit: false });
      const list = answer && Array.isArray(answer.probing) ? answer.probing : [];
      note($('#action-result'), list.length ? `Probing ${list.join(', ')}.` : 'No key to probe.', 'ok');
    } catch (err) {
      note($('#action-result'), `Probe: ${err.message}`, 'bad');
    } finally {
      button.disabled = false;
    }
  }

  async function addKey(event) {
    event.preventDefault();
    const secret = $('#add-key-secret').value.trim();
    if (!secret) return;
    const body = { key: secret };
    const alias = $('#add-key-alias').value.trim();
    if (alias) body.alias = alias;
    for (const [id, field] of [['#add-key-budget', 'budget'], ['#add-key-weight', 'weight']]) {
      const v = $(id).value.trim();
      if (v !== '') body[field] = Number(v);
    }
    const button = $('#add-key-submit');
    button.disabled = true;
    try {
      const answer = await api('/admin/keys', { method: 'POST', body, authExit: false });
      $('#add-key-form').reset();
      note($('#action-result'), `Added ${answer && answer.alias ? answer.alias : 'the key'}${answer && answer.stored === false ? ' (not stored: lost at restart)' : ''}.`, 'ok');
      loadAdminKeys();
      api('/status').then(renderStatus).catch(() => {});
    } catch (err) {
      note($('#action-result'), `Add key: ${err.message}`, 'bad');
    } finally {
      button.disabled = false;
    }
  }

  // ------------------------------------------------------------ charts

  function chartSize(svg, height) {
    const width = Math.max(260, Math.round(svg.getBoundingClientRect().width) || svg.parentNode.clientWidth || 600);
    svg.setAttribute('viewBox', `0 0 ${width} ${height}`);
    svg.setAttribute('height', height);
    svg.replaceChildren();
    return width;
  }

  function niceMax(v) {
    if (!(v > 0)) return 1;
    const p = 10 ** Math.floor(Math.log10(v));
    const n = v / p;
    return (n <= 1 ? 1 : n <= 2 ? 2 : n <= 2.5 ? 2.5 : n <= 5 ? 5 : 10) * p;
  }

  function chartEmpty(svg, text, height = 200) {
    const width = chartSize(svg, height);
    svg.append(svgEl('text', { x: width / 2, y: height / 2, class: 'empty-text', 'text-anchor': 'middle' }, text));
    const next = svg.nextElementSibling;
    if (next && next.classList.contains('legend')) next.replaceChildren();
  }

  // series: [{name, color, values (numbers or null), area}], times: ms of each bucket start.
  function lineChart(svg, { times, series, group, format, height = 220, max }) {
    svg._draw = () => lineChart(svg, { times, series, group, format, height, max });
    const hasData = series.some((s) => s.values.some((v) => isNum(v) && v !== 0));
    if (!times.length || !hasData) return chartEmpty(svg, 'No data yet for this range.');
    const width = chartSize(svg, height);
    const top = max || niceMax(Math.max(...series.flatMap((s) => s.values.filter(isNum))));
    const labelChars = Math.max(...[0, 1, 2, 3, 4].map((t) => format((top * t) / 4).length));
    const pad = { l: Math.max(40, labelChars * 6.6 + 12), r: 12, t: 10, b: 26 };
    const w = width - pad.l - pad.r;
    const h = height - pad.t - pad.b;
    const n = times.length;
    const x = (i) => pad.l + (n === 1 ? w / 2 : (i * w) / (n - 1));
    const y = (v) => pad.t + h - (v / top) * h;
    const axis = svgEl('g', { class: 'axis' });
    for (let t = 0; t <= 4; t++) {
      const v = (top * t) / 4;
      axis.append(svgEl('line', { x1: pad.l, x2: width - pad.r, y1: y(v), y2: y(v), class: 'grid' }));
      axis.append(svgEl('text', { x: pad.l - 6, y: y(v) + 4, 'text-anchor': 'end' }, format(v)));
    }
    const ticks = Math.max(2, Math.min(n, Math.floor(w / 80)));
    for (let t = 0; t < ticks; t++) {
      const i = n === 1 ? 0 : Math.round((t * (n - 1)) / (ticks - 1));
      axis.append(svgEl('text', { x: x(i), y: height - 8, 'text-anchor': t === 0 && n > 1 ? 'start' : t === ticks - 1 && n > 1 ? 'end' : 'middle' }, fmtTick(times[i], group)));
    }
    svg.append(axis);
    for (const s of series) {
      let d = '';
      let segment = [];
      const segments = [];
      s.values.forEach((v, i) => {
        if (isNum(v)) segment.push([x(i), y(v)]);
        else if (segment.length) { segments.push(segment); segment = []; }
      });
      if (segment.length) segments.push(segment);
      for (const seg of segments) {
        d += seg.map(([px, py], i) => `${i ? 'L' : 'M'}${px.toFixed(1)},${py.toFixed(1)}`).join('');
        if (s.area && seg.length > 1) {
          const a = `${seg.map(([px, py], i) => `${i ? 'L' : 'M'}${px.toFixed(1)},${py.toFixed(1)}`).join('')}L${seg[seg.length - 1][0].toFixed(1)},${y(0)}L${seg[0][0].toFixed(1)},${y(0)}Z`;
          svg.append(svgEl('path', { d: a, fill: s.color, 'fill-opacity': 0.15, stroke: 'none' }));
        }
        if (seg.length === 1) svg.append(svgEl('circle', { cx: seg[0][0], cy: seg[0][1], r: 2.5, fill: s.color }));
      }
      svg.append(svgEl('path', { d, fill: 'none', stroke: s.color, 'stroke-width': 2, 'stroke-linejoin': 'round', class: 'line' }));
    }
    // hover targets with native tooltips
    const hover = svgEl('g', { class: 'hover' });
    const step = n === 1 ? w : w / (n - 1);
    for (let i = 0; i < n; i++) {
      const r = svgEl('rect', { x: Math.max(pad.l, x(i) - step / 2), y: pad.t, width: Math.max(1, Math.min(step, width - pad.r - Math.max(pad.l, x(i) - step / 2))), height: h });
      r.append(svgEl('title', {}, [fmtStamp(times[i], group), ...series.map((s) => `${s.name}: ${isNum(s.values[i]) ? format(s.values[i], true) : '–'}`)].join('\n')));
      hover.append(r);
    }
    svg.append(hover);
    legend(svg, series);
  }

  function legend(svg, series) {
    let next = svg.nextElementSibling;
    if (!next || !next.classList.contains('legend')) {
      next = el('div', { class: 'legend' });
      svg.after(next);
    }
    next.replaceChildren(...series.map((s) => {
      const swatch = el('span', { class: 'swatch' });
      swatch.style.background = s.color;
      return el('span', { class: 'legend-item' }, swatch, s.name);
    }));
  }

  // items: [{name, value}]
  function barChart(svg, items, format) {
    svg._draw = () => barChart(svg, items, format);
    const shown = items.filter((i) => isNum(i.value) && i.value > 0).slice(0, 12);
    if (!shown.length) return chartEmpty(svg, 'No data yet for this range.', 60);
    const rowH = 26;
    const height = shown.length * rowH + 8;
    const width = chartSize(svg, height);
    const labelW = Math.min(220, Math.round(width * 0.38));
    const valueW = 78;
    const w = width - labelW - valueW - 8;
    const top = Math.max(...shown.map((i) => i.value));
    shown.forEach((item, i) => {
      const yy = 4 + i * rowH;
      const name = String(item.name);
      const maxChars = Math.floor(labelW / 7);
      const label = svgEl('text', { x: labelW - 6, y: yy + 16, 'text-anchor': 'end', class: 'bar-label' }, name.length > maxChars ? `${name.slice(0, maxChars - 1)}…` : name);
      label.append(svgEl('title', {}, name));
      const bw = Math.max(2, (item.value / top) * w);
      const rect = svgEl('rect', { x: labelW, y: yy + 4, width: bw, height: rowH - 8, rx: 3, fill: COLORS[i % COLORS.length] });
      rect.append(svgEl('title', {}, `${name}: ${format(item.value, true)}`));
      svg.append(label, rect, svgEl('text', { x: labelW + bw + 6, y: yy + 16, class: 'bar-value' }, format(item.value)));
    });
  }

  let resizeTimer = 0;
  function redrawCharts() {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => {
      for (const svg of $$('svg.chart')) if (svg._draw && svg.getBoundingClientRect().width) svg._draw();
    }, 150);
  }

  // Full bucket axis from..to (the server may skip empty buckets).
  function buckets(fromMs, toMs, group) {
    const step = STEP[group] || 3600e3;
    const start = Math.floor(fromMs / step) * step;
    const out = [];
    for (let t = start; t < toMs && out.length < 2000; t += step) out.push(t);
    return out;
  }

  function rangeParams(range) {
    const r = RANGES[range] || RANGES['24h'];
    const step = STEP[r.group];
    const to = Date.now();
    const from = Math.floor((to - r.ms) / step) * step + step;
    return { from, to, group: r.group, query: `from=${encodeURIComponent(isoSeconds(from))}&to=${encodeURIComponent(isoSeconds(to))}&group_by=${r.group}` };
  }

  // rows -> {bucketMs: {sum of fields}} over the axis
  function byTime(rows, axis, fields, group) {
    const step = STEP[group] || 3600e3;
    const index = new Map(axis.map((t, i) => [t, i]));
    const out = Object.fromEntries(fields.map((f) => [f, axis.map(() => 0)]));
    for (const row of rows) {
      const t = Date.parse(row.start);
      if (!Number.isFinite(t)) continue;
      const i = index.get(Math.floor(t / step) * step);
      if (i === undefined) continue;
      for (const f of fields) if (isNum(row[f])) out[f][i] += row[f];
    }
    return out;
  }

  // ------------------------------------------------------------ usage & cost

  async function loadUsage() {
    const range = $('#usage-range').value;
    const by = $('#usage-by').value;
    const p = rangeParams(range);
    const q = p.query + (by ? `&by=${encodeURIComponent(by)}` : '');
    setText($('#usage-status'), 'loading…');
    try {
      const [usage, costs] = await Promise.all([api(`/analytics/usage?${q}`), api(`/analytics/costs?${q}`)]);
      setText($('#usage-status'), `updated ${fmtClock(Date.now())}`);
      renderUsage(usage, costs, p, by);
    } catch (err) {
      setText($('#usage-status'), `could not load: ${err.message}`);
    }
  }

  function renderUsage(usage, costs, p, by) {
    const rows = (usage && Array.isArray(usage.rows)) ? usage.rows : [];
    const costRows = (costs && Array.isArray(costs.rows)) ? costs.rows : rows;
    const group = (usage && usage.groupBy) || p.group;
    const axis = buckets(p.from, p.to, group);
    const u = byTime(rows, axis, ['requests', 'errors'], group);
    const c = byTime(costRows, axis, ['cost'], group);
    lineChart($('#chart-usage'), {
      times: axis, group, format: fmtCompact,
      series: [
        { name: 'requests', color: COLORS[0], values: u.requests, area: true },
        { name: 'errors', color: COLORS[1], values: u.errors },
      ],
    });
    lineChart($('#chart-cost'), {
      times: axis, group, format: fmtUsd,
      series: [{ name: 'cost (USD)', color: COLORS[2], values: c.cost, area: true }],
    });

    const sum = (list, f) => list.reduce((a, r) => a + (isNum(r[f]) ? r[f] : 0), 0);
    const totals = [
      ['Requests', fmtInt(sum(rows, 'requests'))],
      ['Errors', fmtInt(sum(rows, 'errors'))],
      ['Prompt tokens', fmtCompact(sum(rows, 'promptTokens'))],
      ['Completion tokens', fmtCompact(sum(rows, 'completionTokens'))],
      ['Cost', fmtUsd(sum(costRows, 'cost'))],
    ];
    $('#usage-totals').replaceChildren(...totals.map(([label, value]) =>
      el('div', { class: 'stat' }, el('span', { class: 'label', text: label }), el('span', { class: 'value', text: value }))));

    // breakdown by name
    setText($('#usage-by-label'), by ? `by ${by}` : '');
    const thead = $('#usage-table thead');
    const tbody = $('#usage-table tbody');
    const svg = $('#chart-breakdown');
    if (!by) {
      svg.hidden = true;
      thead.replaceChildren();
      tbody.replaceChildren(el('tr', null, el('td', { class: 'empty', text: 'Choose a breakdown ("Break down by") to see each group.' })));
    } else {
      svg.hidden = false;
      const groups = new Map();
      for (const r of rows) {
        const name = r.name === null || r.name === undefined || r.name === '' ? '(none)' : String(r.name);
        const g = groups.get(name) || { name, requests: 0, errors: 0, promptTokens: 0, completionTokens: 0, cost: 0 };
        for (const f of ['requests', 'errors', 'promptTokens', 'completionTokens', 'cost']) if (isNum(r[f])) g[f] += r[f];
        groups.set(name, g);
      }
      if (costs && Array.isArray(costs.rows) && costs !== usage) {
        const costBy = new Map();
        for (const r of costs.rows) {
          const name = r.name === null || r.name === undefined || r.name === '' ? '(none)' : String(r.name);
          costBy.set(name, (costBy.get(name) || 0) + (isNum(r.cost) ? r.cost : 0));
        }
        for (const [name, cost] of costBy) {
          const g = groups.get(name) || { name, requests: 0, errors: 0, promptTokens: 0, completionTokens: 0, cost: 0 };
          g.cost = cost;
          groups.set(name, g);
        }
      }
      const list = [...groups.values()].sort((a, b) => b.cost - a.cost || b.requests - a.requests);
      const anyCost = list.some((g) => g.cost > 0);
      barChart(svg, list.map((g) => ({ name: g.name, value: anyCost ? g.cost : g.requests })), anyCost ? fmtUsd : fmtCompact);
      svg.setAttribute('aria-label', anyCost ? `cost by ${by}` : `requests by ${by}`);
      thead.replaceChildren(el('tr', null, [by, 'Requests', 'Errors', 'Error rate', 'Prompt tok.', 'Completion tok.', 'Cost'].map((h, i) => el('th', { class: i ? 'num' : null, text: h }))));
      tbody.replaceChildren(...(list.length ? list.map((g) => el('tr', { dataset: { name: g.name } },
        el('td', { text: g.name }), el('td', { class: 'num', text: fmtInt(g.requests) }), el('td', { class: 'num', text: fmtInt(g.errors) }),
        el('td', { class: 'num', text: g.requests ? fmtPct(g.errors / g.requests) : '–' }),
        el('td', { class: 'num', text: fmtCompact(g.promptTokens) }), el('td', { class: 'num', text: fmtCompact(g.completionTokens) }),
        el('td', { class: 'num', text: fmtUsd(g.cost) }))) : [el('tr', null, el('td', { class: 'empty', colspan: 7, text: 'No data yet for this range.' }))]));
    }

    const classes = {};
    for (const r of rows) for (const [k, v] of Object.entries(r.errorsByClass || {})) if (isNum(v)) classes[k] = (classes[k] || 0) + v;
    const errList = Object.entries(classes).filter(([, v]) => v > 0).sort((a, b) => b[1] - a[1]);
    $('#usage-errors').replaceChildren(errList.length
      ? table(['Class', 'Errors'], errList.map(([k, v]) => [prettyName(k), fmtInt(v)]), [false, true])
      : emptyNote('No errors in this range.'));
  }

  // ------------------------------------------------------------ performance

  async function loadPerformance() {
    const p = rangeParams($('#perf-range').value);
    setText($('#perf-status'), 'loading…');
    try {
      const [overall, byModel] = await Promise.all([
        api(`/analytics/performance?${p.query}`),
        api(`/analytics/performance?${p.query}&by=model&merge=true`), // one row a model: its percentiles over the range
      ]);
      setText($('#perf-status'), `updated ${fmtClock(Date.now())}`);
      renderPerformance(overall, byModel, p);
    } catch (err) {
      setText($('#perf-status'), `could not load: ${err.message}`);
    }
  }

  function renderPerformance(overall, byModel, p) {
    const rows = overall && Array.isArray(overall.rows) ? overall.rows : [];
    const group = (overall && overall.groupBy) || p.group;
    const axis = buckets(p.from, p.to, group);
    const step = STEP[group] || 3600e3;
    const at = new Map();
    for (const r of rows) {
      const t = Date.parse(r.start);
      if (Number.isFinite(t)) at.set(Math.floor(t / step) * step, r);
    }
    const pick = (f) => axis.map((t) => (at.has(t) && isNum(at.get(t)[f]) ? at.get(t)[f] : null));
    lineChart($('#chart-latency'), {
      times: axis, group, format: fmtMs,
      series: [
        { name: 'p50', color: COLORS[2], values: pick('ttfbP50Ms') },
        { name: 'p95', color: COLORS[3], values: pick('ttfbP95Ms') },
        { name: 'p99', color: COLORS[1], values: pick('ttfbP99Ms') },
      ],
    });
    const share = pick('errorShare');
    lineChart($('#chart-errors'), {
      times: axis, group, format: fmtPct,
      max: Math.min(1, niceMax(Math.max(0.01, ...share.filter(isNum)))),
      series: [{ name: 'error share', color: COLORS[1], values: share, area: true }],
    });
    if (!share.some((v) => isNum(v) && v > 0) && rows.some((r) => isNum(r.requests) && r.requests > 0)) {
      chartEmpty($('#chart-errors'), 'No errors in this range.');
    }

    const models = byModel && Array.isArray(byModel.rows) ? byModel.rows : [];
    const groups = new Map();
    for (const r of models) {
      const name = r.name ? String(r.name) : '(none)';
      const g = groups.get(name) || { name, requests: 0, errors: 0, rows: [] };
      g.requests += isNum(r.requests) ? r.requests : 0;
      g.errors += isNum(r.requests) && isNum(r.errorShare) ? r.requests * r.errorShare : 0;
      g.rows.push(r);
      groups.set(name, g);
    }
    // merge=true: one row a model, its percentiles the server's, of every answer in the range
    // (an average of the hours' percentiles would be no percentile of them).
    const list = [...groups.values()].sort((a, b) => b.requests - a.requests);
    const fields = ['ttfbP50Ms', 'ttfbP95Ms', 'ttfbP99Ms', 'totalP50Ms', 'totalP95Ms', 'totalP99Ms'];
    $('#perf-table tbody').replaceChildren(...(list.length ? list.map((g) => el('tr', { dataset: { name: g.name } },
      el('td', { text: g.name }), el('td', { class: 'num', text: fmtInt(g.requests) }),
      el('td', { class: 'num', text: g.requests ? fmtPct(g.errors / g.requests) : '–' }),
      fields.map((f) => el('td', { class: 'num', text: fmtMs(g.rows.length === 1 ? g.rows[0][f] : null) }))))
      : [el('tr', null, el('td', { class: 'empty', colspan: 9, text: 'No data yet for this range.' }))]));
  }

  // ------------------------------------------------------------ models

  async function loadModels() {
    const empty = $('#models-empty');
    try {
      const data = await api('/v1/models');
      state.models = (data && Array.isArray(data.data) ? data.data : []).filter((m) => m && typeof m.id === 'string');
      const params = new Set();
      for (const m of state.models) for (const p of m.supported_parameters || []) params.add(String(p));
      const select = $('#model-param');
      const current = select.value;
      select.replaceChildren(el('option', { value: '', text: 'any parameter' }), ...[...params].sort().map((p) => el('option', { value: p, text: p })));
      select.value = params.has(current) ? current : '';
      renderModels();
    } catch (err) {
      state.loaded.models = false;
      empty.hidden = false;
      setText(empty, `Could not load the catalog: ${err.message}`);
    }
  }

  function modelPrice(m, f) {
    const v = Number(m.pricing ? m.pricing[f] : NaN);
    return Number.isFinite(v) ? v : null;
  }

  function isFree(m) {
    const pricing = m.pricing || {};
    const values = Object.values(pricing);
    return values.length > 0 && values.every((v) => Number(v) === 0);
  }

  function renderModels() {
    const models = state.models || [];
    const search = $('#model-search').value.trim().toLowerCase();
    const freeOnly = $('#model-free').checked;
    const minContext = Number($('#model-context').value) || 0;
    const priceValue = $('#model-price').value;
    const maxPrice = priceValue === '' ? null : Number(priceValue) / 1e6;
    const param = $('#model-param').value;
    const words = search.split(/\s+/).filter(Boolean);
    const shown = models.filter((m) => {
      const hay = `${m.id} ${m.name || ''}`.toLowerCase();
      if (words.some((w) => !hay.includes(w))) return false;
      if (freeOnly && !isFree(m)) return false;
      if (minContext && !(m.context_length >= minContext)) return false;
      if (maxPrice !== null) {
        const p = modelPrice(m, 'prompt');
        if (p === null || p < 0 || p > maxPrice + 1e-15) return false;
      }
      if (param && !(m.supported_parameters || []).includes(param)) return false;
      return true;
    });
    const { key, dir } = state.modelSort;
    const sortValue = (m) => key === 'id' ? m.id.toLowerCase() : key === 'context' ? (m.context_length || 0) : (modelPrice(m, key) ?? Infinity);
    shown.sort((a, b) => { const x = sortValue(a), y = sortValue(b); return (x < y ? -1 : x > y ? 1 : 0) * dir; });
    for (const th of $$('#models th[data-sort]')) {
      th.classList.toggle('sorted', th.dataset.sort === key);
      th.setAttribute('aria-sort', th.dataset.sort === key ? (dir > 0 ? 'ascending' : 'descending') : 'none');
    }
    setText($('#model-count'), `${shown.length} of ${models.length} models`);
    const rows = shown.map((m) => {
      const params = (m.supported_parameters || []).map(String);
      const inputs = ((m.architecture && m.architecture.input_modalities) || []).map(String);
      const checkbox = el('input', { type: 'checkbox', class: 'compare', 'aria-label': `compare ${m.id}`, checked: state.compare.includes(m.id) });
      return el('tr', { dataset: { model: m.id } },
        el('td', null, checkbox),
        el('td', { class: 'model-id' }, el('span', { text: m.id }), isFree(m) ? el('span', { class: 'tag free', text: 'free' }) : null,
          m.name ? el('div', { class: 'muted small', text: m.name }) : null),
        el('td', { class: 'num', text: fmtTokens(m.context_length) }),
        el('td', { class: 'num', text: fmtPrice(m.pricing && m.pricing.prompt) }),
        el('td', { class: 'num', text: fmtPrice(m.pricing && m.pricing.completion) }),
        el('td', { text: inputs.join(', ') || '–' }),
        el('td', { class: 'params small', title: params.join(', '), text: params.length > 6 ? `${params.slice(0, 6).join(', ')} +${params.length - 6}` : params.join(', ') || '–' }));
    });
    $('#models tbody').replaceChildren(...rows);
    const empty = $('#models-empty');
    empty.hidden = shown.length > 0;
    setText(empty, models.length ? 'No model matches these filters.' : 'The catalog is empty (not loaded yet?).');
    renderCompare();
  }

  function onCompareToggle(event) {
    const box = event.target;
    if (!box.classList || !box.classList.contains('compare')) return;
    const id = box.closest('tr').dataset.model;
    state.compare = state.compare.filter((m) => m !== id);
    if (box.checked) state.compare.push(id);
    while (state.compare.length > 2) {
      const dropped = state.compare.shift();
      const row = $$('#models tbody tr').find((tr) => tr.dataset.model === dropped);
      if (row) $('input.compare', row).checked = false;
    }
    renderCompare();
  }

  function renderCompare() {
    const box = $('#compare');
    const models = state.compare.map((id) => (state.models || []).find((m) => m.id === id)).filter(Boolean);
    if (models.length < 2) {
      box.replaceChildren(el('p', { class: 'muted small', text: models.length ? `Comparing ${models[0].id}: select one more model.` : 'Tick two models to compare them side by side.' }));
      return;
    }
    const arch = (m, f) => ((m.architecture && m.architecture[f]) || []).join(', ') || '–';
    const params = [...new Set(models.flatMap((m) => m.supported_parameters || []))].sort();
    const lines = [
      ['Name', (m) => m.name || m.id],
      ['Context', (m) => fmtTokens(m.context_length)],
      ['Max completion', (m) => fmtTokens(m.top_provider && m.top_provider.max_completion_tokens)],
      ['Prompt $/M tokens', (m) => fmtPrice(m.pricing && m.pricing.prompt)],
      ['Completion $/M tokens', (m) => fmtPrice(m.pricing && m.pricing.completion)],
      ['Per request', (m) => fmtPrice(m.pricing && m.pricing.request) === 'free' ? '–' : fmtUsd(Number(m.pricing.request))],
      ['Input', (m) => arch(m, 'input_modalities')],
      ['Output', (m) => arch(m, 'output_modalities')],
      ...params.map((p) => [p, (m) => ((m.supported_parameters || []).includes(p) ? '✓' : '—')]),
    ];
    box.replaceChildren(
      el('div', { class: 'card-head' }, el('h2', { text: 'Compare' }), el('button', { type: 'button', class: 'secondary', id: 'compare-clear', text: 'Clear' })),
      el('div', { class: 'scroll' }, el('table', { class: 'plain compare-table' },
        el('thead', null, el('tr', null, el('th'), models.map((m) => el('th', { text: m.id })))),
        el('tbody', null, lines.map(([label, f]) => {
          const values = models.map((m) => String(f(m)));
          return el('tr', { class: values[0] !== values[1] ? 'differs' : null }, el('th', { text: label }), values.map((v) => el('td', { text: v })));
        })))));
  }

  // ------------------------------------------------------------ routes

  async function loadRoutes() {
    const box = $('#routes');
    try {
      const data = await api('/routing/routes');
      renderRoutes(data);
    } catch (err) {
      state.loaded.routes = false;
      box.replaceChildren(el('div', { class: 'card' }, el('h2', { text: 'Routes' }), emptyNote(`Could not load the routes: ${err.message}`)));
    }
    renderRoutingStatus();
  }

  function describeCandidate(c) {
    if (typeof c === 'string') return c;
    if (c && typeof c === 'object') {
      const parts = Object.entries(c).map(([k, v]) => (v === true ? k : `${k}: ${fmtValue(v)}`));
      return `filter (${parts.join(', ') || 'any model'})`;
    }
    return String(c);
  }

  function renderRoutes(data) {
    const box = $('#routes');
    const routes = data && Array.isArray(data.routes) ? data.routes : [];
    const cards = routes.map((r) => {
      const live = Array.isArray(r.live) ? r.live : null;
      const available = live ? live.filter((c) => c.available).length : 0;
      return el('div', { class: 'card route', dataset: { route: String(r.name) } },
        el('div', { class: 'card-head' }, el('h2', null, 'Route ', el('code', { text: r.name })),
          el('span', { class: 'tag', text: `strategy: ${r.strategy}` }), isNum(r.weight) ? el('span', { class: 'tag', text: `weight ${r.weight}` }) : null,
          live ? el('span', { class: `tag ${available ? 'ok' : 'bad'}`, text: `${available} of ${live.length} available` }) : null),
        el('p', { class: 'small' }, el('span', { class: 'muted', text: 'Candidates: ' }), (r.candidates || []).map(describeCandidate).join(' · ') || '–'),
        live === null ? emptyNote('The catalog is not loaded yet: live candidates unknown.')
          : live.length === 0 ? emptyNote('No model in the catalog matches this route.')
            : table(['Model', 'Context', 'Free', 'Now'], live.map((c) => [
              c.model, fmtTokens(c.context), c.free ? 'free' : '',
              el('span', { class: c.available ? 'ok' : 'bad', text: c.available ? 'available' : (c.why || 'unavailable') })]), [false, true, false, false]),
        Array.isArray(r.missing) && r.missing.length ? el('ul', { class: 'muted small' }, r.missing.map((m) => el('li', { text: m }))) : null);
    });
    if (data && data.catalogLoaded === false) cards.unshift(el('p', { class: 'note warn', text: 'The model catalog is not loaded yet.' }));
    box.replaceChildren(...(cards.length ? cards : [el('div', { class: 'card' }, emptyNote('No routes configured.'))]));
  }

  function renderRoutingStatus() {
    const routing = state.status && state.status.routing;
    const free = routing && routing.freeTier ? Object.entries(routing.freeTier) : [];
    $('#free-tier').replaceChildren(free.length
      ? table(['Account', 'Today', 'Last minute'], free.map(([name, a]) => [name, `${fmtInt(a.usedToday)} / ${fmtInt(a.perDay)}`, `${fmtInt(a.lastMinute)} / ${fmtInt(a.perMinute)}`]), [false, true, true])
      : emptyNote('No free-tier use recorded.'));
    const cooling = routing && routing.cooling ? Object.entries(routing.cooling) : [];
    $('#cooling').replaceChildren(cooling.length
      ? table(['Model', 'For', 'Why'], cooling.map(([m, c]) => [m, fmtDuration(c.for || 0), c.why || '']), [false, true, false])
      : emptyNote('No model is cooling down.'));
  }

  async function recommend() {
    const out = $('#recommend-output');
    const summary = $('#recommend-summary');
    setText($('#recommend-error'), '');
    let body;
    try {
      body = JSON.parse($('#recommend-input').value);
    } catch (err) {
      setText($('#recommend-error'), `Not valid JSON: ${err.message}`);
      return;
    }
    const button = $('#recommend-submit');
    button.disabled = true;
    let data = null;
    try {
      data = await api('/routing/recommend', { method: 'POST', body });
    } catch (err) {
      data = err.data;
      setText($('#recommend-error'), err.message);
    } finally {
      button.disabled = false;
    }
    setText(out, data ? JSON.stringify(data, null, 2) : '');
    summary.replaceChildren();
    if (!data || data.error && !('model' in data)) return;
    const dl = el('dl', { class: 'kv' });
    const add = (k, v) => dl.append(el('dt', { text: k }), el('dd', null, v));
    add('Route', data.route || '–');
    add('Selected model', data.model ? el('strong', { text: data.model }) : el('span', { class: 'bad', text: 'none' }));
    if (data.problem) add('Problem', el('span', { class: 'bad', text: data.problem + (isNum(data.retry_after) ? ` (retry in ${fmtDuration(data.retry_after)})` : '') }));
    add('Fallbacks', Array.isArray(data.fallbacks) && data.fallbacks.length ? data.fallbacks.join(' → ') : 'none');
    add('Reasons', Array.isArray(data.reasons) && data.reasons.length ? el('ul', null, data.reasons.map((r) => el('li', { text: r }))) : '–');
    add('Estimated cost', fmtUsd(data.estimated_cost));
    add('Estimated latency', fmtMs(data.estimated_latency_ms));
    add('Confidence', fmtPct(data.confidence));
    summary.append(dl);
  }

  // ------------------------------------------------------------ alerts

  const alertKey = (a) => `${a.name}|${a.subject || ''}`;

  async function loadAlerts(quiet) {
    try {
      const [alerts, recs] = await Promise.all([
        api('/alerts'),
        quiet ? Promise.resolve(null) : api('/analytics/recommendations').catch((err) => ({ error: err.message })),
      ]);
      state.alerts = new Map((alerts && Array.isArray(alerts.alerts) ? alerts.alerts : []).map((a) => [alertKey(a), a]));
      renderAlerts();
      renderRules(alerts && Array.isArray(alerts.rules) ? alerts.rules : []);
      if (recs) renderRecommendations(recs);
    } catch (err) {
      if (!quiet) $('#alerts').replaceChildren(el('li', { class: 'empty', text: `Could not load the alerts: ${err.message}` }));
    }
  }

  function renderAlerts() {
    const list = [...state.alerts.values()].sort((a, b) =>
      (a.state === 'firing' ? 0 : 1) - (b.state === 'firing' ? 0 : 1) || (b.since || 0) - (a.since || 0));
    const firing = list.filter((a) => a.state === 'firing').length;
    const badge = $('#alerts-count');
    badge.hidden = firing === 0;
    setText(badge, firing);
    $('#alerts').replaceChildren(...(list.length ? list.map((a) => el('li', {
      class: `alert ${a.state === 'firing' ? 'firing' : 'ok'}`, dataset: { alert: String(a.name), state: String(a.state) },
    },
    el('span', { class: 'tag', text: a.state === 'firing' ? 'firing' : 'cleared' }), ' ',
    el('strong', { text: a.name }), a.subject ? el('span', { class: 'muted', text: ` · ${a.subject}` }) : null,
    el('div', { text: a.text || '' }),
    el('div', { class: 'muted small', text: [a.kind, isNum(a.value) ? `value ${fmtValue(a.value)}` : null, isNum(a.threshold) ? `threshold ${fmtValue(a.threshold)}` : null, isNum(a.since) ? `since ${fmtAgo(a.since)}` : null].filter(Boolean).join(' · ') })))
      : [el('li', { class: 'empty', text: 'No alert has fired.' })]));
  }

  function renderRules(rules) {
    const cols = [...new Set(rules.flatMap((r) => Object.keys(r || {})))];
    $('#alert-rules thead').replaceChildren(cols.length ? el('tr', null, cols.map((c) => el('th', { text: prettyName(c) }))) : '');
    $('#alert-rules tbody').replaceChildren(...(rules.length
      ? rules.map((r) => el('tr', null, cols.map((c) => el('td', { text: fmtValue(r[c]) }))))
      : [el('tr', null, el('td', { class: 'empty', text: 'No alert rules configured.' }))]));
  }

  function renderRecommendations(data) {
    const box = $('#recommendations');
    if (data.error) {
      box.replaceChildren(el('li', { class: 'empty', text: `Could not load: ${data.error}` }));
      return;
    }
    const recs = Array.isArray(data.recommendations) ? data.recommendations : [];
    box.replaceChildren(...(recs.length
      ? recs.map((r) => el('li', { dataset: { kind: String(r.kind || '') } }, el('span', { class: 'tag', text: r.kind || 'note' }), ' ', el('span', { text: r.text || '' })))
      : [el('li', { class: 'empty', text: 'No recommendation right now.' })]));
  }

  function onAlertEvent(alert) {
    if (!alert || typeof alert.name !== 'string') return;
    state.alerts.set(alertKey(alert), alert);
    renderAlerts();
    const subject = alert.subject ? ` (${alert.subject})` : '';
    banner(alert.state === 'firing' ? `Alert: ${alert.text || alert.name}${subject}` : `Cleared: ${alert.text || alert.name}${subject}`, alert.state === 'firing' ? 'bad' : 'ok');
  }

  // ------------------------------------------------------------ wiring

  function init() {
    $('#login-form').addEventListener('submit', onLogin);
    $('#logout').addEventListener('click', () => logout(''));
    $('#banner-close').addEventListener('click', () => ($('#banner').hidden = true));
    $('#tabs').addEventListener('click', (event) => {
      const link = event.target.closest('a[data-tab]');
      if (!link || event.ctrlKey || event.metaKey || event.shiftKey) return;
      event.preventDefault(); // no jump to an element of the same id
      if (location.hash !== `#${link.dataset.tab}`) history.pushState(null, '', `#${link.dataset.tab}`);
      showTab(link.dataset.tab);
    });
    window.addEventListener('hashchange', () => { showTab(tabFromHash()); window.scrollTo(0, 0); });
    window.addEventListener('popstate', () => showTab(tabFromHash()));
    window.addEventListener('resize', redrawCharts);

    $('#keys tbody').addEventListener('click', (event) => {
      const button = event.target.closest('button');
      if (!button) return;
      const alias = button.closest('tr').dataset.key;
      const kind = button.classList.contains('probe') ? 'probe' : button.classList.contains('disable') ? 'disable' : button.classList.contains('mark-healthy') ? 'healthy' : null;
      if (kind) keyAction(button, alias, kind);
    });
    $('#probe-all').addEventListener('click', probeAll);
    $('#add-key-form').addEventListener('submit', addKey);

    for (const id of ['#usage-range', '#usage-by']) $(id).addEventListener('change', () => loadTab('usage', true));
    $('#usage-refresh').addEventListener('click', () => loadTab('usage', true));
    $('#perf-range').addEventListener('change', () => loadTab('performance', true));
    $('#perf-refresh').addEventListener('click', () => loadTab('performance', true));
    $('#alerts-refresh').addEventListener('click', () => loadTab('alerts', true));

    for (const id of ['#model-search', '#model-free', '#model-context', '#model-price', '#model-param']) {
      $(id).addEventListener(id === '#model-search' ? 'input' : 'change', renderModels);
    }
    $('#models thead').addEventListener('click', (event) => {
      const th = event.target.closest('th[data-sort]');
      if (!th) return;
      const key = th.dataset.sort;
      state.modelSort = { key, dir: state.modelSort.key === key ? -state.modelSort.dir : 1 };
      renderModels();
    });
    $('#models tbody').addEventListener('change', onCompareToggle);
    $('#compare').addEventListener('click', (event) => {
      if (event.target.id !== 'compare-clear') return;
      state.compare = [];
      for (const box of $$('#models input.compare')) box.checked = false;
      renderCompare();
    });

    $('#recommend-input').value = JSON.stringify({ model: 'free', messages: [{ role: 'user', content: 'Say hello in one word.' }], max_tokens: 64 }, null, 2);
    $('#recommend-submit').addEventListener('click', recommend);
    renderCompare();

    const saved = sessionStorage.getItem(TOKEN_KEY);
    if (saved) {
      session.token = saved;
      $('#login-view').hidden = true;
      $('#app').hidden = false;
      const epoch = session.epoch;
      // Check the token once before starting everything (a stale one: back to the form).
      api('/status').then(startApp, (err) => {
        if (session.epoch === epoch && err.status !== 401 && err.status !== 403) startApp(null);
      });
    } else {
      showLogin('');
    }
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', init);
  else init();
})();
