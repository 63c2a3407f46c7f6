// Tessera console: the charts, the live profile and the segment builder.
// One file, no build step, no framework. Everything shown is set with textContent or
// comes as HTML rendered (and escaped) by the server; nothing here builds HTML from data.
'use strict';

const csrf = () => document.querySelector('meta[name="csrf-token"]')?.content || '';

async function postJson(url, body) {
  const r = await fetch(url, {
    method: 'POST',
    credentials: 'same-origin',
    headers: { 'Content-Type': 'application/json', Accept: 'application/json', 'X-CSRF-Token': csrf() },
    body: JSON.stringify(body),
  });
  let data = null;
  try { data = await r.json(); } catch (_) { /* no JSON body */ }
  if (r.status === 401) location.href = '/login';
  return { status: r.status, ok: r.ok, data };
}

function el(tag, attrs = {}, ...children) {
  const ns = attrs.svg ? 'http://www.w3.org/2000/svg' : null;
  const e = ns ? document.createElementNS(ns, tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'svg' || v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else if (k === 'text') e.textContent = v;
    else if (k === 'value' && !ns) e.value = v;
    else e.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children) if (c) e.append(c);
  return e;
}

// ---------------------------------------------------------------- charts

function fmt(v, digits) {
  if (v === undefined || v === null || Number.isNaN(v)) return '—';
  if (digits !== undefined) return Number(v).toFixed(digits);
  if (Math.abs(v) >= 100 || Number.isInteger(v)) return Math.round(v).toLocaleString('en');
  return Number(v).toFixed(v < 1 ? 3 : 1);
}

function draw(fig, series) {
  const prefixes = fig.dataset.chart.split(',');
  const spark = fig.dataset.spark === '1';
  const keys = Object.keys(series).filter((k) => prefixes.some((p) => k.startsWith(p))).sort();
  const plot = fig.querySelector('.plot');
  const legend = fig.querySelector('.legend');
  const w = spark ? 140 : 480;
  const h = spark ? 28 : 150;
  let tmin = Infinity; let tmax = -Infinity; let ymax = 0;
  for (const k of keys) {
    for (const [t, v] of series[k]) {
      tmin = Math.min(tmin, t); tmax = Math.max(tmax, t); ymax = Math.max(ymax, v);
    }
  }
  const svg = el('svg', { svg: true, viewBox: `0 0 ${w} ${h}`, class: 'lines', role: 'img', 'aria-label': fig.querySelector('figcaption')?.textContent || 'chart' });
  if (!keys.length || tmin === Infinity) {
    plot.replaceChildren(el('p', { class: 'none', text: fig.dataset.empty || 'No readings yet.' }));
    if (legend) legend.replaceChildren();
    return;
  }
  const top = ymax > 0 ? ymax * 1.1 : 1;
  const span = Math.max(tmax - tmin, 1);
  const pad = spark ? 1 : 4;
  keys.forEach((k, i) => {
    const pts = series[k].map(([t, v]) =>
      `${(pad + ((t - tmin) / span) * (w - 2 * pad)).toFixed(1)},${(h - pad - (v / top) * (h - 2 * pad)).toFixed(1)}`);
    svg.append(el('polyline', { svg: true, points: pts.join(' '), class: `s${i % 8}`, fill: 'none' }));
  });
  if (!spark) {
    svg.append(el('text', { svg: true, x: 4, y: 12, class: 'axis', text: `${fmt(top)} ${fig.dataset.unit || ''}` }));
    svg.append(el('text', { svg: true, x: w - 4, y: h - 4, class: 'axis end', text: `last ${span >= 120000 ? `${Math.round(span / 60000)} min` : `${Math.round(span / 1000)} s`}` }));
  }
  plot.replaceChildren(svg);
  if (legend) {
    const common = prefixes.length === 1 ? prefixes[0] : '';
    legend.replaceChildren(...keys.map((k, i) => {
      const last = series[k][series[k].length - 1];
      return el('li', { 'data-series': k }, el('span', { class: `swatch s${i % 8}` }),
        el('span', { class: 'name', text: k.slice(common.length) || k }),
        el('span', { class: 'latest', text: `${fmt(last ? last[1] : null)} ${fig.dataset.unit || ''}` }));
    }));
  }
}

