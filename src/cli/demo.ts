/**
 * `ferry demo` (what `npm start` runs): live-migrate a running VM between two
 * local `ferry vm` processes, show the progress, then verify the result —
 * identical memory at switchover, the destination runs on, its serial
 * heartbeat continues where the source's stopped.
 */
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import cliProgress from 'cli-progress';
import Table from 'cli-table3';
import { parseSize } from '../base/size.js';
import { QmpCommandError } from '../qmp/client.js';
import { QmpProcess, ferryVmArgv, freePort } from './launch.js';

const DEMO_USAGE = `usage: ferry demo [options]

Live-migrates a running VM between two local ferry vm processes and verifies it.

options:
  --mem SIZE              guest RAM (default 1G)
  --rate BYTES            guest dirty rate per second, stress workload (default 32M)
  --smp N                 vCPUs (default 2)
  --max-bandwidth BYTES   migration bandwidth limit in bytes/s, 0 = unlimited (default 0)
  --downtime-limit MS     allowed downtime at switchover (default 300)
  --uri tcp|unix          migration transport (default unix)
  --no-progress           no progress bar, only occasional plain lines
  -h, --help              this text
`;

interface DemoOptions {
  mem: string;
  rate: string;
  smp: number;
  maxBandwidth: number;
  downtimeLimit: number;
  uri: 'tcp' | 'unix';
  progress: boolean;
}

class DemoUsage extends Error {}

/** A size option (src/base/size.ts rules), as a usage error. */
function sizeOption(s: string, what: string): number {
  try {
    return parseSize(s);
  } catch (e) {
    const why = e instanceof Error ? e.message : String(e);
    throw new DemoUsage(`${what}: ${why.charAt(0).toLowerCase()}${why.slice(1)}`);
  }
}

function parseOptions(argv: string[]): DemoOptions | null {
  const o: DemoOptions = {
    mem: '1G',
    rate: '32M',
    smp: 2,
    maxBandwidth: 0,
    downtimeLimit: 300,
    uri: 'unix',
    progress: true,
  };
  for (let i = 0; i < argv.length; i++) {
    let a = argv[i]!;
    let val: string | undefined;
    const eq = a.indexOf('=');
    if (a.startsWith('--') && eq > 0) {
      val = a.slice(eq + 1);
      a = a.slice(0, eq);
    }
    const next = (): string => {
      if (val !== undefined) return val;
      const v = argv[++i];
      if (v === undefined) throw new DemoUsage(`${a}: requires an argument`);
      return v;
    };
    switch (a) {
      case '-h':
      case '--help':
        return null;
      case '--mem': {
        const v = next();
        sizeOption(v, '--mem');
        o.mem = v;
        break;
      }
      case '--rate': {
        const v = next();
        sizeOption(v, '--rate');
        o.rate = v;
        break;
      }
      case '--smp': {
        const n = Number(next());
        if (!Number.isInteger(n) || n < 1 || n > 64) throw new DemoUsage('--smp: must be an integer 1..64');
        o.smp = n;
        break;
      }
      case '--max-bandwidth':
        o.maxBandwidth = sizeOption(next(), '--max-bandwidth');
        break;
      case '--downtime-limit': {
        const n = Number(next());
        if (!Number.isInteger(n) || n < 0) throw new DemoUsage('--downtime-limit: must be a number of milliseconds');
        o.downtimeLimit = n;
        break;
      }
      case '--uri': {
        const v = next();
        if (v !== 'tcp' && v !== 'unix') throw new DemoUsage(`--uri: expected tcp or unix, not '${v}'`);
        o.uri = v;
        break;
      }
      case '--no-progress':
        o.progress = false;
        break;
      case '--progress':
        o.progress = true;
        break;
      default:
        throw new DemoUsage(`${a}: unknown option`);
    }
  }
  return o;
}

/* ------------------------------------------------------------------ VMs */

/** A `ferry vm` of the demo, named, with its serial console in a file. */
class Vm extends QmpProcess {
  readonly serialPath: string;

  constructor(
    readonly name: string,
    dir: string,
    args: string[],
  ) {
    const sock = join(dir, `${name}.qmp`);
    const serialPath = join(dir, `${name}.serial`);
    super(process.execPath, ferryVmArgv(sock, ['-name', name, '-serial', `file:${serialPath}`, ...args]), {
      sock,
      dir,
      what: `${name}: ferry vm`,
      timeoutMs: 30000,
      connectTimeoutMs: 10000,
      commandTimeoutMs: 60000,
      quitCommandMs: 3000,
      quitKillMs: 3000,
      maxOutput: 65536,
      ignoreStdout: true,
    });
    this.serialPath = serialPath;
  }
}

