/**
 * `ferry demo` (what `npm start` runs): live-migrate a running VM between two
 * local `ferry vm` processes, show the progress, then verify the result —
 * identical memory at switchover, the destination runs on, its serial
 * heartbeat continues where the source's stopped.
 */
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import type cliProgress from 'cli-progress';
import { parseSize } from '../base/size.js';
import { isQmpError } from '../generated/qapi-client.js';
import type { MigrationInfo } from '../generated/qapi-types.js';
import { collectReport, writeReport } from '../report/collect.js';
import { fmtBytes } from '../report/format.js';
import { QmpProcess, ferryVmArgv, freePort } from './launch.js';
import { resultTable, watchMigration, type Verdict } from './watch.js';

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
  --report PATH           where to write the HTML report (default reports/demo-TIME.html;
                          its input, the traces, goes beside it as .json)
  --no-report             no report
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
  /** the report's path, or null for none */
  report: string | null;
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
    report: join('reports', `demo-${new Date().toISOString().replace(/[:.]/g, '-').slice(0, 19)}.html`),
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
      case '--report':
        o.report = next();
        break;
      case '--no-report':
        o.report = null;
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
    const msg = isQmpError(e) ? `${e.command ?? 'QMP'}: ${e.message}` : e instanceof Error ? e.message : String(e);
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
  const [srcVm, dstVm] = await Promise.all([
    startVm('source', dir, [...common, '-workload', `stress,rate=${o.rate},seed=1`, '-fill', 'text,seed=1']),
    startVm('destination', dir, [...common, '-workload', `stress,rate=${o.rate},seed=1`, '-S', '-incoming', uri]),
  ]);
  // the typed client (ferry/client) on both monitors
  const src = srcVm.api;
  const dst = dstVm.api;
  log(`source: ${(await src.queryStatus()).status}, destination: ${(await dst.queryStatus()).status} (both up in ${Date.now() - tBoot} ms)`);

  // let the guest run and dirty memory for a moment, and measure how fast it does (calc-dirty-rate)
  await src.calcDirtyRate({ 'calc-time': 1500, 'calc-time-unit': 'millisecond', 'sample-pages': 4096 });
  await sleep(1600);
  const rate = await src.queryDirtyRate({ 'calc-time-unit': 'millisecond' });
  log(`dirty rate: ${rate['dirty-rate'] ?? '?'} MiB/s (calc-dirty-rate, ${rate.mode}, ${rate['calc-time']} ms)`);

  // capabilities: events and return-path; every migration of both VMs is traced for the report
  await src.migrateSetCapabilities({ capabilities: [{ capability: 'events', state: true }, { capability: 'return-path', state: true }] });
  await src.migrateSetParameters({ 'max-bandwidth': o.maxBandwidth, 'downtime-limit': o.downtimeLimit });
  if (o.report !== null) {
    await src.xTraceMigration({ enable: true });
    await dst.xTraceMigration({ enable: true });
  }
  const enabled = (await src.queryMigrateCapabilities()).filter((c) => c.state).map((c) => c.capability);
  log(`capabilities: ${enabled.join(', ') || 'none'}; max-bandwidth ${o.maxBandwidth === 0 ? 'unlimited' : fmtBytes(o.maxBandwidth) + '/s'}, downtime-limit ${o.downtimeLimit} ms`);
  try {
    const f = await src.xQueryMigrateForecast();
    log(`forecast: ${f.summary}`);
  } catch (e) {
    if (!isQmpError(e)) throw e;
    log(`forecast: none before the migration (${e.desc.charAt(0).toLowerCase()}${e.desc.slice(1)}); the ETA comes from what the migration measures`);
  }

  const srcHbBefore = lastHeartbeat(readText(srcVm.serialPath));
  await src.migrate({ uri });
  const { info, wallMs: wall } = await watchMigration(src, {
    progress: o.progress,
    log,
    onBar: setBar,
    checkAlive: () => {
      if (!srcVm.running) throw new Error(`source exited during migration: ${srcVm.stderr.trim()}`);
      if (!dstVm.running) throw new Error(`destination exited during migration: ${dstVm.stderr.trim()}`);
    },
  });
  const returnPath = enabled.includes('return-path') ? 'on' : 'off';
  if (info.status !== 'completed') {
    log(`migration ${info.status}: ${info['error-desc'] ?? '(no error description)'}`);
    log(resultTable(info, undefined, { rows: [['return-path', returnPath]] }));
    return 1;
  }

  // destination: loaded and paused (-S)
  let dinfo: MigrationInfo = {};
  const dEnd = Date.now() + 30000;
  for (;;) {
    dinfo = await dst.queryMigrate();
    if (['completed', 'failed', 'cancelled'].includes(dinfo.status ?? '')) break;
    if (Date.now() > dEnd) break;
    await sleep(50);
  }
  const srcRun = (await src.queryStatus()).status;
  const dstRunBefore = (await dst.queryStatus()).status;
  const srcDigest = (await src.xQueryMemoryDigest()).digest;
  const dstDigest = (await dst.xQueryMemoryDigest()).digest;
  const digestsEqual = srcDigest === dstDigest;
  const srcHbLast = lastHeartbeat(readText(srcVm.serialPath));

  // run the destination and watch it go on
  await dst.cont();
  let dstHb: number[] = [];
  const hbEnd = Date.now() + 5000;
  while (Date.now() < hbEnd) {
    dstHb = heartbeats(readText(dstVm.serialPath));
    if (dstHb.length >= 2) break;
    await sleep(100);
  }
  const dstRunAfter = (await dst.queryStatus()).status;
  const dstDigestLater = (await dst.xQueryMemoryDigest()).digest;
  const running = dstRunAfter === 'running' && dstDigestLater !== dstDigest;
  const hbContinued =
    srcHbLast !== undefined && dstHb.length > 0 && dstHb[0] === srcHbLast + 1 && dstHb.every((n, i) => n === dstHb[0]! + i);

  const short = (d: string): string => d.slice(0, 12);
  const verdicts: Verdict[] = [
    { name: 'memory digests equal', ok: digestsEqual, detail: `source ${short(srcDigest)}  destination ${short(dstDigest)}` },
    {
      name: 'heartbeat continued',
      ok: hbContinued,
      detail:
        `source stopped at ${srcHbLast ?? '(none)'}${srcHbBefore !== undefined ? ` (was ${srcHbBefore} at migrate)` : ''}, ` +
        `destination printed ${dstHb.length ? dstHb.slice(0, 4).join(', ') + (dstHb.length > 4 ? ', …' : '') : '(nothing)'}`,
    },
    {
      name: 'destination running',
      ok: running,
      detail: `status ${dstRunAfter} (was ${dstRunBefore} after loading), memory ${dstDigestLater !== dstDigest ? 'changing' : 'NOT changing'} (${short(dstDigestLater)})`,
    },
  ];
  log('');
  log(resultTable(info, dinfo, { wall, srcRun, rows: [['return-path', returnPath]] }, verdicts));
  const ok = verdicts.every((v) => v.ok);
  if (o.report !== null) {
    const r = await collectReport(src, dst, {
      title: `ferry demo: ${o.mem} guest dirtying ${o.rate}/s`,
      setup: `${o.smp} vCPUs, ${uri.split(':')[0]} transport, max-bandwidth ${o.maxBandwidth === 0 ? 'unlimited' : fmtBytes(o.maxBandwidth) + '/s'}, downtime-limit ${o.downtimeLimit} ms`,
      integrity: {
        method: 'x-query-memory-digest (source at switchover, destination paused by -S)',
        source: srcDigest,
        destination: dstDigest,
        equal: digestsEqual,
        checks: verdicts.slice(1),
      },
    });
    const { html } = writeReport(r, resolve(o.report));
    log('');
    log(`report: ${html}`);
  }
  log('');
  log(ok ? 'VERIFIED: the guest moved live and runs on at the destination.' : 'NOT VERIFIED: see the table above.');
  return ok ? 0 : 1;
}
