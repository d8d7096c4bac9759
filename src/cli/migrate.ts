/**
 * `ferry migrate SRC DST [options]`: one live migration between two
 * monitors, Ferry or QEMU on either end, the way `virsh migrate` drives
 * one: connect to both, set the capabilities on both and the parameters
 * on both, `migrate-incoming` on the destination (started with
 * `-incoming defer`), `migrate` on the source, a progress bar with the
 * ETA, then the result. With --report (Ferry on the source) both sides
 * are traced and the HTML report is written.
 */
import { resolve } from 'node:path';
import { QmpConnection, isQmpError } from '../client/index.js';
import type { MigrationCapability, MigrationCapabilityStatus, MigrateSetParameters } from '../generated/qapi-types.js';
import { collectReport, writeReport } from '../report/collect.js';
import { resultTable, watchMigration, type Verdict } from './watch.js';

const USAGE = `usage: ferry migrate SRC DST --uri URI [options]

Migrates the VM behind the monitor SRC to the one behind DST (each a unix
socket path, unix:PATH or tcp:HOST:PORT; Ferry or QEMU). The destination
must have been started with -incoming defer (or already listen on URI).

options:
  --uri URI             where the destination listens and the source connects
                        (tcp:HOST:PORT, unix:PATH); required
  --caps CAP[,CAP...]   capabilities to turn on, on both sides (e.g.
                        postcopy-ram,xbzrle,auto-converge; events and
                        return-path are always on)
  --param KEY=VALUE     a migration parameter, on both sides (repeatable;
                        e.g. max-bandwidth=100000000 downtime-limit=300)
  --postcopy-after S    switch to postcopy after S seconds of precopy
                        (needs --caps postcopy-ram)
  --report PATH         trace both sides and write the HTML report (and its
                        .json input) to PATH (needs Ferry on the source)
  --verify              compare x-query-memory-digest of both sides afterwards
                        (needs Ferry on both, the destination started with -S)
  --timeout S           cancel after S seconds (default 600)
  --no-progress         plain lines instead of a progress bar
  -h, --help            this text
`;

class Usage extends Error {}

interface Options {
  src: string;
  dst: string;
  uri: string;
  caps: MigrationCapability[];
  params: Record<string, unknown>;
  postcopyAfter?: number;
  report?: string;
  verify: boolean;
  timeoutMs: number;
  progress: boolean;
}

function parse(argv: string[]): Options | null {
  const pos: string[] = [];
  const o: Partial<Options> & { caps: MigrationCapability[]; params: Record<string, unknown> } = {
    caps: [],
    params: {},
    verify: false,
    timeoutMs: 600_000,
    progress: true,
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    const next = (): string => {
      const v = argv[++i];
      if (v === undefined) throw new Usage(`${a}: requires an argument`);
      return v;
    };
    switch (a) {
      case '-h':
      case '--help':
        return null;
      case '--uri':
        o.uri = next();
        break;
      case '--caps':
        for (const c of next().split(',')) if (c) o.caps.push(c as MigrationCapability);
        break;
      case '--param': {
        const kv = next();
        const eq = kv.indexOf('=');
        if (eq <= 0) throw new Usage(`--param ${kv}: expected KEY=VALUE`);
        const v = kv.slice(eq + 1);
        let val: unknown = v;
        try {
          val = JSON.parse(v);
        } catch {
          /* a string */
        }
        o.params[kv.slice(0, eq)] = val;
        break;
      }
      case '--postcopy-after': {
        const n = Number(next());
        if (!(n >= 0)) throw new Usage('--postcopy-after: expected a number of seconds');
        o.postcopyAfter = n;
        break;
      }
      case '--report':
        o.report = next();
        break;
      case '--verify':
        o.verify = true;
        break;
      case '--timeout': {
        const n = Number(next());
        if (!(n > 0)) throw new Usage('--timeout: expected a number of seconds');
        o.timeoutMs = n * 1000;
        break;
      }
      case '--no-progress':
        o.progress = false;
        break;
      default:
        if (a.startsWith('-')) throw new Usage(`${a}: unknown option`);
        pos.push(a);
    }
  }
  if (pos.length !== 2) throw new Usage('expected two monitors, SRC and DST');
  if (!o.uri) throw new Usage('--uri is required (where the destination listens)');
  if (o.postcopyAfter !== undefined && !o.caps.includes('postcopy-ram')) throw new Usage('--postcopy-after needs --caps postcopy-ram');
  // a COLO migration never completes: it checkpoints until a failover (docs/colo.md)
  if (o.caps.includes('x-colo')) throw new Usage('--caps x-colo: COLO does not complete; start it with migrate and follow query-colo-status (docs/colo.md)');
  return { ...(o as Options), src: pos[0]!, dst: pos[1]! };
}

const log = (s: string): void => void process.stdout.write(`${s}\n`);

export async function main(argv: string[]): Promise<number> {
  let o: Options | null;
  try {
    o = parse(argv);
  } catch (e) {
    if (!(e instanceof Usage)) throw e;
    process.stderr.write(`ferry migrate: ${e.message}\n${USAGE}`);
    return 2;
  }
  if (!o) {
    process.stdout.write(USAGE);
    return 0;
  }
  let src: QmpConnection | undefined;
  let dst: QmpConnection | undefined;
  try {
    src = await QmpConnection.connect(o.src);
    dst = await QmpConnection.connect(o.dst);
    return await run(o, src, dst);
  } catch (e) {
    const msg = isQmpError(e) ? `${e.command ?? 'QMP'}: ${e.errorClass}: ${e.desc}` : e instanceof Error ? e.message : String(e);
    process.stderr.write(`ferry migrate: ${msg}\n`);
    return 1;
  } finally {
    await src?.close().catch(() => undefined);
    await dst?.close().catch(() => undefined);
  }
}