async function refreshCharts() {
  const figs = [...document.querySelectorAll('[data-chart]')];
  const latest = [...document.querySelectorAll('[data-latest]')];
  const status = document.querySelector('[data-status]');
  const prefixes = new Set();
  figs.forEach((f) => f.dataset.chart.split(',').forEach((p) => prefixes.add(p)));
  latest.forEach((e) => prefixes.add(e.dataset.latest));
  if (status) prefixes.add(status.dataset.status);
  if (!prefixes.size) return;
  let every = 1000;
  try {
    const r = await fetch(`/api/series?prefixes=${encodeURIComponent([...prefixes].join(','))}`,
      { headers: { Accept: 'application/json' }, credentials: 'same-origin' });
    if (r.status === 401) { location.href = '/login'; return; }
    const body = await r.json();
    every = body.every_ms || every;
    figs.forEach((f) => draw(f, body.series));
    for (const e of latest) {
      const s = body.series[e.dataset.latest];
      if (s && s.length) e.textContent = fmt(s[s.length - 1][1], e.dataset.digits ? Number(e.dataset.digits) : undefined);
    }
    if (status) {
      status.replaceChildren(...Object.keys(body.series).filter((k) => k.startsWith('up.')).sort().map((k) => {
        const s = body.series[k];
        const up = s.length && s[s.length - 1][1] > 0;
        return el('span', { class: up ? 'chip up' : 'chip down', text: `${k.slice(3)} ${up ? 'up' : 'down'}` });
      }));
    }
  } catch (_) { /* the next round tries again */ }
  setTimeout(refreshCharts, every);
}

// ---------------------------------------------------------------- live profile

function followProfile() {
  const root = document.getElementById('profile');
  if (!root) return;
  const id = root.dataset.profileId;
  const panel = document.getElementById('panel');
  const status = document.getElementById('live-status');
  let updates = 0;
  const reload = async () => {
    const r = await fetch(`/profiles/${encodeURIComponent(id)}/panel`, { headers: { Accept: 'text/html' }, credentials: 'same-origin' });
    if (r.redirected || r.status === 401) { location.href = '/login'; return; }
    if (!r.ok) return;
    // Keep open what the reader opened ("why" of a trait, an event's properties).
    const open = new Set([...panel.querySelectorAll('details[open]')].map((d) => d.closest('[data-message-id],tr')?.textContent));
    panel.innerHTML = await r.text();
    panel.querySelectorAll('details').forEach((d) => { if (open.has(d.closest('[data-message-id],tr')?.textContent)) d.open = true; });
    updates += 1;
    root.dataset.updates = String(updates);
    status.textContent = `live · updated ${new Date().toLocaleTimeString()}`;
  };
  const es = new EventSource(`/profiles/${encodeURIComponent(id)}/stream`);
  es.addEventListener('ready', () => {
    root.classList.add('connected');
    status.textContent = 'live';
    // What changed between rendering the page and following it.
    reload();
  });
  es.addEventListener('changed', reload);
  es.onerror = () => { root.classList.remove('connected'); status.textContent = 'reconnecting…'; };
}

// ---------------------------------------------------------------- segment builder

const KINDS = {
  trait: 'Trait',
  computed: 'Computed trait',
  event_count: 'Event count',
  in_segment: 'In segment',
  has_identifier: 'Has identifier',
  consent: 'Consent granted',
  group: 'Group (all / any)',
};
const OPS = { equals: '=', not_equals: '≠', gt: '>', gte: '≥', lt: '<', lte: '≤', in: 'one of', contains: 'contains', exists: 'exists' };

// A typed value: "quoted" is a string, numbers, true/false and null are themselves.
function parseValue(text, op) {
  const t = String(text ?? '').trim();
  if (op === 'exists') return t !== 'false';
  if (op === 'in') return t === '' ? [] : t.split(',').map((x) => parseValue(x, 'equals'));
  if (['gt', 'gte', 'lt', 'lte'].includes(op)) return t === '' || Number.isNaN(Number(t)) ? t : Number(t);
  if (/^".*"$/.test(t)) return t.slice(1, -1);
  if (t !== '' && !Number.isNaN(Number(t))) return Number(t);
  if (t === 'true' || t === 'false') return t === 'true';
  if (t === 'null') return null;
  return t;
}
function showValue(v) {
  if (Array.isArray(v)) return v.map(showValue).join(', ');
  if (typeof v === 'string') return /^(-?[\d.]+|true|false|null)$/.test(v) ? `"${v}"` : v;
  return String(v);
}