const children = new Set<Vm>();

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

async function startVm(name: string, dir: string, args: string[]): Promise<Vm> {
  const vm = new Vm(name, dir, args);
  children.add(vm);
  return vm.ready();
}

/* ----------------------------------------------------------- formatting */

function fmtBytes(n: number | undefined): string {
  if (n === undefined || !Number.isFinite(n)) return '-';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${i === 0 ? v : v.toFixed(v >= 100 ? 0 : v >= 10 ? 1 : 2)} ${units[i]}`;
}

/** QEMU's mbps is megabits per second (10^6); show megabytes per second. */
function fmtMBps(mbps: number | undefined): string {
  if (mbps === undefined || !Number.isFinite(mbps)) return '-';
  return `${(mbps / 8).toFixed(1)} MB/s`;
}

function fmtMs(ms: number | undefined): string {
  return ms === undefined ? '-' : `${ms} ms`;
}

function percentOf(info: any): number {
  const ram = info?.ram;
  if (!ram || !ram.total) return 0;
  // transferred vs everything to send: moves forward across passes
  const done = ram.transferred ?? ram.total - ram.remaining;
  const p = (done / (done + ram.remaining)) * 100;
  return Math.max(0, Math.min(100, p));
}

function lastHeartbeat(text: string): number | undefined {
  let last: number | undefined;
  for (const m of text.matchAll(/^heartbeat (\d+)\b/gm)) last = Number(m[1]);
  return last;
}

function heartbeats(text: string): number[] {
  return [...text.matchAll(/^heartbeat (\d+)\b/gm)].map((m) => Number(m[1]));
}

function readText(p: string): string {
  return existsSync(p) ? readFileSync(p, 'utf8') : '';
}

const log = (s: string): void => void process.stdout.write(`${s}\n`);

/* ----------------------------------------------------------------- main */

export async function main(argv: string[]): Promise<number> {
  let opts: DemoOptions | null;
  try {
    opts = parseOptions(argv);
  } catch (e) {
    if (e instanceof DemoUsage) {
      process.stderr.write(`ferry demo: ${e.message}\n${DEMO_USAGE}`);
      return 1;
    }
    throw e;
  }
  if (!opts) {
    process.stdout.write(DEMO_USAGE);
    return 0;
  }

  const dir = mkdtempSync(join(tmpdir(), 'ferry-demo-'));
  let bar: cliProgress.SingleBar | undefined;
  let cleaned = false;
  const cleanup = async (): Promise<void> => {
    if (cleaned) return;
    cleaned = true;
    bar?.stop();
    await Promise.all([...children].map((c) => c.quit()));
    children.clear();
    rmSync(dir, { recursive: true, force: true });
  };
  const onSignal = (sig: NodeJS.Signals): void => {
    bar?.stop();
    process.stderr.write(`\nferry demo: ${sig}, stopping the VMs\n`);
    for (const c of children) c.kill();
    children.clear();
    cleaned = true;
    rmSync(dir, { recursive: true, force: true });
    process.exit(sig === 'SIGINT' ? 130 : 143);
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);

  try {
    return await runDemo(opts, dir, (b) => (bar = b));
  } catch (e) {
    bar?.stop();
    const msg = e instanceof QmpCommandError ? `${e.command ?? 'QMP'}: ${e.message}` : e instanceof Error ? e.message : String(e);
    process.stderr.write(`ferry demo: ${msg}\n`);
    for (const c of children) if (c.stderr.trim()) process.stderr.write(`[${c.name} stderr]\n${c.stderr.trim()}\n`);
    return 1;
  } finally {
    await cleanup();
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }
}

async function runDemo(o: DemoOptions, dir: string, setBar: (b: cliProgress.SingleBar) => void): Promise<number> {
  const uri = o.uri === 'unix' ? `unix:${join(dir, 'migrate.sock')}` : `tcp:127.0.0.1:${await freePort()}`;
  const common = ['-m', o.mem, '-smp', String(o.smp)];
  log(`ferry demo: ${o.mem} guest, ${o.smp} vCPUs, dirtying ${o.rate}/s, migrating over ${uri}`);

  log('starting the source (filling its RAM) and the destination (-S -incoming) ...');
  const tBoot = Date.now();
  const [src, dst] = await Promise.all([
    startVm('source', dir, [...common, '-workload', `stress,rate=${o.rate},seed=1`, '-fill', 'text,seed=1']),
    startVm('destination', dir, [...common, '-workload', `stress,rate=${o.rate},seed=1`, '-S', '-incoming', uri]),
  ]);
  const srcStatus = (await src.execute<{ status: string }>('query-status')).status;
  const dstStatus = (await dst.execute<{ status: string }>('query-status')).status;
  log(`source: ${srcStatus}, destination: ${dstStatus} (both up in ${Date.now() - tBoot} ms)`);
  // let the guest run and dirty memory for a moment, and print a heartbeat or two
  await sleep(1500);

  // capabilities: events, and return-path if this build accepts it
  const caps = await src.execute<{ capability: string; state: boolean }[]>('query-migrate-capabilities');
  const known = new Set(caps.map((c) => c.capability));
  if (known.has('events')) {
    await src.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] });
  }
  let returnPath = false;
  if (known.has('return-path')) {
    try {
      await src.execute('migrate-set-capabilities', { capabilities: [{ capability: 'return-path', state: true }] });
      returnPath = true;
    } catch (e) {
      log(`return-path refused (${e instanceof Error ? e.message : String(e)}); going on without it`);
    }
  }
  await src.execute('migrate-set-parameters', { 'max-bandwidth': o.maxBandwidth, 'downtime-limit': o.downtimeLimit });
  const enabled = (await src.execute<{ capability: string; state: boolean }[]>('query-migrate-capabilities'))
    .filter((c) => c.state)
    .map((c) => c.capability);
  log(`capabilities: ${enabled.join(', ') || 'none'}; max-bandwidth ${o.maxBandwidth === 0 ? 'unlimited' : fmtBytes(o.maxBandwidth) + '/s'}, downtime-limit ${o.downtimeLimit} ms`);

  const srcHbBefore = lastHeartbeat(readText(src.serialPath));
  const t0 = Date.now();
  await src.execute('migrate', { uri });

  // progress, every ~200 ms
  const useBar = o.progress && process.stderr.isTTY === true;
  let bar: cliProgress.SingleBar | undefined;
  if (useBar) {
    bar = new cliProgress.SingleBar(
      {
        format: ' {bar} {percentage}% | {speed} | remaining {remaining} | pass {pass} | exp. downtime {edt} | {status}',
        barsize: 30,
        hideCursor: true,
        clearOnComplete: false,
        stopOnComplete: false,
        fps: 10,
      },
      cliProgress.Presets.shades_classic,
    );
    bar.start(100, 0, { speed: '-', remaining: '-', pass: 0, edt: '-', status: 'setup' });
    setBar(bar);
  }
  let info: any;
  let lastLine = 0;
  const timeoutMs = 10 * 60 * 1000;
  for (;;) {
    info = await src.execute('query-migrate');
    const status: string = info.status;
    const pct = status === 'completed' ? 100 : percentOf(info);
    const fields = {
      speed: fmtMBps(info.ram?.mbps),
      remaining: fmtBytes(info.ram?.remaining),
      pass: info.ram?.['dirty-sync-count'] ?? 0,
      edt: fmtMs(info['expected-downtime']),
      status,
    };
    if (bar) bar.update(Math.floor(pct), fields);
    else if (Date.now() - lastLine >= 1000 || ['completed', 'failed', 'cancelled'].includes(status)) {
      lastLine = Date.now();
      log(
        `  [${((Date.now() - t0) / 1000).toFixed(1).padStart(5)} s] ${status.padEnd(9)} ${pct.toFixed(0).padStart(3)}%  ` +
          `${fields.speed}  remaining ${fields.remaining}  pass ${fields.pass}  expected downtime ${fields.edt}`,
      );
    }
    if (status === 'completed' || status === 'failed' || status === 'cancelled') break;
    if (!src.running) throw new Error(`source exited during migration: ${src.stderr.trim()}`);
    if (!dst.running) throw new Error(`destination exited during migration: ${dst.stderr.trim()}`);
    if (Date.now() - t0 > timeoutMs) {
      await src.execute('migrate_cancel').catch(() => undefined);
      throw new Error(`migration did not finish within ${timeoutMs / 1000} s (status ${status}); try a lower --rate`);
    }
    await sleep(200);
  }
  bar?.stop();
  const wall = Date.now() - t0;
  if (info.status !== 'completed') {
    log(`migration ${info.status}: ${info['error-desc'] ?? '(no error description)'}`);
    printTable(info, undefined, [], false);
    return 1;
  }

  // destination: loaded and paused (-S)
  let dinfo: any;
  const dEnd = Date.now() + 30000;
  for (;;) {
    dinfo = await dst.execute('query-migrate');
    if (['completed', 'failed', 'cancelled'].includes(dinfo.status)) break;
    if (Date.now() > dEnd) break;
    await sleep(50);
  }
  const srcRun = (await src.execute<{ status: string }>('query-status')).status;
  const dstRunBefore = (await dst.execute<{ status: string }>('query-status')).status;
  const srcDigest = (await src.execute<{ digest: string }>('x-query-memory-digest')).digest;
  const dstDigest = (await dst.execute<{ digest: string }>('x-query-memory-digest')).digest;
  const digestsEqual = srcDigest === dstDigest;
  const srcHbLast = lastHeartbeat(readText(src.serialPath));

  // run the destination and watch it go on
  await dst.execute('cont');
  let dstHb: number[] = [];
  const hbEnd = Date.now() + 5000;
  while (Date.now() < hbEnd) {
    dstHb = heartbeats(readText(dst.serialPath));
    if (dstHb.length >= 2) break;
    await sleep(100);
  }
  const dstRunAfter = (await dst.execute<{ status: string }>('query-status')).status;
  const dstDigestLater = (await dst.execute<{ digest: string }>('x-query-memory-digest')).digest;
  const running = dstRunAfter === 'running' && dstDigestLater !== dstDigest;
  const hbContinued =
    srcHbLast !== undefined && dstHb.length > 0 && dstHb[0] === srcHbLast + 1 && dstHb.every((n, i) => n === dstHb[0]! + i);

  const short = (d: string): string => d.slice(0, 12);
  const verdicts: [string, boolean, string][] = [
    ['memory digests equal', digestsEqual, `source ${short(srcDigest)}  destination ${short(dstDigest)}`],
    [
      'heartbeat continued',
      hbContinued,
      `source stopped at ${srcHbLast ?? '(none)'}${srcHbBefore !== undefined ? ` (was ${srcHbBefore} at migrate)` : ''}, ` +
        `destination printed ${dstHb.length ? dstHb.slice(0, 4).join(', ') + (dstHb.length > 4 ? ', …' : '') : '(nothing)'}`,
    ],
    [
      'destination running',
      running,
      `status ${dstRunAfter} (was ${dstRunBefore} after loading), memory ${dstDigestLater !== dstDigest ? 'changing' : 'NOT changing'} (${short(dstDigestLater)})`,
    ],
  ];
  log('');
  printTable(info, dinfo, verdicts, returnPath, { wall, srcRun, dstStatus: dinfo?.status });
  const ok = verdicts.every((v) => v[1]);
  log('');
  log(ok ? 'VERIFIED: the guest moved live and runs on at the destination.' : 'NOT VERIFIED: see the table above.');
  return ok ? 0 : 1;
}

function printTable(
  info: any,
  dinfo: any,
  verdicts: [string, boolean, string][],
  returnPath: boolean,
  extra: { wall?: number; srcRun?: string; dstStatus?: string } = {},
): void {
  const ram = info.ram ?? {};
  const t = new Table({ head: ['', 'result'], style: { head: [], border: [] } });
  const row = (k: string, v: string): void => void t.push([k, v]);
  row('status', `${info.status}${extra.srcRun ? ` (source ${extra.srcRun}, destination migration ${extra.dstStatus ?? '?'})` : ''}`);
  row('total time', `${fmtMs(info['total-time'])}${extra.wall !== undefined ? ` (measured here ${extra.wall} ms)` : ''}`);
  row(
    'downtime',
    `${fmtMs(info.downtime)} (source)` + (dinfo && dinfo.downtime !== undefined ? `, ${fmtMs(dinfo.downtime)} (destination)` : ''),
  );
  row('setup time', fmtMs(info['setup-time']));
  row('transferred', `${fmtBytes(ram.transferred)} of ${fmtBytes(ram.total)} RAM`);
  row('throughput', `${fmtMBps(ram.mbps)} (${ram.mbps !== undefined ? ram.mbps.toFixed(0) : '-'} mbps)`);
  row('normal pages', `${ram.normal ?? '-'} (${fmtBytes(ram['normal-bytes'])})`);
  row('zero pages', String(ram.duplicate ?? '-'));
  row('passes', String(ram['dirty-sync-count'] ?? '-'));
  row('return-path', returnPath ? 'on' : 'off');
  if (info['error-desc']) row('error', String(info['error-desc']));
  for (const [name, ok, detail] of verdicts) row(name, `${ok ? 'yes' : 'NO'}: ${detail}`);
  log(t.toString());
}
