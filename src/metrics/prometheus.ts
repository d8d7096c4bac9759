/**
 * `ferry vm -metrics tcp:HOST:PORT`: the VM's migration statistics for
 * fleets, in the Prometheus text format (prom-client), at
 * http://HOST:PORT/metrics. Every scrape reads the figures at that moment:
 * query-migrate of both sides (ferry_migration_*, labelled side="source"
 * or "destination"), the forecast's ETA, the last calc-dirty-rate, the
 * postcopy faults, and counters of the migrations that ended, by result.
 * Port 0 picks a free port; the address is printed on stderr.
 */
import * as http from 'node:http';
import type { AddressInfo } from 'node:net';
import { Counter, Gauge, Registry } from 'prom-client';
import type { MigrationInfo, MigrationStatus } from '../generated/qapi-types.js';
import type { MigrationDestination, MigrationObserver, MigrationSource } from '../migration/index.js';

export interface MetricsDeps {
  source: MigrationSource;
  destination: MigrationDestination;
  observe: MigrationObserver;
  /** guest name (a label on every series) */
  name?: string;
  /** demand-paging faults so far and the latest latencies in µs */
  faultStats?: () => { faults: number; latenciesUs: Float64Array };
}

export interface MetricsServer {
  /** http://HOST:PORT/metrics */
  readonly url: string;
  close(): Promise<void>;
}

const STATUSES: readonly MigrationStatus[] = [
  'none', 'setup', 'cancelling', 'cancelled', 'active', 'postcopy-active', 'completed', 'failed', 'colo',
];
const ENDED: readonly MigrationStatus[] = ['completed', 'failed', 'cancelled'];

/** Parse `tcp:HOST:PORT` (IPv6 hosts in brackets). */
export function parseMetricsAddress(spec: string): { host: string; port: number } {
  const m = /^tcp:(\[[^\]]+\]|[^:]*):(\d+)$/.exec(spec);
  if (!m) throw new Error(`-metrics ${spec}: expected tcp:HOST:PORT`);
  const port = Number(m[2]);
  if (port > 65535) throw new Error(`-metrics ${spec}: port ${port} is out of range`);
  const host = m[1]!.replace(/^\[|\]$/g, '') || '127.0.0.1';
  return { host, port };
}

