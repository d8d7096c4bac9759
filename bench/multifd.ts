/**
 * Does a second channel help on this machine? QEMU 7.2's `multifd` (pages
 * over N extra connections, each with its own send and receive threads)
 * against its single stream, and Ferry's single stream and multifd (one
 * worker thread per channel on each side) beside them, on the
 * incompressible 1 GiB guest:
 *
 *   npm run bench -- multifd [--runs 5] [--channels 2,4]
 *
 * Set up as bench/compare's `prealloc` cell (both destinations resident, so
 * that the data path and not the first touch decides): QEMU's source is
 * `memory-backend-ram` loaded from the random guest saved as a stream
 * (startQemuRandomSource), its destination `memory-backend-ram,prealloc=on`;
 * Ferry `-fill random,seed=1` and `-mem-prealloc`. Destinations start with
 * `-incoming defer`; for multifd both sides get the `multifd` capability and
 * `multifd-channels` before `migrate-incoming`, as QEMU's documentation asks.
 * max-bandwidth 100 GB/s on QEMU (its default, 128 MiB/s, would handicap
 * it), 0 (unlimited) on Ferry; downtime-limit 300 ms. `migrate` comes 1 s
 * after the settings in every configuration, so that Ferry's multifd channel
 * workers, which start when the capability is turned on, are up (a worker
 * thread takes ~70 ms of CPU to start; `--no-pause` measures that too). Warm state (runs back
 * to back); the configurations take turns, starting from a different one on
 * each run. Writes bench/results/multifd.json and prints medians [ranges]
 * with the CPU both processes used.
 */
import { cpus, loadavg } from 'node:os';
import { fileURLToPath } from 'node:url';
import {
  cleanupTempDirs, freePort, median, migrateAndMeasure, startFerry, startQemu, startQemuRandomSource, tempDir, writeResult,
  type Measured, type Vm,
} from './lib/common.js';

const BIG_BW = 100e9;
/** Between the settings and `migrate` (see runOnce). */
const PAUSE_MS = 1000;

interface Config {
  name: string;
  engine: 'ferry' | 'qemu';
  /** multifd channels, 0 = the single migration stream */
  channels: number;
}

interface Run extends Measured {
  config: string;
  run: number;
}

function arg(name: string): string | undefined {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : undefined;
}

async function runOnce(c: Config, run: number): Promise<Run> {
  const dir = tempDir();
  const uri = `tcp:127.0.0.1:${await freePort()}`;
  let src: Vm | null = null;
  let dst: Vm | null = null;
  const rec: Run = { config: c.name, run, ok: false };
  try {
    if (c.engine === 'ferry') {
      src = await startFerry(['-m', '1G', '-workload', 'idle', '-fill', 'random,seed=1'], dir, { name: 'src' });
      dst = await startFerry(['-m', '1G', '-S', '-mem-prealloc', '-incoming', 'defer'], dir, { name: 'dst' });
    } else {
      src = await startQemuRandomSource(dir);
      dst = await startQemu(['-machine', 'none,memory-backend=m', '-object', 'memory-backend-ram,id=m,size=1G,prealloc=on', '-S', '-incoming', 'defer'], dir, { name: 'dst' });
    }
    if (c.channels > 0) {
      for (const vm of [src, dst]) {
        await vm.execute('migrate-set-capabilities', { capabilities: [{ capability: 'multifd', state: true }] });
        await vm.execute('migrate-set-parameters', { 'multifd-channels': c.channels });
      }
    }
    await dst.execute('migrate-incoming', { uri });
    await src.execute('migrate-set-parameters', { 'max-bandwidth': c.engine === 'ferry' ? 0 : BIG_BW, 'downtime-limit': 300 });
    // every configuration, both engines: a pause between the settings and `migrate`, so that
    // Ferry's channel workers (started when multifd is turned on) are up; --no-pause measures their start too
    if (!process.argv.includes('--no-pause')) await new Promise((r) => setTimeout(r, PAUSE_MS));
    Object.assign(rec, await migrateAndMeasure(src, dst, uri, 120000));
  } catch (e) {
    rec.error = e instanceof Error ? e.message : String(e);
  } finally {
    await Promise.all([src?.quit(), dst?.quit()]);
    cleanupTempDirs();
  }
  return rec;
}

async function main(): Promise<void> {
  const runs = Number(arg('runs') ?? 5);
  const channels = (arg('channels') ?? '2,4').split(',').map(Number).filter((n) => n > 0);
  const configs: Config[] = [
    { name: 'qemu, one stream', engine: 'qemu', channels: 0 },
    ...channels.map((n): Config => ({ name: `qemu, multifd ${n} channels`, engine: 'qemu', channels: n })),
    { name: 'ferry, one stream', engine: 'ferry', channels: 0 },
    ...channels.map((n): Config => ({ name: `ferry, multifd ${n} channels`, engine: 'ferry', channels: n })),
  ];
  console.log(`multifd: ${runs} run(s) per configuration; ${cpus().length} CPUs; load ${loadavg().map((l) => l.toFixed(2)).join(' ')}`);
  const all: Run[] = [];
  for (let r = 0; r < runs; r++) {
    for (let k = 0; k < configs.length; k++) {
      const c = configs[(r + k) % configs.length]!;
      const rec = await runOnce(c, r + 1);
      all.push(rec);
      const cpu = (m: Measured['srcCpu']): string => (m ? `${m.userMs}/${m.sysMs}` : '?');
      console.log(`  ${c.name} #${r + 1}: ${rec.ok ? `total ${rec.totalTimeMs} ms, downtime ${rec.downtimeMs} ms, CPU user/sys src ${cpu(rec.srcCpu)} dst ${cpu(rec.dstCpu)} ms` : `FAILED ${rec.error}`}`);
    }
  }
  const rows = configs.map((c) => {
    const ok = all.filter((x) => x.config === c.name && x.ok);
    const t = ok.map((x) => x.totalTimeMs!);
    const cpu = (f: (x: Run) => number): number => median(ok.map(f));
    return {
      config: c.name,
      ok: `${ok.length}/${runs}`,
      totalMs: t.length ? median(t) : NaN,
      minMs: Math.min(...t),
      maxMs: Math.max(...t),
      srcCpuMs: t.length ? cpu((x) => x.srcCpu!.userMs + x.srcCpu!.sysMs) : NaN,
      dstCpuMs: t.length ? cpu((x) => x.dstCpu!.userMs + x.dstCpu!.sysMs) : NaN,
    };
  });
  const base = rows[0]!.totalMs;
  console.log('\nconfiguration                 total ms (median [range])   vs QEMU one stream   CPU src / dst ms (user+sys)');
  for (const row of rows) {
    console.log(`${row.config.padEnd(29)} ${`${row.totalMs} [${row.minMs}–${row.maxMs}]`.padEnd(27)} ${(row.totalMs / base).toFixed(2).padEnd(20)} ${row.srcCpuMs} / ${row.dstCpuMs}   (${row.ok} ok)`);
  }
  console.log(`wrote ${writeResult('multifd', { runs: all, rows, cpus: cpus().length, state: 'warm (back to back)' })}`);
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  main().catch((e) => {
    console.error(e);
    process.exit(1);
  });
}
