/**
 * `ferry report`: one self-contained HTML page per migration. Everything
 * the page needs is inside it: the data, the drawing script (page.js) and
 * the chart library, uPlot, inlined from node_modules; the page fetches
 * nothing when it is viewed.
 *
 * uPlot, because every chart here is a time series: it draws thousands of
 * points on a canvas in milliseconds, is 50 KB minified with no
 * dependencies (ECharts is about 1 MB, Chart.js about 200 KB plus a date
 * adapter for time axes) and is maintained.
 *
 * The summary, the decision log and the forecast tables are rendered here;
 * the charts' series are prepared here too, so the page script only hands
 * them to uPlot.
 */
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { MigrationForecast, MigrationInfo, MigrationTrace } from '../generated/qapi-types.js';
import { fmtBytes, fmtMs } from './format.js';
import type { ReportInput } from './types.js';

/** The page script lives beside the sources (src/report/page.js), not in dist/. */
const PAGE_JS = resolve(dirname(fileURLToPath(import.meta.url)), '../../../src/report/page.js');

export interface ChartSeries {
  label: string;
  values: (number | null)[];
  color: string;
  /** draw as points only */
  points?: boolean;
  /** a stepped line */
  step?: boolean;
  dash?: boolean;
}

export interface ChartSpec {
  id: string;
  title: string;
  unit: string;
  /** seconds since the migration began */
  x: number[];
  series: ChartSeries[];
  /** shown instead when there is nothing to draw */
  empty?: string;
}

const C = { blue: '#1f77b4', orange: '#ff7f0e', green: '#2ca02c', red: '#d62728', purple: '#9467bd', grey: '#7f7f7f', brown: '#8c564b' };

function uplotAssets(): { js: string; css: string } {
  const req = createRequire(import.meta.url);
  const dir = dirname(req.resolve('uplot/package.json'));
  return {
    js: readFileSync(join(dir, 'dist/uPlot.iife.min.js'), 'utf8'),
    css: readFileSync(join(dir, 'dist/uPlot.min.css'), 'utf8'),
  };
}

const esc = (s: unknown): string =>
  String(s).replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c]!);

/** The final query-migrate of a trace (the last sample). */
export function finalInfo(t: MigrationTrace | undefined): MigrationInfo | undefined {
  return t?.samples[t.samples.length - 1]?.info;
}