function test(node) {
  const t = { name: node.name };
  t[node.op] = parseValue(node.value, node.op);
  return t;
}

function toCondition(n) {
  let c;
  switch (n.kind) {
    case 'group': c = { [n.op]: n.children.map(toCondition) }; break;
    case 'trait': c = { trait: test(n) }; break;
    case 'computed': c = { computed: test(n) }; break;
    case 'event_count': {
      const e = { event: n.event, min: n.min === '' ? 0 : Number(n.min) };
      if (n.max !== '' && n.max !== undefined) e.max = Number(n.max);
      if (n.where.length) e.where = n.where.map((w) => { const t = { property: w.name }; t[w.op] = parseValue(w.value, w.op); return t; });
      if (n.within !== '' && n.within !== undefined) e.within = `${n.within}${n.unit}`;
      c = { event_count: e };
      break;
    }
    case 'in_segment': c = { in_segment: n.segment }; break;
    case 'has_identifier': c = { has_identifier: n.type }; break;
    case 'consent': c = { consent: n.purpose }; break;
    default: c = {};
  }
  return n.negate ? { not: c } : c;
}

function fromTest(t) {
  const op = Object.keys(OPS).find((o) => o in t) || 'equals';
  return { name: t.name ?? t.property ?? '', op, value: showValue(t[op]) };
}

function fromCondition(c) {
  if (c && c.not) {
    const inner = fromCondition(c.not);
    return { ...inner, negate: !inner.negate };
  }
  if (c && (c.all || c.any)) {
    const op = c.all ? 'all' : 'any';
    return { kind: 'group', op, negate: false, children: c[op].map(fromCondition) };
  }
  if (c && c.trait) return { kind: 'trait', negate: false, ...fromTest(c.trait) };
  if (c && c.computed) return { kind: 'computed', negate: false, ...fromTest(c.computed) };
  if (c && c.event_count) {
    const e = c.event_count;
    const m = /^(\d+)([smhdw])$/.exec(e.within || '');
    return {
      kind: 'event_count', negate: false, event: e.event || '', min: e.min ?? 1, max: e.max ?? '',
      within: m ? m[1] : '', unit: m ? m[2] : 'd', where: (e.where || []).map(fromTest),
    };
  }
  if (c && c.in_segment !== undefined) return { kind: 'in_segment', negate: false, segment: c.in_segment };
  if (c && c.has_identifier !== undefined) return { kind: 'has_identifier', negate: false, type: c.has_identifier };
  if (c && c.consent !== undefined) return { kind: 'consent', negate: false, purpose: c.consent };
  return { kind: 'group', op: 'all', negate: false, children: [] };
}

function blank(kind, lists) {
  switch (kind) {
    case 'group': return { kind, op: 'any', negate: false, children: [] };
    case 'trait': case 'computed': return { kind, negate: false, name: kind === 'computed' ? (lists.computed[0] || '') : '', op: 'equals', value: '' };
    case 'event_count': return { kind, negate: false, event: '', min: 1, max: '', within: '', unit: 'd', where: [] };
    case 'in_segment': return { kind, negate: false, segment: lists.segments[0] || '' };
    case 'has_identifier': return { kind, negate: false, type: 'email' };
    default: return { kind: 'consent', negate: false, purpose: lists.purposes[0] || 'marketing' };
  }
}

