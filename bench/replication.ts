/**
 * Block replication: what mirroring costs the primary's guest. A primary's
 * replicated drive (raw, cache=writeback, the -drive of docs/replication.md)
 * lives in this process and is written as the guest's disk workload writes
 * it (Drive.write, one request at a time); each configuration is measured
 * in the same run, alternated run by run:
 *
 *   off          replication not started: the local image only
 *   ferry-sec    mirrored to a `ferry vm` secondary (replication running:
 *                copy-before-write into the hidden disk, then the secondary disk)
 *   qemu-sec     mirrored to a QEMU 7.2 secondary (the same drives, QEMU's
 *                replication driver and NBD server)
 *   ferry-nbd    mirrored to a `ferry vm` that only exports a raw drive (Ferry's
 *                NBD server alone, no copy-before-write)
 *   qemu-nbd     mirrored to `qemu-nbd -t -f raw` (QEMU's NBD server alone,
 *                no copy-before-write: the export target's own limit)
 *
 * Two loads per configuration: 4 KiB writes at random 4 KiB-aligned
 * offsets (latency: p50, p99, and writes/s), and 1 MiB sequential writes
 * (MiB/s). The secondaries' overlays are emptied by a checkpoint before
 * every run, so every run copies before writing as the first writes after
 * a checkpoint do. As a reference for the disk's own limit, `qemu-img bench`
 * writes the same 4 KiB pattern at depth 1 into a raw file.
 *
 *   node dist/bench/replication.js [--runs 3] [--small 2000] [--big 64M] [--size 64M]
 * Writes bench/results/replication.json.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseSize } from '../src/base/size.js';
import { parseDrive } from '../src/cli/vm-args.js';
import { Drives } from '../src/machine/drives.js';
import { MiB, cleanupTempDirs, median, pollUntil, startFerry, startQemu, tempDir, writeResult, type Vm } from './lib/common.js';

type Config = 'off' | 'ferry-sec' | 'qemu-sec' | 'ferry-nbd' | 'qemu-nbd';
const CONFIGS: Config[] = ['off', 'ferry-sec', 'qemu-sec', 'ferry-nbd', 'qemu-nbd'];

function arg(name: string, dflt: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && process.argv[i + 1] ? process.argv[i + 1]! : dflt;
}

function pct(sorted: Float64Array, q: number): number {
  return sorted[Math.min(sorted.length - 1, Math.ceil(q * sorted.length) - 1)]!;
}

interface RunResult {
  config: Config;
  run: number;
  p50us: number;
  p99us: number;
  smallWritesPerSec: number;
  bigMiBPerSec: number;
}

function qemuImg(...args: string[]): void {
  const r = spawnSync('qemu-img', args, { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`qemu-img ${args.join(' ')}: ${r.stderr}`);
}

/** A secondary (ferry or QEMU) exporting its disk `colo1` with replication running; or qemu-nbd. */
interface Target {
  sock: string;
  checkpoint(): Promise<void>;
  close(): Promise<void>;
}

async function secondary(kind: 'ferry' | 'qemu', dir: string, size: number): Promise<Target> {
  const d = join(dir, kind);
  spawnSync('mkdir', ['-p', d]);
  qemuImg('create', '-f', 'raw', join(d, 's.raw'), String(size));
  qemuImg('create', '-f', 'qcow2', join(d, 'a.qcow2'), String(size));
  qemuImg('create', '-f', 'qcow2', join(d, 'h.qcow2'), String(size));
  const drives = [
    '-drive', `if=none,driver=raw,file.filename=${join(d, 's.raw')},id=colo1`,
    '-drive', `if=none,id=childs1,driver=replication,mode=secondary,top-id=childs1,file.file.filename=${join(d, 'a.qcow2')},file.driver=qcow2,file.backing.file.filename=${join(d, 'h.qcow2')},file.backing.driver=qcow2,file.backing.backing=colo1`,
  ];
  const vm: Vm = kind === 'ferry' ? await startFerry(['-S', '-m', '16M', ...drives], d, { name: 'sec' }) : await startQemu(['-machine', 'none', ...drives], d, { name: 'qsec' });
  const sock = join(d, 'nbd.sock');
  await vm.execute('nbd-server-start', { addr: { type: 'unix', data: { path: sock } } });
  await vm.execute('nbd-server-add', { device: 'colo1', writable: true });
  await vm.execute('xen-set-replication', { enable: true, primary: false });
  return {
    sock,
    checkpoint: async () => void (await vm.execute('xen-colo-do-checkpoint')),
    close: () => vm.quit(),
  };
}