/** The charts of a report, in page order. */
export function buildCharts(r: ReportInput): ChartSpec[] {
  const src = r.source;
  const x = src.samples.map((s) => s.time / 1000);
  const ram = (f: (i: NonNullable<MigrationInfo['ram']>) => number): (number | null)[] =>
    src.samples.map((s) => (s.info.ram && s.info.status !== 'completed' ? f(s.info.ram) : null));
  const at = (t: number) => t / 1000;
  const charts: ChartSpec[] = [];
  charts.push({
    id: 'throughput', title: 'Throughput', unit: 'MB/s', x,
    series: [{ label: 'throughput (MB/s)', values: ram((m) => m.mbps / 8), color: C.blue }],
  });
  charts.push({
    id: 'remaining', title: 'Remaining', unit: 'MiB', x,
    series: [
      { label: 'remaining (MiB)', values: ram((m) => m.remaining / (1 << 20)), color: C.orange },
      { label: 'transferred (MiB)', values: ram((m) => m.transferred / (1 << 20)), color: C.grey, dash: true },
    ],
  });
  charts.push({
    id: 'dirty-rate', title: 'Dirty rate', unit: 'MB/s', x,
    series: [{ label: 'dirty rate (MB/s)', values: ram((m) => (m['dirty-pages-rate'] * (m['page-size'] ?? 4096)) / 1e6), color: C.red, step: true }],
  });
  // passes: the dirty-sync count over time, and the dirty set at each decision
  const dec = src.decisions;
  const px = [...x, ...dec.map((d) => at(d.time))].sort((a, b) => a - b);
  const passAt = (t: number): number | null => {
    let v: number | null = null;
    for (const s of src.samples) {
      if (s.time / 1000 > t) break;
      v = s.info.ram?.['dirty-sync-count'] ?? v;
    }
    return v;
  };
  const decAt = new Map(dec.map((d) => [at(d.time), d['dirty-bytes'] / (1 << 20)]));
  charts.push({
    id: 'passes', title: 'Passes', unit: 'pass / MiB', x: px,
    series: [
      { label: 'pass (dirty-sync-count)', values: px.map(passAt), color: C.purple, step: true },
      { label: 'dirty set at a decision (MiB)', values: px.map((t) => decAt.get(t) ?? null), color: C.brown, points: true },
    ],
  });
  charts.push({
    id: 'throttle', title: 'CPU throttle (auto-converge)', unit: '%', x,
    series: [{ label: 'throttle (%)', values: src.samples.map((s) => (s.info.status === 'completed' ? null : s.info['cpu-throttle-percentage'] ?? 0)), color: C.green, step: true }],
  });
  const limit = src.parameters['downtime-limit'] ?? 300;
  const dx = [...x, ...dec.map((d) => at(d.time))].sort((a, b) => a - b);
  const edAt = new Map(src.samples.map((s) => [s.time / 1000, s.info.status === 'active' ? s.info['expected-downtime'] ?? null : null]));
  const decEd = new Map(dec.filter((d) => d['expected-downtime'] >= 0).map((d) => [at(d.time), d['expected-downtime']]));
  charts.push({
    id: 'downtime', title: 'Expected downtime vs the limit', unit: 'ms', x: dx,
    series: [
      { label: 'expected downtime (query-migrate)', values: dx.map((t) => edAt.get(t) ?? null), color: C.blue },
      { label: 'switchover estimate at a decision', values: dx.map((t) => decEd.get(t) ?? null), color: C.orange, points: true },
      { label: `downtime-limit (${limit} ms)`, values: dx.map(() => limit), color: C.red, dash: true },
    ],
  });
  const f = r.destination?.faults ?? [];
  const dstStart = r.destination ? r.destination.start - src.start : 0;
  charts.push({
    id: 'faults', title: 'Postcopy page fault latency (destination)', unit: 'ms',
    x: f.map((w) => (w.time + dstStart) / 1000),
    series: [
      { label: 'p50', values: f.map((w) => w['p50-us'] / 1000), color: C.green },
      { label: 'p99', values: f.map((w) => w['p99-us'] / 1000), color: C.orange },
      { label: 'max', values: f.map((w) => w['max-us'] / 1000), color: C.red, points: true },
    ],
    empty: f.length === 0 ? 'No page faults were recorded: the guest did not run on the destination before all of its memory arrived (precopy, or a destination without a trace).' : undefined,
  });
  // the forecast's ETA against what actually remained
  const fin = finalInfo(src);
  const total = fin?.status === 'completed' ? fin['total-time'] : undefined;
  if (total !== undefined && src.samples.some((s) => s.eta !== undefined)) {
    charts.push({
      id: 'eta', title: 'Forecast: ETA vs what remained', unit: 's', x,
      series: [
        { label: 'ETA (forecast)', values: src.samples.map((s) => (s.eta !== undefined ? s.eta / 1000 : null)), color: C.purple },
        { label: 'actual time left', values: src.samples.map((s) => (s.time <= total ? (total - s.time) / 1000 : null)), color: C.grey, dash: true },
      ],
    });
  }
  return charts;
}

function row(k: string, v: string, cls = ''): string {
  return `<tr${cls ? ` class="${cls}"` : ''}><th>${esc(k)}</th><td>${v}</td></tr>`;
}