function builder() {
  const root = document.getElementById('builder');
  if (!root) return;
  const parse = (s, d) => { try { return s ? JSON.parse(s) : d; } catch (_) { return d; } };
  const initial = parse(root.dataset.initial, null);
  const lists = {
    segments: parse(root.dataset.segments, []),
    computed: parse(root.dataset.computed, []),
    identifiers: parse(root.dataset.identifiers, []),
    purposes: parse(root.dataset.purposes, []),
  };
  const meta = {
    id: initial?.id || '', name: initial?.name || '', description: initial?.description || '',
  };
  const replaces = initial?.id || null;
  let tree = initial?.condition ? fromCondition(initial.condition) : { kind: 'group', op: 'all', negate: false, children: [] };
  if (tree.kind !== 'group' || tree.negate) tree = { kind: 'group', op: 'all', negate: false, children: [tree] };

  const datalist = (id, items) => el('datalist', { id }, ...items.map((i) => el('option', { value: i })));
  const preview = el('pre', { id: 'definition-preview', class: 'preview' });
  const message = el('p', { id: 'builder-message', role: 'status' });
  const conditions = el('div', { class: 'conditions' });

  const definition = () => {
    const d = { id: meta.id.trim(), name: meta.name.trim() || meta.id.trim(), condition: toCondition(tree) };
    if (meta.description.trim()) d.description = meta.description.trim();
    return d;
  };
  const changed = () => { preview.textContent = JSON.stringify(definition(), null, 2); };
  const rerender = () => { conditions.replaceChildren(renderGroup(tree, null)); changed(); };
  const say = (text, kind) => { message.textContent = text; message.className = kind || ''; };

  const input = (node, key, attrs = {}) => el('input', {
    ...attrs, value: node[key] ?? '', oninput: (e) => { node[key] = e.target.value; changed(); },
  });
  const select = (node, key, options, attrs = {}) => {
    const s = el('select', { ...attrs, onchange: (e) => { node[key] = e.target.value; changed(); } },
      ...Object.entries(options).map(([v, label]) => el('option', { value: v, text: label })));
    s.value = node[key];
    return s;
  };
  const fromList = (items) => Object.fromEntries(items.map((i) => [i, i]));
  const testRow = (t, what, names) => [
    el('input', { 'aria-label': `${what} name`, name: 'test-name', list: names, placeholder: what, value: t.name, oninput: (e) => { t.name = e.target.value; changed(); } }),
    select(t, 'op', OPS, { 'aria-label': 'operator', name: 'test-op' }),
    el('input', { 'aria-label': 'value', name: 'test-value', placeholder: 'value ("quoted" = text)', value: t.value, oninput: (e) => { t.value = e.target.value; changed(); } }),
  ];

  function renderCondition(n, parent) {
    const row = el('div', { class: `condition kind-${n.kind}`, 'data-kind': n.kind });
    const negate = el('label', { class: 'negate' }, el('input', { type: 'checkbox', name: 'negate', checked: n.negate, onchange: (e) => { n.negate = e.target.checked; changed(); } }), 'not');
    const remove = el('button', { type: 'button', class: 'remove', 'aria-label': 'remove condition', text: '✕', onclick: () => { parent.children.splice(parent.children.indexOf(n), 1); rerender(); } });
    const head = el('span', { class: 'kind', text: KINDS[n.kind] });
    let fields = [];
    let below = null;
    switch (n.kind) {
      case 'trait': fields = testRow(n, 'trait', null); break;
      case 'computed': fields = [select(n, 'name', fromList(lists.computed.length ? lists.computed : [n.name]), { name: 'computed-name', 'aria-label': 'computed trait' }), ...testRow(n, 'computed trait', null).slice(1)]; break;
      case 'event_count': {
        fields = [
          input(n, 'event', { name: 'event', placeholder: 'event name, e.g. Order Completed', 'aria-label': 'event name', class: 'wide' }),
          el('label', {}, 'at least ', input(n, 'min', { name: 'min', type: 'number', min: 0, class: 'num' })),
          el('label', {}, 'at most ', input(n, 'max', { name: 'max', type: 'number', min: 0, class: 'num', placeholder: 'any' })),
          el('label', {}, 'in the last ', el('span', { class: 'row' },
            input(n, 'within', { name: 'within', type: 'number', min: 1, class: 'num', placeholder: 'ever' }),
            select(n, 'unit', { m: 'minutes', h: 'hours', d: 'days', w: 'weeks' }, { name: 'unit', 'aria-label': 'window unit' }))),
        ];
        const where = el('div', { class: 'where' }, ...n.where.map((w) => el('div', { class: 'filter' },
          el('span', { text: 'where property' }), ...testRow(w, 'property', null),
          el('button', { type: 'button', class: 'remove', 'aria-label': 'remove filter', text: '✕', onclick: () => { n.where.splice(n.where.indexOf(w), 1); rerender(); } }))),
          el('button', { type: 'button', class: 'add-filter', text: '+ property filter', onclick: () => { n.where.push({ name: '', op: 'equals', value: '' }); rerender(); } }));
        below = where;
        break;
      }
      case 'in_segment': fields = [select(n, 'segment', fromList(lists.segments.length ? lists.segments : [n.segment]), { name: 'segment', 'aria-label': 'segment' })]; break;
      case 'has_identifier': fields = [el('input', { name: 'identifier-type', list: 'identifier-types', value: n.type, 'aria-label': 'identifier type', oninput: (e) => { n.type = e.target.value; changed(); } })]; break;
      case 'consent': fields = [el('input', { name: 'purpose', list: 'purposes', value: n.purpose, 'aria-label': 'purpose', oninput: (e) => { n.purpose = e.target.value; changed(); } })]; break;
      default: break;
    }
    row.append(negate, head, ...fields, remove);
    if (below) row.append(below);
    return row;
  }

  function renderGroup(g, parent) {
    const box = el('div', { class: 'group', 'data-kind': 'group' });
    const head = el('div', { class: 'group-head' });
    if (parent) head.append(el('label', { class: 'negate' }, el('input', { type: 'checkbox', name: 'negate', checked: g.negate, onchange: (e) => { g.negate = e.target.checked; changed(); } }), 'not'));
    head.append(el('span', { text: 'People matching ' }),
      select(g, 'op', { all: 'all', any: 'any' }, { name: 'group-op', 'aria-label': 'all or any' }),
      el('span', { text: ' of:' }));
    if (parent) head.append(el('button', { type: 'button', class: 'remove', 'aria-label': 'remove group', text: '✕', onclick: () => { parent.children.splice(parent.children.indexOf(g), 1); rerender(); } }));
    box.append(head);
    for (const c of g.children) box.append(c.kind === 'group' ? renderGroup(c, g) : renderCondition(c, g));
    const adder = { kind: 'trait' };
    box.append(el('div', { class: 'add' },
      select(adder, 'kind', KINDS, { name: 'add-kind', 'aria-label': 'condition to add' }),
      el('button', { type: 'button', class: 'add-condition', text: 'Add', onclick: () => { g.children.push(blank(adder.kind, lists)); rerender(); } })));
    return box;
  }

  const dryRun = el('button', { type: 'button', id: 'dry-run', text: 'Dry run: how many?' });
  const save = el('button', { type: 'button', id: 'save', class: 'primary', text: replaces ? 'Save a new version' : 'Save' });
  dryRun.addEventListener('click', async () => {
    say('Counting…');
    const r = await postJson('/segments/dry-run', definition());
    if (!r.ok) say(r.data?.reason || `refused (${r.status})`, 'error');
    else if (r.data.estimated) {
      say(`About ${r.data.size.toLocaleString('en')} of ${r.data.profiles_total.toLocaleString('en')} profiles would be in this segment now (estimated from ${r.data.profiles_scanned.toLocaleString('en')}).`, 'ok');
    } else say(`${r.data.size} of ${r.data.profiles_scanned} profiles would be in this segment now.`, 'ok');
  });
  save.addEventListener('click', async () => {
    say('Saving…');
    const d = definition();
    const r = await postJson('/segments/save', { definition: d, replaces });
    if (r.ok) {
      say(`Saved: ${r.data.id} version ${r.data.version}.`, 'ok');
      setTimeout(() => { location.href = `/segments/${encodeURIComponent(r.data.id)}`; }, 600);
    } else say(r.data?.reason || `refused (${r.status})`, 'error');
  });

  root.replaceChildren(
    datalist('identifier-types', lists.identifiers), datalist('purposes', lists.purposes),
    el('div', { class: 'meta' },
      el('label', {}, 'Id', el('input', { name: 'segment-id', value: meta.id, readonly: !!replaces, required: true, pattern: '[A-Za-z0-9_\\-]+', placeholder: 'e.g. vip-buyers', oninput: (e) => { meta.id = e.target.value; changed(); } })),
      el('label', {}, 'Name', el('input', { name: 'segment-name', value: meta.name, oninput: (e) => { meta.name = e.target.value; changed(); } })),
      el('label', { class: 'grow' }, 'Description', el('input', { name: 'segment-description', value: meta.description, oninput: (e) => { meta.description = e.target.value; changed(); } }))),
    conditions,
    el('div', { class: 'actions' }, dryRun, save, message),
    el('h2', { text: 'The definition it makes' }), preview,
  );
  rerender();
}

document.addEventListener('DOMContentLoaded', () => {
  refreshCharts();
  followProfile();
  builder();
});