const version = (c: QmpConnection): string => {
  const v = c.greeting.QMP.version;
  return `${v.package.startsWith('ferry') ? 'Ferry' : 'QEMU'} ${v.qemu.major}.${v.qemu.minor}.${v.qemu.micro}${v.package ? ` (${v.package.trim()})` : ''}`;
};

async function run(o: Options, src: QmpConnection, dst: QmpConnection): Promise<number> {
  log(`source ${o.src}: ${version(src)}, ${(await src.queryStatus()).status}`);
  log(`destination ${o.dst}: ${version(dst)}, ${(await dst.queryStatus()).status}`);
  const isFerry = (c: QmpConnection) => c.greeting.QMP.version.package.startsWith('ferry');

  // capabilities, on both sides (as virsh does)
  const caps: MigrationCapabilityStatus[] = [...new Set<MigrationCapability>(['events', ...o.caps])].map((capability) => ({ capability, state: true }));
  await src.migrateSetCapabilities({ capabilities: [...caps, { capability: 'return-path', state: true }] });
  await dst.migrateSetCapabilities({ capabilities: caps });
  if (Object.keys(o.params).length > 0) {
    await src.migrateSetParameters(o.params as MigrateSetParameters);
    await dst.migrateSetParameters(o.params as MigrateSetParameters);
  }
  const on = (await src.queryMigrateCapabilities()).filter((c) => c.state).map((c) => c.capability);
  log(`capabilities: ${on.join(', ')}${Object.keys(o.params).length ? `; parameters: ${Object.entries(o.params).map(([k, v]) => `${k}=${String(v)}`).join(' ')}` : ''}`);

  const report = o.report !== undefined;
  if (report) {
    if (!isFerry(src)) throw new Error('--report needs Ferry on the source (x-trace-migration)');
    await src.xTraceMigration({ enable: true });
    if (isFerry(dst)) await dst.xTraceMigration({ enable: true });
  }
  try {
    await dst.migrateIncoming({ uri: o.uri });
    log(`destination: migrate-incoming ${o.uri}`);
  } catch (e) {
    // started with -incoming URI: it listens already
    if (!isQmpError(e) || !/incoming defer/.test(e.desc)) throw e;
    log(`destination: already listening (not started with -incoming defer); migrating to ${o.uri}`);
  }
  if (isFerry(src)) {
    const f = await src.xQueryMigrateForecast().catch(() => undefined);
    if (f) log(`forecast: ${f.summary}`);
  }
  await src.migrate({ uri: o.uri });
  log(`source: migrate ${o.uri}`);
  let postcopyTimer: NodeJS.Timeout | undefined;
  if (o.postcopyAfter !== undefined) {
    postcopyTimer = setTimeout(() => {
      src.migrateStartPostcopy().then(
        () => log('  (postcopy started)'),
        (e: unknown) => log(`  (migrate-start-postcopy failed: ${e instanceof Error ? e.message : String(e)})`),
      );
    }, o.postcopyAfter * 1000);
  }
  let watched;
  try {
    watched = await watchMigration(src, { progress: o.progress, log, timeoutMs: o.timeoutMs });
  } finally {
    if (postcopyTimer) clearTimeout(postcopyTimer);
  }
  const { info, wallMs } = watched;
  // the destination's own view once it is done too
  let dinfo = await dst.queryMigrate();
  const end = Date.now() + 30000;
  while (!['completed', 'failed', 'cancelled', 'none'].includes(dinfo.status ?? 'none') && Date.now() < end) {
    await new Promise((r) => setTimeout(r, 50));
    dinfo = await dst.queryMigrate();
  }
  const verdicts: Verdict[] = [];
  let integrity;
  if (o.verify && info.status === 'completed') {
    if (!isFerry(src) || !isFerry(dst)) verdicts.push({ name: 'memory digests equal', ok: false, detail: 'not checked: needs Ferry on both sides' });
    else {
      const ds = (await dst.queryStatus()).status;
      if (ds === 'running') verdicts.push({ name: 'memory digests equal', ok: false, detail: 'not checked: the destination runs (start it with -S to verify)' });
      else {
        const a = (await src.xQueryMemoryDigest()).digest;
        const b = (await dst.xQueryMemoryDigest()).digest;
        verdicts.push({ name: 'memory digests equal', ok: a === b, detail: `source ${a.slice(0, 12)}  destination ${b.slice(0, 12)}` });
        integrity = { method: 'x-query-memory-digest', source: a, destination: b, equal: a === b };
      }
    }
  }
  log('');
  log(resultTable(info, dinfo, { wall: wallMs, srcRun: (await src.queryStatus()).status }, verdicts));
  if (report) {
    const r = await collectReport(src, isFerry(dst) ? dst : undefined, {
      title: `ferry migrate ${o.src} → ${o.dst}`,
      setup: `${o.uri}; capabilities ${on.join(', ')}`,
      integrity,
    });
    log(`report: ${writeReport(r, resolve(o.report!)).html}`);
  }
  const ok = info.status === 'completed' && verdicts.every((v) => v.ok);
  return ok ? 0 : 1;
}