async function ferryNbd(dir: string, size: number): Promise<Target> {
  const d = join(dir, 'ferry-nbd');
  spawnSync('mkdir', ['-p', d]);
  qemuImg('create', '-f', 'raw', join(d, 't.raw'), String(size));
  const vm = await startFerry(['-S', '-m', '16M', '-drive', `if=none,id=colo1,format=raw,file=${join(d, 't.raw')}`], d, { name: 'nbd' });
  const sock = join(d, 'nbd.sock');
  await vm.execute('nbd-server-start', { addr: { type: 'unix', data: { path: sock } } });
  await vm.execute('nbd-server-add', { device: 'colo1', writable: true });
  return { sock, checkpoint: async () => undefined, close: () => vm.quit() };
}

async function qemuNbd(dir: string, size: number): Promise<Target> {
  const d = join(dir, 'qemu-nbd');
  spawnSync('mkdir', ['-p', d]);
  qemuImg('create', '-f', 'raw', join(d, 't.raw'), String(size));
  const sock = join(d, 'nbd.sock');
  const p: ChildProcess = spawn('qemu-nbd', ['-t', '-f', 'raw', '-x', 'colo1', '--cache=writeback', `--socket=${sock}`, join(d, 't.raw')], { stdio: 'ignore' });
  await pollUntil(async () => existsSync(sock), 10000, 20);
  return {
    sock,
    checkpoint: async () => undefined,
    close: async () => {
      p.kill('SIGTERM');
      await new Promise((r) => p.once('exit', r));
    },
  };
}

/** One run of one configuration: a fresh primary drive, replication started unless 'off'. */
async function measure(config: Config, run: number, dir: string, targets: Partial<Record<Config, Target>>, size: number, small: number, big: number): Promise<RunResult> {
  const file = join(dir, `p-${config}-${run}.raw`);
  writeFileSync(file, Buffer.alloc(0));
  qemuImg('create', '-f', 'raw', file, String(size));
  const t = targets[config];
  const sock = t?.sock ?? join(dir, 'none.sock');
  const spec =
    `if=virtio,id=colo1,driver=quorum,read-pattern=fifo,vote-threshold=1,children.0.file.filename=${file},children.0.driver=raw,` +
    `children.1.driver=replication,children.1.mode=primary,children.1.file.driver=nbd,children.1.file.path=${sock},children.1.file.export=colo1`;
  const drives = await Drives.open([parseDrive(spec)]);
  const P = drives.get('colo1')!;
  try {
    if (t !== undefined) {
      await t.checkpoint();
      await drives.replication.startAll('primary');
    }
    // 4 KiB at random aligned offsets, one at a time
    const buf = Buffer.alloc(4096, 0xa5);
    const lat = new Float64Array(small);
    let x = 0x9e3779b9 ^ run;
    const slots = size / 4096;
    const t0 = performance.now();
    for (let i = 0; i < small; i++) {
      x ^= x << 13;
      x ^= x >>> 17;
      x ^= x << 5;
      buf.writeUInt32LE(i, 0);
      const s = performance.now();
      await P.write(((x >>> 0) % slots) * 4096, buf);
      lat[i] = (performance.now() - s) * 1000;
    }
    const smallMs = performance.now() - t0;
    // 1 MiB sequential
    const mb = Buffer.alloc(MiB, 0x3c);
    const b0 = performance.now();
    for (let o = 0; o < big; o += MiB) await P.write(o % size, mb);
    const bigMs = performance.now() - b0;
    if (t !== undefined) {
      const err = drives.replication.getErrorAll();
      if (err !== null) throw new Error(`${config}: replication failed during the run: ${err}`);
      await drives.replication.stopAll(false);
    }
    lat.sort();
    return { config, run, p50us: pct(lat, 0.5), p99us: pct(lat, 0.99), smallWritesPerSec: small / (smallMs / 1000), bigMiBPerSec: big / MiB / (bigMs / 1000) };
  } finally {
    await drives.closeAll();
  }
}