function summaryTable(r: ReportInput): string {
  const s = finalInfo(r.source) ?? {};
  const d = finalInfo(r.destination);
  const ram = s.ram;
  const caps = r.source.capabilities.filter((c) => c.state).map((c) => c.capability);
  const p = r.source.parameters;
  const passes = ram?.['dirty-sync-count'];
  const rows = [
    row('status', esc(`${s.status ?? '?'}${d?.status ? ` (destination: ${d.status})` : ''}`), s.status === 'completed' ? 'ok' : 'bad'),
    row('total time', esc(fmtMs(s['total-time']))),
    row('downtime', esc(`${fmtMs(s.downtime)} (source)${d?.downtime !== undefined ? `, ${fmtMs(d.downtime)} (destination: source stop to guest running here)` : ''}`)),
    row('setup time', esc(fmtMs(s['setup-time']))),
    row('guest RAM', esc(fmtBytes(r.source['ram-size']))),
    row('transferred', esc(ram ? `${fmtBytes(ram.transferred)} (${ram.normal} normal pages, ${ram.duplicate} zero pages)` : '-')),
    row('throughput', esc(ram ? `${(ram.mbps / 8).toFixed(1)} MB/s average` : '-')),
    row('passes', esc(passes ?? '-')),
    row('postcopy requests', esc(ram?.['postcopy-requests'] ?? 0)),
    row('capabilities', esc(caps.join(', ') || 'none')),
    row('parameters', esc(`max-bandwidth ${p['max-bandwidth'] ? `${((p['max-bandwidth'] ?? 0) / 1e6).toFixed(1)} MB/s` : 'unlimited'}, downtime-limit ${p['downtime-limit']} ms`)),
  ];
  if (s['error-desc']) rows.push(row('error', esc(s['error-desc']), 'bad'));
  const fc = r.source.forecast;
  if (fc) rows.push(row('forecast at the start', esc(forecastVerdict(fc, s['total-time'])), forecastHit(fc, s['total-time']) ? 'ok' : ''));
  if (r.integrity) {
    const i = r.integrity;
    rows.push(
      row(
        'integrity',
        esc(`${i.equal ? 'VERIFIED' : 'MISMATCH'}: ${i.method} source ${i.source.slice(0, 16)}… destination ${i.destination.slice(0, 16)}…`),
        i.equal ? 'ok' : 'bad',
      ),
    );
    for (const c of i.checks ?? []) rows.push(row(c.name, esc(`${c.ok ? 'yes' : 'NO'}: ${c.detail}`), c.ok ? 'ok' : 'bad'));
  } else {
    rows.push(row('integrity', 'not checked (no memory digests were taken)'));
  }
  return `<table class="summary">${rows.join('')}</table>`;
}

export function forecastHit(fc: MigrationForecast, actual: number | undefined): boolean {
  const tt = fc['total-time'];
  return actual !== undefined && tt !== undefined && actual >= tt.low && (tt.high === undefined || actual <= tt.high);
}

function forecastVerdict(fc: MigrationForecast, actual: number | undefined): string {
  const tt = fc['total-time'];
  if (!tt) return `${fc.summary}${actual !== undefined ? `. It completed in ${fmtMs(actual)} (with what was changed after the forecast, e.g. postcopy)` : ''}`;
  const band = `${fmtMs(tt.expected)} (${fmtMs(tt.low)}–${tt.high !== undefined ? fmtMs(tt.high) : '?'})`;
  const hit = actual === undefined ? '' : forecastHit(fc, actual) ? `; actual ${fmtMs(actual)}: inside the band` : `; actual ${fmtMs(actual)}: OUTSIDE the band`;
  return `${fc.summary}. Total time ${band}${hit}`;
}

function decisionsTable(t: MigrationTrace): string {
  if (t.decisions.length === 0) return '<p class="note">No switchover decisions were recorded.</p>';
  const head = '<tr><th>time</th><th>pass</th><th>dirty</th><th>bandwidth</th><th>expected downtime</th><th>limit</th><th>decision</th><th>why</th></tr>';
  const rows = t.decisions.map(
    (d) =>
      `<tr class="${d.decision === 'iterate' ? '' : 'ok'}"><td>${(d.time / 1000).toFixed(2)} s</td><td>${d.pass}</td><td>${esc(fmtBytes(d['dirty-bytes']))}</td>` +
      `<td>${(d.bandwidth / 1e6).toFixed(1)} MB/s</td><td>${d['expected-downtime'] < 0 ? '-' : `${d['expected-downtime']} ms`}</td><td>${d['downtime-limit']} ms</td>` +
      `<td><b>${esc(d.decision)}</b></td><td>${esc(d.reason)}</td></tr>`,
  );
  return `<table class="log">${head}${rows.join('')}</table>`;
}

