// The live picture: asks the controller's JSON API once a second (docs/api.md) and draws
// hosts, their instances, tunnels, nets and policies, with rates computed from successive
// counters. Names and commands come from users: the DOM is built with text nodes only,
// never from markup, so whatever they hold shows as text.
'use strict';

(() => {
  const TOKEN_KEY = 'vane-admin-credential';
  const FOLLOW_KEY = 'vane-follow';
  const PERIOD_MS = 1000;
  // A tick that waits longer than this is abandoned, so one stuck request cannot stop
  // the picture for good.
  const TIMEOUT_MS = 5000;
  const HISTORY = 60;
  const PALETTE = ['#2f80ed', '#eb5757', '#27ae60', '#f2994a', '#9b51e0', '#00a3a3',
    '#d4a017', '#e056a0', '#56606b', '#7b9e1c'];

  const state = {
    token: null,
    timer: null,
    // Bumped when the credential changes: answers to an older tick are dropped.
    generation: 0,
    busy: false,
    hosts: [],
    nets: [],
    instances: [],
    policies: [],
    hostStats: new Map(), // host name -> HostStats
    instStats: new Map(), // instance id -> InstanceStats
    previous: new Map(), // counter key -> { at, values }: the last sample, for rates
    rates: new Map(), // counter key -> { field: per second }
    follow: sessionStorage.getItem(FOLLOW_KEY),
    history: [], // the followed instance's { rx, tx } bytes per second, oldest first
    updated: null,
  };

  const $ = (id) => document.getElementById(id);

  // An element with a class, a title or data attributes, and children: strings become
  // text nodes (Element.append), never markup.
  function el(tag, props, ...children) {
    const e = document.createElement(tag);
    if (props) {
      if (props.class) e.className = props.class;
      if (props.title) e.title = props.title;
      if (props.data) Object.assign(e.dataset, props.data);
    }
    e.append(...children.filter((c) => c !== null && c !== undefined));
    return e;
  }

  const SVG = 'http://www.w3.org/2000/svg';
  function svg(tag, attrs, text) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
    if (text !== undefined) e.textContent = text;
    return e;
  }

  class Refused extends Error {
    constructor(status, detail) {
      super(detail);
      this.status = status;
    }
  }

  class Failed extends Error {
    constructor(status, detail) {
      super(detail);
      this.status = status;
    }
  }

  async function api(path) {
    let r;
    try {
      r = await fetch(path, {
        headers: { Authorization: `Bearer ${state.token}` },
        cache: 'no-store',
        signal: AbortSignal.timeout(TIMEOUT_MS),
      });
    } catch (e) {
      throw new Failed(0, `${path}: ${e.message}`);
    }
    if (r.ok) return r.json();
    let detail = r.statusText;
    try {
      detail = (await r.json()).error || detail;
    } catch (_) {
      // Not the API's JSON error (a proxy's page, say): the status line says enough.
    }
    if (r.status === 401 || r.status === 403) throw new Refused(r.status, detail);
    throw new Failed(r.status, `${path}: ${r.status} ${detail}`);
  }

  // Per-second rates of the numeric fields of `values` since the last sample under `key`;
  // null on the first sample or when a counter went back (its agent restarted).
  function sample(key, values, at) {
    const last = state.previous.get(key);
    state.previous.set(key, { at, values });
    if (!last || at <= last.at) return null;
    const seconds = (at - last.at) / 1000;
    const rates = {};
    for (const [k, v] of Object.entries(values)) {
      if (typeof v !== 'number' || typeof last.values[k] !== 'number') continue;
      if (v < last.values[k]) return null;
      rates[k] = (v - last.values[k]) / seconds;
    }
    return rates;
  }

  function record(key, values, at, seen) {
    seen.add(key);
    const rates = sample(key, values, at);
    if (rates) state.rates.set(key, rates);
    else state.rates.delete(key);
  }

  // One tick: the four listings, then the counters of every online host and running
  // instance, all at once; a tick is skipped while the previous one is still waiting.
  async function tick() {
    if (state.busy || !state.token) return;
    state.busy = true;
    const generation = state.generation;
    try {
      const [hosts, nets, instances, policies] = await Promise.all(
        ['/v1/hosts', '/v1/nets', '/v1/instances', '/v1/policies'].map(api));
      if (generation !== state.generation) return;
      const hostStats = new Map();
      const instStats = new Map();
      // An offline host, an instance that just ended or moved: its counters are left out
      // of this tick, not the whole picture.
      const quietly = (p) => p.catch((e) => {
        if (e instanceof Refused) throw e;
      });
      await Promise.all([
        ...hosts.filter((h) => h.state === 'online').map((h) => quietly(
          api(`/v1/hosts/${encodeURIComponent(h.name)}/stats`)
            .then((s) => hostStats.set(h.name, { stats: s, at: performance.now() })))),
        ...instances.filter((i) => i.state === 'running').map((i) => quietly(
          api(`/v1/instances/${encodeURIComponent(i.name)}/stats`)
            .then((s) => instStats.set(i.id, { stats: s, at: performance.now() })))),
      ]);
      if (generation !== state.generation) return;
      const seen = new Set();
      for (const [name, { stats, at }] of hostStats) {
        record(`host:${name}`, stats.counters, at, seen);
        for (const p of stats.peers) record(`peer:${name}:${p.host}`, p, at, seen);
      }
      for (const [id, { stats, at }] of instStats) record(`inst:${id}`, stats.port, at, seen);
      for (const key of [...state.previous.keys()]) {
        if (!seen.has(key)) {
          state.previous.delete(key);
          state.rates.delete(key);
        }
      }
      Object.assign(state, { hosts, nets, instances, policies, updated: new Date() });
      state.hostStats = new Map([...hostStats].map(([k, v]) => [k, v.stats]));
      state.instStats = new Map([...instStats].map(([k, v]) => [k, v.stats]));
      remember();
      render();
      message(null);
    } catch (e) {
      if (generation !== state.generation) return;
      if (e instanceof Refused) {
        stop(refusal(e));
      } else {
        $('updated').classList.remove('live');
        message(`The controller did not answer: ${e.message}. Trying again every second.`);
      }
    } finally {
      if (generation === state.generation) state.busy = false;
    }
  }

  function refusal(e) {
    if (e.status === 403) {
      return `This credential is not the administrator's (403 Forbidden: ${e.message}). ` +
        'The live picture shows every tenant\'s hosts and instances: give the admin credential.';
    }
    return `The controller does not accept this credential (401 Unauthorized: ${e.message}). ` +
      'Give the admin credential.';
  }

  // Keeps the followed instance's rates for its sparkline.
  function remember() {
    const inst = followed();
    const r = inst && state.rates.get(`inst:${inst.id}`);
    if (!r) return;
    state.history.push({ rx: r.rx_bytes, tx: r.tx_bytes });
    if (state.history.length > HISTORY) state.history.shift();
  }

  function followed() {
    return state.instances.find((i) => i.name === state.follow) || null;
  }

  function netColor(name) {
    const net = state.nets.find((n) => n.name === name);
    return net ? PALETTE[net.id % PALETTE.length] : '#999';
  }

  function bytes(v) {
    if (v === undefined || v === null) return '-';
    const units = ['B', 'kB', 'MB', 'GB', 'TB'];
    let i = 0;
    while (v >= 1000 && i < units.length - 1) {
      v /= 1000;
      i += 1;
    }
    return `${v >= 100 || i === 0 ? Math.round(v) : v.toFixed(1)} ${units[i]}`;
  }

  const perSecond = (v) => (v === undefined || v === null ? '-' : `${bytes(v)}/s`);

  function count(v) {
    if (v === undefined || v === null) return '-';
    if (v >= 10 || Number.isInteger(v)) return String(Math.round(v));
    return v.toFixed(1);
  }

  const plural = (n, one, many) => `${n} ${n === 1 ? one : many || `${one}s`}`;

  function command(cmd) {
    return cmd.map((a) => (a === '' || /[\s'"\\]/.test(a) ? JSON.stringify(a) : a)).join(' ');
  }

  function render() {
    const s = state;
    const online = s.hosts.filter((h) => h.state === 'online').length;
    const running = s.instances.filter((i) => i.state === 'running').length;
    $('summary').textContent = `${plural(s.hosts.length, 'host')} (${online} online) · ` +
      `${plural(s.nets.length, 'net')} · ${plural(s.instances.length, 'instance')} ` +
      `(${running} running) · ${plural(s.policies.length, 'policy', 'policies')}`;
    const updated = $('updated');
    updated.textContent = `updated ${s.updated.toTimeString().slice(0, 8)}`;
    updated.classList.add('live');
    renderHosts();
    renderTunnels();
    renderFollow();
    renderNets();
    renderPolicies();
  }

  function renderHosts() {
    const byHost = new Map();
    for (const i of state.instances) {
      if (!byHost.has(i.host)) byHost.set(i.host, []);
      byHost.get(i.host).push(i);
    }
    const cards = state.hosts.map((h) => hostCard(h, byHost.get(h.name) || []));
    // Instances placed on a host the controller no longer lists (removed with --force).
    const known = new Set(state.hosts.map((h) => h.name));
    for (const [host, list] of byHost) {
      if (!known.has(host)) {
        cards.push(hostCard({ name: host, state: 'offline', locator: null }, list));
      }
    }
    // The cards are made anew each second: a card that had the keyboard's focus keeps it.
    const focused = document.activeElement && document.activeElement.dataset
      ? document.activeElement.dataset.instance : undefined;
    $('hosts').replaceChildren(...cards);
    if (focused !== undefined) {
      const card = $('hosts').querySelector(`[data-instance="${CSS.escape(focused)}"]`);
      if (card) card.focus();
    }
  }

  function hostCard(h, instances) {
    const stats = state.hostStats.get(h.name);
    const r = state.rates.get(`host:${h.name}`);
    let traffic = null;
    if (stats) {
      const c = stats.counters;
      const drops = Object.entries(c)
        .filter(([k]) => /^(switch_)?drop_/.test(k) && k !== 'switch_drop_refused')
        .reduce((sum, [, v]) => sum + v, 0);
      traffic = el('div', { class: 'host-traffic' },
        el('span', { class: c.switch_drop_refused ? 'refused' : 'quiet' },
          `refused ${count(c.switch_drop_refused || 0)}`,
          r ? ` (${count(r.switch_drop_refused)}/s)` : ''),
        ` · other drops ${count(drops)} · handshakes ${count(c.handshakes_completed || 0)}`,
        stats.encrypted ? '' : ' · plaintext');
    }
    const sorted = [...instances].sort((a, b) => a.name.localeCompare(b.name));
    return el('div', { class: `host ${h.state}`, data: { host: h.name } },
      el('div', { class: 'host-head' },
        el('span', { class: 'name' }, h.name),
        el('span', { class: 'badge' }, h.state)),
      el('div', { class: 'sub' },
        `${h.locator || 'no locator'} · ${plural(instances.length, 'instance')}`),
      traffic,
      ...sorted.map(instanceCard));
  }

  function instanceCard(i) {
    const r = state.rates.get(`inst:${i.id}`);
    const st = state.instStats.get(i.id);
    const card = el('div', {
      class: `inst${i.name === state.follow ? ' followed' : ''}`,
      title: 'Follow its traffic',
      data: { instance: i.name },
    },
    el('div', { class: 'inst-head' },
      el('span', { class: 'name' }, i.name),
      el('span', { class: `state ${i.state}` }, i.migrating ? `moving to ${i.migrating}` : i.state)),
    el('div', { class: 'sub' }, `${i.net} · ${i.ip}`),
    el('div', { class: 'cmd', title: command(i.cmd) }, command(i.cmd)),
    i.state === 'running' ? el('div', { class: 'traffic' },
      el('span', { class: 'in' }, `in ${perSecond(r && r.rx_bytes)}`), ' · ',
      el('span', { class: 'out' }, `out ${perSecond(r && r.tx_bytes)}`),
      st && st.port.refused
        ? el('span', { class: 'refused' }, ` · refused ${count(st.port.refused)}`) : null)
      : null);
    card.tabIndex = 0;
    card.setAttribute('role', 'button');
    card.style.borderLeftColor = netColor(i.net);
    return card;
  }

  // One row per pair of hosts, as the first of the two by name sees it (the other's
  // view when the first has no answer).
  function tunnelPairs() {
    const names = state.hosts.map((h) => h.name).sort();
    const pairs = [];
    for (let a = 0; a < names.length; a += 1) {
      for (let b = a + 1; b < names.length; b += 1) {
        const [x, y] = [names[a], names[b]];
        const fromX = peerOf(x, y);
        const fromY = peerOf(y, x);
        if (fromX) {
          pairs.push({ a: x, b: y, peer: fromX.peer, ab: fromX.rates && fromX.rates.tx_bytes, ba: fromX.rates && fromX.rates.rx_bytes });
        } else if (fromY) {
          pairs.push({ a: x, b: y, peer: fromY.peer, ab: fromY.rates && fromY.rates.rx_bytes, ba: fromY.rates && fromY.rates.tx_bytes });
        } else {
          pairs.push({ a: x, b: y, peer: null });
        }
      }
    }
    return pairs;
  }

  function peerOf(host, other) {
    const stats = state.hostStats.get(host);
    const peer = stats && stats.peers.find((p) => p.host === other);
    return peer ? { peer, rates: state.rates.get(`peer:${host}:${other}`) } : null;
  }

  function renderTunnels() {
    const pairs = tunnelPairs();
    const head = el('tr', null, el('th', null, 'hosts'), el('th', null, 'session'),
      el('th', { class: 'num' }, 'handshakes'), el('th', { class: 'num' }, '→'),
      el('th', { class: 'num' }, '←'), el('th', { class: 'num' }, 'refused at each end'));
    const rows = pairs.map((p) => {
      // The API counts refusals per host, not per tunnel: each end's switch, per second.
      const refused = [p.a, p.b].map((h) => {
        const r = state.rates.get(`host:${h}`);
        return `${h} ${r ? `${count(r.switch_drop_refused)}/s` : '-'}`;
      });
      const up = p.peer && p.peer.established;
      return el('tr', { data: { tunnel: `${p.a}-${p.b}` } },
        el('td', null, `${p.a} ⇄ ${p.b}`),
        el('td', { class: up ? 'up' : 'down' },
          p.peer ? (up ? `up, ${p.peer.cipher || 'no cipher'}` : 'idle') : 'unknown'),
        el('td', { class: 'num' }, p.peer ? count(p.peer.handshakes) : '-'),
        el('td', { class: 'num out' }, perSecond(p.ab)),
        el('td', { class: 'num in' }, perSecond(p.ba)),
        el('td', { class: 'num', title: 'packets refused per second by the two hosts\' switches' },
          refused.join(' · ')));
    });
    $('tunnels').replaceChildren(head, ...(rows.length ? rows
      : [el('tr', null, el('td', { class: 'empty' }, 'no tunnels: fewer than two hosts'))]));
    drawMap(pairs);
  }

  // Hosts on a circle, a line per pair: solid when a session is up, thicker the more it
  // carries.
  function drawMap(pairs) {
    const map = $('map');
    const [w, h] = [300, 190];
    const names = state.hosts.map((x) => x.name).sort();
    const at = new Map();
    names.forEach((n, k) => {
      const angle = -Math.PI / 2 + (2 * Math.PI * k) / names.length;
      const radius = names.length === 1 ? 0 : 68;
      at.set(n, [w / 2 + radius * Math.cos(angle) * 1.5, h / 2 + 8 + radius * Math.sin(angle)]);
    });
    const items = [];
    for (const p of pairs) {
      const [x1, y1] = at.get(p.a);
      const [x2, y2] = at.get(p.b);
      const up = p.peer && p.peer.established;
      const total = (p.ab || 0) + (p.ba || 0);
      const width = 1.5 + Math.min(6, Math.log10(1 + total));
      items.push(svg('line', {
        x1, y1, x2, y2,
        stroke: up ? '#1f9d55' : '#b8c0c8',
        'stroke-width': up ? width : 1.5,
        'stroke-dasharray': up ? 'none' : '4 4',
      }));
      if (total > 0) {
        items.push(svg('text', {
          class: 'rate', x: (x1 + x2) / 2, y: (y1 + y2) / 2 - 4, 'text-anchor': 'middle',
        }, perSecond(total)));
      }
    }
    for (const host of state.hosts) {
      const [x, y] = at.get(host.name);
      items.push(svg('circle', {
        class: 'host-dot', cx: x, cy: y, r: 14,
        fill: host.state === 'online' ? '#1f9d55' : '#d64545',
      }));
      items.push(svg('text', { x, y: y + 4, 'text-anchor': 'middle', fill: '#fff' }, host.name));
    }
    map.replaceChildren(...items);
  }

  function renderFollow() {
    const box = $('follow');
    const inst = followed();
    if (!inst) {
      box.replaceChildren(el('p', { class: 'empty' }, state.follow
        ? `${state.follow} is gone.` : 'Click an instance to follow its traffic.'));
      return;
    }
    const r = state.rates.get(`inst:${inst.id}`) || {};
    const st = state.instStats.get(inst.id);
    const port = st ? st.port : {};
    const row = (label, field, cls) => el('tr', null,
      el('td', { class: cls }, label),
      el('td', { class: 'num', data: { rate: field } }, count(r[field])),
      el('td', { class: 'num', data: { total: field } }, count(port[field])));
    const byteRow = (label, field, cls) => el('tr', null,
      el('td', { class: cls }, label),
      el('td', { class: 'num', data: { rate: field } }, perSecond(r[field])),
      el('td', { class: 'num', data: { total: field } }, bytes(port[field])));
    const canvas = document.createElement('canvas');
    const usage = st && st.usage;
    box.replaceChildren(
      el('div', { class: 'title' }, inst.name),
      el('div', { class: 'sub' }, `on ${inst.host} · ${inst.net} · ${inst.ip} · ${inst.state}`),
      el('div', { class: 'cmd' }, command(inst.cmd)),
      canvas,
      el('div', { class: 'legend' },
        el('span', { class: 'in' }, '━ bytes in'), '  ',
        el('span', { class: 'out' }, '━ bytes out'), `  per second, last ${HISTORY} s`),
      el('table', null,
        el('tr', null, el('th', null, ''), el('th', { class: 'num' }, 'per second'),
          el('th', { class: 'num' }, 'total')),
        row('packets in', 'rx_packets', 'in'),
        row('packets out', 'tx_packets', 'out'),
        byteRow('bytes in', 'rx_bytes', 'in'),
        byteRow('bytes out', 'tx_bytes', 'out'),
        row('refused by policy', 'refused', 'refused'),
        row('over its bandwidth limit', 'rate_limited', null),
        row('spoofed source', 'spoofed', null)),
      usage ? el('div', { class: 'sub' },
        `memory ${bytes(usage.memory)} · ${usage.pids} processes · CPU ${(usage.cpu_usec / 1e6).toFixed(1)} s`) : null,
      el('button', { data: { unfollow: '' } }, 'Stop following'));
    sparkline(canvas);
  }

  function sparkline(canvas) {
    const ratio = window.devicePixelRatio || 1;
    const [w, h] = [356, 80];
    canvas.width = w * ratio;
    canvas.height = h * ratio;
    const g = canvas.getContext('2d');
    g.scale(ratio, ratio);
    const points = state.history;
    const max = Math.max(1, ...points.map((p) => Math.max(p.rx || 0, p.tx || 0)));
    const style = getComputedStyle(document.documentElement);
    for (const [field, color] of [['rx', '--in'], ['tx', '--out']]) {
      g.beginPath();
      points.forEach((p, k) => {
        const x = w - (points.length - 1 - k) * (w / (HISTORY - 1));
        const y = h - 4 - ((p[field] || 0) / max) * (h - 18);
        if (k === 0) g.moveTo(x, y);
        else g.lineTo(x, y);
      });
      g.strokeStyle = style.getPropertyValue(color).trim();
      g.lineWidth = 1.5;
      g.stroke();
    }
    g.fillStyle = '#66727f';
    g.font = '10px system-ui, sans-serif';
    g.fillText(`max ${perSecond(max)}`, 4, 11);
  }

  function renderNets() {
    const used = new Map();
    for (const i of state.instances) used.set(i.net, (used.get(i.net) || 0) + 1);
    const head = el('tr', null, el('th', null, 'net'), el('th', null, 'tenant'),
      el('th', null, 'subnet'), el('th', { class: 'num' }, 'instances'));
    const rows = state.nets.map((n) => {
      const swatch = el('span', { class: 'swatch' });
      swatch.style.background = netColor(n.name);
      return el('tr', { data: { net: n.name } },
        el('td', null, swatch, n.name, n.egress ? ' (egress)' : ''),
        el('td', null, n.tenant), el('td', null, n.subnet),
        el('td', { class: 'num' }, String(used.get(n.name) || 0)));
    });
    $('nets').replaceChildren(head, ...(rows.length ? rows
      : [el('tr', null, el('td', { class: 'empty' }, 'no nets'))]));
  }

  function renderPolicies() {
    const head = el('tr', null, el('th', null, 'from'), el('th', null, 'to'), el('th', null, 'port'));
    const rows = state.policies.map((p) => el('tr', null,
      el('td', null, p.from), el('td', null, p.to),
      el('td', null, p.port ? `${p.port.port}/${p.port.proto}` : 'any')));
    $('policies').replaceChildren(head, ...(rows.length ? rows
      : [el('tr', null, el('td', { class: 'empty' }, 'none: nets reach only themselves'))]));
  }

  function setFollow(name) {
    state.follow = name;
    state.history = [];
    if (name) sessionStorage.setItem(FOLLOW_KEY, name);
    else sessionStorage.removeItem(FOLLOW_KEY);
    if (state.updated) render();
  }

  function message(text) {
    const m = $('message');
    m.hidden = !text;
    m.textContent = text || '';
  }

  function start() {
    state.token = sessionStorage.getItem(TOKEN_KEY);
    state.generation += 1;
    state.busy = false;
    $('login').hidden = true;
    $('live').hidden = false;
    $('forget').hidden = false;
    message(null);
    tick();
    state.timer = setInterval(tick, PERIOD_MS);
  }

  // Back to the form, forgetting the credential and what it showed.
  function stop(text) {
    clearInterval(state.timer);
    state.generation += 1;
    state.token = null;
    sessionStorage.removeItem(TOKEN_KEY);
    Object.assign(state, {
      hosts: [], nets: [], instances: [], policies: [], updated: null, history: [],
    });
    state.hostStats.clear();
    state.instStats.clear();
    state.previous.clear();
    state.rates.clear();
    $('live').hidden = true;
    $('forget').hidden = true;
    $('summary').textContent = '';
    $('updated').textContent = '';
    $('login').hidden = false;
    message(text);
    $('token').focus();
  }

  function onClick(ev) {
    if (ev.target.closest('[data-unfollow]')) {
      setFollow(null);
      return;
    }
    const card = ev.target.closest('[data-instance]');
    if (card) setFollow(card.dataset.instance === state.follow ? null : card.dataset.instance);
  }

  function init() {
    // The credential comes in the fragment (never sent to the server); it moves to this
    // tab's storage and leaves the address bar and history at once.
    const m = /(?:^#|&)token=([^&]*)/.exec(window.location.hash);
    if (m) {
      let token = m[1];
      try {
        token = decodeURIComponent(token);
      } catch (_) {
        // Not percent-encoded after all: taken as it is, and the API will judge it.
      }
      sessionStorage.setItem(TOKEN_KEY, token);
      window.history.replaceState(null, '', window.location.pathname + window.location.search);
    }
    $('login').addEventListener('submit', (ev) => {
      ev.preventDefault();
      const token = $('token').value.trim();
      if (!token) return;
      $('token').value = '';
      sessionStorage.setItem(TOKEN_KEY, token);
      start();
    });
    $('forget').addEventListener('click', () => stop(null));
    document.querySelector('main').addEventListener('click', onClick);
    // Instance cards act as buttons from the keyboard too (buttons already do).
    document.querySelector('main').addEventListener('keydown', (ev) => {
      if ((ev.key === 'Enter' || ev.key === ' ') && ev.target.matches('[data-instance]')) {
        ev.preventDefault();
        onClick(ev);
      }
    });
    if (sessionStorage.getItem(TOKEN_KEY)) start();
    else stop(null);
  }

  init();
})();