/** The registry with every series, read at scrape time. */
export function buildRegistry(d: MetricsDeps): Registry {
  const reg = new Registry();
  if (d.name) reg.setDefaultLabels({ guest: d.name });
  const sides = (): [string, MigrationInfo][] => [
    ['source', d.source.info()],
    ['destination', d.destination.info()],
  ];
  const gauge = (name: string, help: string, labels: string[], collect: (g: Gauge<string>) => void) =>
    new Gauge({ name, help, labelNames: labels, registers: [reg], collect() { this.reset(); collect(this); } });

  gauge('ferry_migration_status', 'The migration status: 1 for the current one, per side', ['side', 'status'], (g) => {
    const cur = { source: d.source.status, destination: d.destination.status };
    for (const [side, s] of Object.entries(cur)) for (const st of STATUSES) g.set({ side, status: st }, st === s ? 1 : 0);
  });
  const perSide = (name: string, help: string, pick: (i: MigrationInfo) => number | undefined) =>
    gauge(name, help, ['side'], (g) => {
      for (const [side, info] of sides()) {
        const v = pick(info);
        if (v !== undefined && Number.isFinite(v)) g.set({ side }, v);
      }
    });
  perSide('ferry_migration_total_time_seconds', 'Time since the migration started (total time once it ended)', (i) => ms(i['total-time']));
  perSide('ferry_migration_downtime_seconds', 'Downtime of the completed migration', (i) => ms(i.downtime));
  perSide('ferry_migration_expected_downtime_seconds', 'Downtime a switchover now would cost (remaining / bandwidth)', (i) => ms(i['expected-downtime']));
  perSide('ferry_migration_setup_time_seconds', 'Setup time of the migration', (i) => ms(i['setup-time']));
  perSide('ferry_migration_ram_transferred_bytes', 'RAM bytes sent so far', (i) => i.ram?.transferred);
  perSide('ferry_migration_ram_remaining_bytes', 'RAM bytes still to send', (i) => i.ram?.remaining);
  perSide('ferry_migration_ram_total_bytes', 'Guest RAM', (i) => i.ram?.total);
  perSide('ferry_migration_ram_normal_pages', 'Pages sent whole', (i) => i.ram?.normal);
  perSide('ferry_migration_ram_duplicate_pages', 'Zero pages sent as ZERO records', (i) => i.ram?.duplicate);
  perSide('ferry_migration_ram_dirty_pages_rate', 'Pages the guest dirties per second (over >= 1 s periods)', (i) => i.ram?.['dirty-pages-rate']);
  perSide('ferry_migration_ram_throughput_bits_per_second', 'Stream throughput (query-migrate mbps)', (i) => (i.ram ? i.ram.mbps * 1e6 : undefined));
  perSide('ferry_migration_ram_dirty_sync_count', 'Dirty-log syncs (passes)', (i) => i.ram?.['dirty-sync-count']);
  perSide('ferry_migration_ram_postcopy_requests', 'Pages the destination asked for (postcopy)', (i) => i.ram?.['postcopy-requests']);
  perSide('ferry_migration_cpu_throttle_percent', 'vCPU throttle of auto-converge', (i) => (i.status === 'active' ? i['cpu-throttle-percentage'] ?? 0 : undefined));
  perSide('ferry_migration_xbzrle_cache_bytes', 'XBZRLE bytes sent', (i) => i['xbzrle-cache']?.bytes);
  perSide('ferry_migration_xbzrle_cache_pages', 'XBZRLE pages sent', (i) => i['xbzrle-cache']?.pages);
  perSide('ferry_migration_xbzrle_cache_miss_rate', 'XBZRLE cache miss rate', (i) => i['xbzrle-cache']?.['cache-miss-rate']);
  perSide('ferry_migration_xbzrle_overflow', 'XBZRLE pages that did not encode smaller', (i) => i['xbzrle-cache']?.overflow);

  gauge('ferry_migration_eta_seconds', 'Forecast: time until the running outgoing migration completes', [], (g) => {
    const eta = d.source.isActive() ? d.observe.eta() : undefined;
    if (eta !== undefined) g.set(eta / 1000);
  });
  gauge('ferry_dirty_rate_bytes_per_second', 'The last calc-dirty-rate result', [], (g) => {
    const r = d.observe.queryDirtyRate('millisecond');
    if (r['dirty-rate'] !== undefined) g.set(r['dirty-rate'] * (1 << 20));
  });
  if (d.faultStats) {
    const faults = d.faultStats;
    gauge('ferry_postcopy_page_faults', 'Demand-paging faults resolved since the last postcopy migration began here', [], (g) => g.set(faults().faults));
    gauge('ferry_postcopy_fault_latency_seconds', 'Fault latency quantiles over the recent faults', ['quantile'], (g) => {
      const s = Float64Array.from(faults().latenciesUs).sort();
      if (s.length === 0) return;
      for (const q of [0.5, 0.99, 1]) g.set({ quantile: String(q) }, s[Math.min(s.length - 1, Math.ceil(q * s.length) - 1)]! / 1e6);
    });
  }
  const ended = new Counter({ name: 'ferry_migrations_total', help: 'Migrations that ended, per side and result', labelNames: ['side', 'result'], registers: [reg] });
  for (const side of ['source', 'destination']) for (const r of ENDED) ended.inc({ side, result: r }, 0);
  d.source.on('status', (s) => ENDED.includes(s) && ended.inc({ side: 'source', result: s }));
  d.destination.on('status', (s) => ENDED.includes(s) && ended.inc({ side: 'destination', result: s }));
  return reg;
}

function ms(v: number | undefined): number | undefined {
  return v === undefined ? undefined : v / 1000;
}

/** Serve /metrics on `spec` (tcp:HOST:PORT). */
export async function startMetrics(spec: string, d: MetricsDeps): Promise<MetricsServer> {
  const { host, port } = parseMetricsAddress(spec);
  const reg = buildRegistry(d);
  const server = http.createServer((req, res) => {
    if (req.method !== 'GET' || (req.url !== '/metrics' && !req.url?.startsWith('/metrics?'))) {
      res.writeHead(404, { 'content-type': 'text/plain' }).end('ferry: only /metrics is served here\n');
      return;
    }
    reg.metrics().then(
      (text) => res.writeHead(200, { 'content-type': reg.contentType }).end(text),
      (e: unknown) => res.writeHead(500, { 'content-type': 'text/plain' }).end(`${(e as Error).message}\n`),
    );
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', (e: NodeJS.ErrnoException) => reject(new Error(`-metrics ${spec}: ${e.code === 'EADDRINUSE' ? 'Address already in use' : e.message}`)));
    server.listen(port, host, () => resolve());
  });
  server.unref();
  const a = server.address() as AddressInfo;
  const h = a.family === 'IPv6' ? `[${a.address}]` : a.address;
  return {
    url: `http://${h}:${a.port}/metrics`,
    close: () => new Promise<void>((r) => server.close(() => r())),
  };
}