function forecastTable(fc: MigrationForecast | undefined): string {
  if (!fc) return '<p class="note">No forecast: no dirty rate was measured (calc-dirty-rate) before the migration.</p>';
  const head = '<tr><th>way</th><th>converges</th><th>total time</th><th>downtime</th><th>cost</th></tr>';
  const b = (x: { low: number; expected: number; high?: number } | undefined) =>
    x ? `${fmtMs(x.expected)} <small>(${fmtMs(x.low)}–${x.high !== undefined ? fmtMs(x.high) : '?'})</small>` : '-';
  const rows = fc.options.map(
    (o) => `<tr><td>${esc(o.method)}</td><td>${o.converges ? 'yes' : 'no'}</td><td>${b(o['total-time'])}</td><td>${b(o.downtime)}</td><td>${esc(o.cost)}</td></tr>`,
  );
  const inputs = `dirty rate ${(fc['dirty-rate'] / 1e6).toFixed(1)} MB/s (${esc(fc['dirty-rate-source'])})${fc['working-set'] !== undefined ? `, working set ${esc(fmtBytes(fc['working-set']))}` : ''}, zero pages ${(fc['zero-share'] * 100).toFixed(0)}%, bandwidth ${(fc.bandwidth / 1e6).toFixed(1)} MB/s (${esc(fc['bandwidth-source'])})`;
  return `<p>${esc(fc.summary)}</p><p class="note">Inputs: ${inputs}.</p><table class="log">${head}${rows.join('')}</table>`;
}

function eventsList(r: ReportInput): string {
  const items: { t: number; html: string }[] = [];
  const item = (t: number, side: string, what: string) => items.push({ t, html: `<li><span>${(t / 1000).toFixed(3)} s</span> ${side}: ${esc(what)}</li>` });
  for (const e of r.source.events) {
    if (e.kind === 'pass') continue;
    item(e.time, 'source', e.kind === 'status' ? `status ${e.status}` : e.kind === 'throttle' ? `throttle ${e.throttle}%` : e.kind === 'stop' ? 'guest stopped (switchover)' : 'guest resumed');
  }
  const d = r.destination;
  if (d) {
    const off = d.start - r.source.start;
    for (const e of d.events) {
      if (e.kind === 'pass' || e.kind === 'throttle') continue;
      item(e.time + off, 'destination', e.kind === 'status' ? `status ${e.status}` : e.kind === 'stop' ? 'guest stopped' : 'guest runs here');
    }
  }
  items.sort((a, b) => a.t - b.t);
  return `<ul class="events">${items.map((i) => i.html).join('')}</ul>`;
}

const CSS = `
body{font:14px/1.4 system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#222;padding:0 12px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.sub{color:#666;margin:0 0 16px} table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #eee;vertical-align:top}
table.summary th{width:200px;color:#444;font-weight:600} tr.ok td{color:#176c1f} tr.bad td{color:#b00020;font-weight:600}
table.log{font-size:12.5px} .note{color:#666} .grid{display:grid;grid-template-columns:1fr 1fr;gap:18px}
.chart{border:1px solid #e4e4e4;border-radius:6px;padding:8px;min-height:260px} .chart h3{margin:0 0 6px;font-size:14px}
.chart .empty{color:#888;padding:40px 12px} ul.events{columns:2;font-size:12.5px;padding-left:18px} ul.events span{color:#666;display:inline-block;width:70px}
`;

/** The whole page. */
export function renderReport(r: ReportInput): string {
  const { js, css } = uplotAssets();
  const page = readFileSync(PAGE_JS, 'utf8');
  const charts = buildCharts(r);
  const fin = finalInfo(r.source);
  // JSON in a <script> must not end the element early
  const data = JSON.stringify({ charts }).replace(/</g, '\\u003c');
  return `<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:">
<title>${esc(r.title)}</title>
<style>${css}</style><style>${CSS}</style></head>
<body>
<h1>${esc(r.title)}</h1>
<p class="sub">${esc(r.created)}${r.setup ? ` — ${esc(r.setup)}` : ''} — ${esc(fin?.status ?? '?')}</p>
<h2>Summary</h2>
${summaryTable(r)}
<h2>Charts</h2>
<div class="grid" id="charts"></div>
<h2>Switchover decisions</h2>
${decisionsTable(r.source)}
<h2>Forecast at the start</h2>
${forecastTable(r.source.forecast)}
<h2>Events</h2>
${eventsList(r)}
<script id="report-data" type="application/json">${data}</script>
<script>${js}</script>
<script>${page}</script>
</body></html>
`;
}
