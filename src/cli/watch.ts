/**
 * Watching a migration from the command line (the demo and `ferry
 * migrate`): a progress bar on a terminal, or a plain line a second
 * otherwise, with the throughput, what remains, the pass, the expected
 * downtime and the ETA; then the result as a table.
 *
 * The ETA is the source's forecast (x-query-migrate-forecast, asked about
 * once a second); a source without it (QEMU) gets a plain estimate, what
 * remains at the current throughput, marked with "~".
 */
import cliProgress from 'cli-progress';
import Table from 'cli-table3';
import { isQmpError, type QmpApi } from '../generated/qapi-client.js';
import type { MigrationInfo } from '../generated/qapi-types.js';
import { fmtBytes, fmtEta, fmtMBps, fmtMs } from '../report/format.js';

const ENDED = ['completed', 'failed', 'cancelled'];

export interface WatchOptions {
  /** draw a bar when stderr is a terminal (default true) */
  progress?: boolean;
  log: (line: string) => void;
  /** give up (and cancel) after this long (default 10 min) */
  timeoutMs?: number;
  /** poll period (default 200 ms) */
  everyMs?: number;
  /** throws when a process of the migration died */
  checkAlive?: () => void;
  /** the bar, so that a signal handler can stop it */
  onBar?: (bar: cliProgress.SingleBar) => void;
}

/** How far along: transferred against everything to send (moves forward across passes). */
export function percentOf(info: MigrationInfo): number {
  const ram = info.ram;
  if (!ram || !ram.total) return 0;
  const done = ram.transferred;
  const p = (done / (done + ram.remaining)) * 100;
  return Math.max(0, Math.min(100, p));
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Poll the source until the migration ends; resolves with its last query-migrate and the wall time. */
export async function watchMigration(src: QmpApi, o: WatchOptions): Promise<{ info: MigrationInfo; wallMs: number; etaSource: 'forecast' | 'estimate' }> {
  const t0 = Date.now();
  const timeoutMs = o.timeoutMs ?? 10 * 60 * 1000;
  const useBar = (o.progress ?? true) && process.stderr.isTTY === true;
  let bar: cliProgress.SingleBar | undefined;
  if (useBar) {
    bar = new cliProgress.SingleBar(
      {
        format: ' {bar} {percentage}% | {speed} | remaining {remaining} | pass {pass} | exp. downtime {edt} | ETA {eta} | {status}',
        barsize: 30,
        hideCursor: true,
        clearOnComplete: false,
        stopOnComplete: false,
        fps: 10,
      },
      cliProgress.Presets.shades_classic,
    );
    bar.start(100, 0, { speed: '-', remaining: '-', pass: 0, edt: '-', eta: '-', status: 'setup' });
    o.onBar?.(bar);
  }
  let forecast = true;
  let eta = '-';
  let lastForecast = 0;
  let lastLine = 0;
  let info: MigrationInfo;
  try {
    for (;;) {
      info = await src.queryMigrate();
      const status = info.status ?? 'none';
      const done = ENDED.includes(status);
      if (done) eta = status === 'completed' ? '0 s' : '-';
      else if (forecast && Date.now() - lastForecast >= 1000) {
        lastForecast = Date.now();
        try {
          const f = await src.xQueryMigrateForecast();
          eta = f.eta ? fmtEta(f.eta.expected) : f.converges ? '-' : 'never (does not converge)';
        } catch (e) {
          if (!isQmpError(e)) throw e;
          // no forecast here (QEMU), or none yet (nothing measured so far)
          if (e.errorClass === 'CommandNotFound') forecast = false;
          else eta = '-';
        }
      }
      if (!forecast && !done) {
        const bps = ((info.ram?.mbps ?? 0) * 1e6) / 8;
        eta = info.ram && bps > 0 ? `~${fmtEta((info.ram.remaining / bps) * 1000)}` : '-';
      }
      const pct = status === 'completed' ? 100 : percentOf(info);
      const fields = {
        speed: fmtMBps(info.ram?.mbps),
        remaining: fmtBytes(info.ram?.remaining),
        pass: info.ram?.['dirty-sync-count'] ?? 0,
        edt: fmtMs(info['expected-downtime']),
        eta,
        status,
      };
      if (bar) bar.update(Math.floor(pct), fields);
      else if (Date.now() - lastLine >= 1000 || done) {
        lastLine = Date.now();
        o.log(
          `  [${((Date.now() - t0) / 1000).toFixed(1).padStart(5)} s] ${status.padEnd(9)} ${pct.toFixed(0).padStart(3)}%  ` +
            `${fields.speed}  remaining ${fields.remaining}  pass ${fields.pass}  expected downtime ${fields.edt}  ETA ${eta}`,
        );
      }
      if (done) break;
      o.checkAlive?.();
      if (Date.now() - t0 > timeoutMs) {
        await src.migrateCancel().catch(() => undefined);
        throw new Error(`migration did not finish within ${timeoutMs / 1000} s (status ${status})`);
      }
      await sleep(o.everyMs ?? 200);
    }
  } finally {
    bar?.stop();
  }
  return { info, wallMs: Date.now() - t0, etaSource: forecast ? 'forecast' : 'estimate' };
}

export interface Verdict {
  name: string;
  ok: boolean;
  detail: string;
}

/** The result table (as `ferry demo` and `ferry migrate` print it). */
export function resultTable(
  info: MigrationInfo,
  dinfo: MigrationInfo | undefined,
  extra: { wall?: number; srcRun?: string; rows?: [string, string][] } = {},
  verdicts: Verdict[] = [],
): string {
  const ram = info.ram;
  const t = new Table({ head: ['', 'result'], style: { head: [], border: [] } });
  const row = (k: string, v: string): void => void t.push([k, v]);
  row('status', `${info.status}${extra.srcRun ? ` (source ${extra.srcRun}, destination migration ${dinfo?.status ?? '?'})` : ''}`);
  row('total time', `${fmtMs(info['total-time'])}${extra.wall !== undefined ? ` (measured here ${extra.wall} ms)` : ''}`);
  row('downtime', `${fmtMs(info.downtime)} (source)` + (dinfo?.downtime !== undefined ? `, ${fmtMs(dinfo.downtime)} (destination)` : ''));
  row('setup time', fmtMs(info['setup-time']));
  row('transferred', `${fmtBytes(ram?.transferred)} of ${fmtBytes(ram?.total)} RAM`);
  row('throughput', `${fmtMBps(ram?.mbps)} (${ram?.mbps !== undefined ? ram.mbps.toFixed(0) : '-'} mbps)`);
  row('normal pages', `${ram?.normal ?? '-'} (${fmtBytes(ram?.['normal-bytes'])})`);
  row('zero pages', String(ram?.duplicate ?? '-'));
  row('passes', String(ram?.['dirty-sync-count'] ?? '-'));
  for (const [k, v] of extra.rows ?? []) row(k, v);
  if (info['error-desc']) row('error', String(info['error-desc']));
  for (const v of verdicts) row(v.name, `${v.ok ? 'yes' : 'NO'}: ${v.detail}`);
  return t.toString();
}