/** qemu-img bench: 4 KiB writes at depth 1 into a raw file (the disk's own limit, QEMU's block layer). */
function qemuImgBench(dir: string, size: number, count: number): number {
  const f = join(dir, 'qib.raw');
  qemuImg('create', '-f', 'raw', f, String(size));
  const t0 = performance.now();
  qemuImg('bench', '-w', '-f', 'raw', '-t', 'writeback', '-d', '1', '-s', '4096', '-S', '4096', '-c', String(count), f);
  return count / ((performance.now() - t0) / 1000);
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const runs = Number(arg('runs', '3'));
  const small = Number(arg('small', '2000'));
  const big = parseSize(arg('big', '64M'));
  const size = parseSize(arg('size', '64M'));
  const dir = tempDir('replication-');
  const targets: Partial<Record<Config, Target>> = {
    'ferry-sec': await secondary('ferry', dir, size),
    'qemu-sec': await secondary('qemu', dir, size),
    'ferry-nbd': await ferryNbd(dir, size),
    'qemu-nbd': await qemuNbd(dir, size),
  };
  const results: RunResult[] = [];
  const qib: number[] = [];
  try {
    for (let r = 0; r < runs; r++) {
      // alternate the order run by run
      const order = r % 2 === 0 ? CONFIGS : [...CONFIGS].reverse();
      for (const c of order) {
        const res = await measure(c, r, dir, targets, size, small, big);
        results.push(res);
        console.log(
          `run ${r} ${c.padEnd(9)} 4K: p50 ${res.p50us.toFixed(0)} us, p99 ${res.p99us.toFixed(0)} us, ${res.smallWritesPerSec.toFixed(0)} writes/s; 1M: ${res.bigMiBPerSec.toFixed(0)} MiB/s`,
        );
      }
      qib.push(qemuImgBench(dir, size, small));
      console.log(`run ${r} qemu-img bench (raw file, 4K, depth 1, incl. process start): ${qib.at(-1)!.toFixed(0)} writes/s`);
    }
  } finally {
    for (const t of Object.values(targets)) await t.close().catch(() => undefined);
    cleanupTempDirs();
  }
  const summary = Object.fromEntries(
    CONFIGS.map((c) => {
      const rs = results.filter((x) => x.config === c);
      const range = (k: keyof RunResult) => [Math.min(...rs.map((x) => x[k] as number)), Math.max(...rs.map((x) => x[k] as number))];
      return [
        c,
        {
          p50us: median(rs.map((x) => x.p50us)),
          p99us: median(rs.map((x) => x.p99us)),
          smallWritesPerSec: median(rs.map((x) => x.smallWritesPerSec)),
          smallWritesPerSecRange: range('smallWritesPerSec'),
          bigMiBPerSec: median(rs.map((x) => x.bigMiBPerSec)),
          bigMiBPerSecRange: range('bigMiBPerSec'),
        },
      ];
    }),
  );
  console.log('\nmedians:');
  for (const [c, s] of Object.entries(summary)) {
    console.log(`  ${c.padEnd(9)} 4K p50 ${s.p50us.toFixed(0)} us p99 ${s.p99us.toFixed(0)} us ${s.smallWritesPerSec.toFixed(0)} w/s; 1M ${s.bigMiBPerSec.toFixed(0)} MiB/s`);
  }
  const p = writeResult('replication', {
    bench: 'replication',
    date: new Date().toISOString(),
    node: process.version,
    runs,
    small,
    bigBytes: big,
    sizeBytes: size,
    results,
    summary,
    qemuImgBenchWritesPerSec: qib,
  });
  console.log(`wrote ${p}`);
}
