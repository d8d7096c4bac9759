/**
 * Shared helpers for the process-level benchmarks: `ferry vm` and QEMU
 * processes (spawned and driven through src/cli/launch.ts and its
 * QmpClient, as the demo and the tests do), medians, result files.
 *
 * QEMU is started through a symlink named `q72bench` (in the bench cache
 * dir): on the shared machine other people's test cleanups run
 * `pkill qemu-system...`, which would otherwise kill our VMs mid-run.
 */
import { execFileSync, spawn } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, renameSync, symlinkSync, statSync, writeFileSync, mkdtempSync, rmSync } from 'node:fs';
import { homedir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { QmpProcess, ferryVmArgv, freePort, qemuArgv } from '../../src/cli/launch.js';

export { freePort };

const here = dirname(fileURLToPath(import.meta.url));
/** dist/bench/lib -> repo root */
export const REPO_ROOT = resolve(here, '../../..');
export const RESULTS_DIR = join(REPO_ROOT, 'bench', 'results');
export const CACHE_DIR = process.env.FERRY_BENCH_CACHE ?? join(homedir(), '.cache', 'ferry-bench');
export const QEMU_BIN = process.env.QEMU ?? '/usr/bin/qemu-system-x86_64';

export const MiB = 1024 * 1024;
export const GiB = 1024 * MiB;

export function median(a: readonly number[]): number {
  if (a.length === 0) return NaN;
  const s = [...a].sort((x, y) => x - y);
  return s.length % 2 ? s[(s.length - 1) >> 1]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
}

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Calls fn every everyMs until it returns a truthy value (resolved with it), or null after timeoutMs. */
export async function pollUntil<T>(fn: () => Promise<T | null | undefined>, timeoutMs: number, everyMs: number): Promise<T | null> {
  const end = performance.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (performance.now() > end) return null;
    await sleep(everyMs);
  }
}

/** The query-migrate statuses a migration ends in. */
export const MIGRATION_ENDED = ['completed', 'failed', 'cancelled'];

export function writeResult(name: string, data: unknown): string {
  mkdirSync(RESULTS_DIR, { recursive: true });
  const p = join(RESULTS_DIR, `${name}.json`);
  writeFileSync(p, JSON.stringify(data, null, 2) + '\n');
  return p;
}

const tempDirs: string[] = [];
/**
 * Temp dirs live under the cache dir, not /tmp: on the shared machine other
 * people's cleanups remove /tmp/ferry-* while our VMs still use them.
 */
export function tempDir(prefix = 'run-'): string {
  const base = join(CACHE_DIR, 'tmp');
  mkdirSync(base, { recursive: true });
  const d = mkdtempSync(join(base, prefix));
  tempDirs.push(d);
  return d;
}
export function cleanupTempDirs(): void {
  for (const d of tempDirs.splice(0)) rmSync(d, { recursive: true, force: true });
}

/** A path to the QEMU binary under a name other people's `pkill qemu-system` does not match. */
export function qemuBinary(): string {
  mkdirSync(CACHE_DIR, { recursive: true });
  const link = join(CACHE_DIR, 'q72bench');
  if (!existsSync(link)) symlinkSync(QEMU_BIN, link);
  return link;
}

// ---- processes -----------------------------------------------------------

/** A benchmarked `ferry vm` or QEMU: commands time out after 60 s, stdout is discarded. */
export type Vm = QmpProcess;

/** query-migrate on vm every everyMs until the migration has ended: its info, or null after timeoutMs. */
export function untilMigrationEnds(vm: Vm, timeoutMs: number, everyMs: number): Promise<any | null> {
  return pollUntil(async () => {
    const i = await vm.execute('query-migrate');
    return MIGRATION_ENDED.includes(i.status) ? i : null;
  }, timeoutMs, everyMs);
}

/** What one migration measured (migrateAndMeasure). */
export interface Measured {
  ok: boolean;
  error?: string;
  totalTimeMs?: number;
  downtimeMs?: number;
  setupTimeMs?: number;
  transferredBytes?: number;
  /** ms from `migrate` until the destination left inmigrate (client-side) */
  wallToDestDoneMs?: number;
  /** CPU the source and the destination process used over that time (all threads), ms */
  srcCpu?: CpuTimes;
  dstCpu?: CpuTimes;
}

/** User and system CPU time of a process, ms (all its threads; 10 ms resolution). */
export interface CpuTimes {
  userMs: number;
  sysMs: number;
  /** the main thread's part (the thread whose id is the pid) */
  mainUserMs?: number;
  mainSysMs?: number;
}

function statTimes(path: string): { user: number; sys: number } {
  const s = readFileSync(path, 'utf8');
  // fields after the command name (which may hold spaces) start at state (field 3)
  const f = s.slice(s.lastIndexOf(')') + 2).split(' ');
  const tick = 1000 / CLK_TCK;
  return { user: Number(f[11]) * tick, sys: Number(f[12]) * tick };
}

/** CPU times of process `pid` so far, from /proc/PID/stat (utime, stime); null when it is gone. */
export function cpuTimes(pid: number | undefined): CpuTimes | null {
  if (pid === undefined) return null;
  try {
    const all = statTimes(`/proc/${pid}/stat`);
    const main = statTimes(`/proc/${pid}/task/${pid}/stat`);
    return { userMs: all.user, sysMs: all.sys, mainUserMs: main.user, mainSysMs: main.sys };
  } catch {
    return null;
  }
}

/** Clock ticks per second of /proc times (USER_HZ, 100 on Linux). */
const CLK_TCK = 100;

/** b - a, or undefined when either is missing. */
export function cpuSpent(a: CpuTimes | null, b: CpuTimes | null): CpuTimes | undefined {
  return a && b
    ? { userMs: b.userMs - a.userMs, sysMs: b.sysMs - a.sysMs, mainUserMs: (b.mainUserMs ?? NaN) - (a.mainUserMs ?? NaN), mainSysMs: (b.mainSysMs ?? NaN) - (a.mainSysMs ?? NaN) }
    : undefined;
}

/**
 * `migrate` on src to uri, then wait until it ends and until the
 * destination runs: the source's figures, or ok false with the reason.
 */
export async function migrateAndMeasure(src: Vm, dst: Vm, uri: string, timeoutMs: number): Promise<Measured> {
  const srcCpu0 = cpuTimes(src.proc.pid);
  const dstCpu0 = cpuTimes(dst.proc.pid);
  const t0 = performance.now();
  await src.execute('migrate', { uri });
  const info = await untilMigrationEnds(src, timeoutMs, 20);
  if (!info || info.status !== 'completed') {
    return { ok: false, error: info ? `${info.status}: ${info['error-desc'] ?? ''}` : 'timed out' };
  }
  const st = await untilIncomingRuns(dst, 60000);
  const wallToDestDoneMs = performance.now() - t0;
  const srcCpu = cpuSpent(srcCpu0, cpuTimes(src.proc.pid));
  const dstCpu = cpuSpent(dstCpu0, cpuTimes(dst.proc.pid));
  if (!st.ok) return { ok: false, error: `destination ended in ${String(st.reached)}`, wallToDestDoneMs };
  return {
    ok: true,
    srcCpu,
    dstCpu,
    totalTimeMs: info['total-time'],
    downtimeMs: info.downtime,
    setupTimeMs: info['setup-time'],
    transferredBytes: info.ram?.transferred,
    wallToDestDoneMs,
  };
}

/**
 * query-status on a destination every 10 ms until it has left inmigrate.
 * Resolves null when it ended somewhere else than paused, running or
 * prelaunch (QEMU's destination takes the run state of a -S source), with
 * the state it did reach in `reached`.
 */
export async function untilIncomingRuns(vm: Vm, timeoutMs: number): Promise<{ ok: boolean; reached: string | null }> {
  const reached = await pollUntil(async () => {
    const st = (await vm.execute('query-status')).status as string;
    return st !== 'inmigrate' ? st : null;
  }, timeoutMs, 10);
  return { ok: reached !== null && ['paused', 'running', 'prelaunch'].includes(reached), reached };
}

export interface SpawnOpts {
  /** extra node flags for ferry (e.g. --cpu-prof) */
  nodeFlags?: string[];
  cwd?: string;
  name?: string;
}

async function spawnVm(kind: 'ferry' | 'qemu', cmd: string, args: string[], sock: string, dir: string, opts: SpawnOpts): Promise<Vm> {
  const vm = new QmpProcess(cmd, args, {
    sock,
    dir,
    what: kind,
    cwd: opts.cwd,
    ignoreStdout: true,
    timeoutMs: 60000,
    commandTimeoutMs: 60000,
    quitCommandMs: 3000,
    quitKillMs: 15000,
  });
  try {
    return await vm.ready();
  } catch (e) {
    throw new Error(`${kind} did not come up: ${String(e)}\n${vm.stderr}`);
  }
}

export async function startFerry(args: string[], dir: string, opts: SpawnOpts = {}): Promise<Vm> {
  const sock = join(dir, `${opts.name ?? 'ferry'}-${Math.random().toString(36).slice(2, 8)}.qmp`);
  return spawnVm('ferry', process.execPath, ferryVmArgv(sock, args, opts.nodeFlags), sock, dir, opts);
}

export async function startQemu(args: string[], dir: string, opts: SpawnOpts = {}): Promise<Vm> {
  const sock = join(dir, `${opts.name ?? 'qemu'}-${Math.random().toString(36).slice(2, 8)}.qmp`);
  return spawnVm('qemu', qemuBinary(), qemuArgv(sock, args), sock, dir, opts);
}

/** Run a command to completion; resolves with its exit code. */
export function run(cmd: string, args: string[]): Promise<number | null> {
  return new Promise((res) => {
    const p = spawn(cmd, args, { stdio: 'inherit' });
    p.once('exit', (c) => res(c));
  });
}

export function machineFacts(): Record<string, unknown> {
  // filled in by callers that can afford the reads
  return {};
}

/**
 * 1 GiB of /dev/urandom bytes in the bench cache, made once: the RAM of
 * QEMU's incompressible guest (memory-backend-file, share=off).
 */
export function randomFile1G(): string {
  const p = join(CACHE_DIR, 'random-1G.bin');
  if (!existsSync(p) || statSync(p).size !== GiB) {
    mkdirSync(CACHE_DIR, { recursive: true });
    console.log(`creating ${p} (1 GiB of /dev/urandom, once)`);
    execFileSync('sh', ['-c', `head -c 1G /dev/urandom > '${p}.tmp' && mv '${p}.tmp' '${p}'`]);
  }
  return p;
}

/** The random guest's RAM as a QEMU 7.2 migration stream, made once (randomStream1G). */
export function randomStreamPath(): string {
  return join(CACHE_DIR, 'random-1G.qemu-stream');
}

/**
 * The 1 GiB random guest saved as a QEMU 7.2 migration stream in the bench
 * cache, made once: a QEMU whose RAM maps the random file (share=off) migrates
 * to `exec:cat > FILE`.
 */
export async function randomStream1G(): Promise<string> {
  const p = randomStreamPath();
  if (existsSync(p) && statSync(p).size > GiB) return p;
  const file = randomFile1G();
  console.log(`creating ${p} (the random guest as a QEMU migration stream, once)`);
  const dir = tempDir('stream-');
  const q = await startQemu(['-machine', 'none,memory-backend=m', '-object', `memory-backend-file,id=m,size=1G,mem-path=${file},share=off`, '-S'], dir, { name: 'save' });
  try {
    await q.execute('migrate-set-parameters', { 'max-bandwidth': 100e9 });
    await q.execute('migrate', { uri: `exec:cat > '${p}.tmp'` });
    const info = await untilMigrationEnds(q, 120000, 50);
    if (info?.status !== 'completed') throw new Error(`saving the random guest failed: ${JSON.stringify(info)}`);
  } finally {
    await q.quit();
  }
  renameSync(`${p}.tmp`, p);
  return p;
}

/**
 * QEMU's incompressible source, set up as a running guest's RAM is:
 * anonymous memory (memory-backend-ram, which QEMU advises for huge pages),
 * resident and mapped, loaded from the saved stream (`-incoming defer`,
 * `migrate-incoming exec:cat FILE`). It is paused (-S) afterwards, ready to
 * migrate, like Ferry's `-fill random` source, whose RAM the fill wrote.
 * (A memory-backend-file over a copy of the data, used before, left every
 * page to be faulted in by the source's first read during the migration:
 * 0.8 s of system time per GiB on QEMU's side that a guest never pays.)
 */
export async function startQemuRandomSource(dir: string, extra: string[] = []): Promise<Vm> {
  const stream = await randomStream1G();
  const q = await startQemu(['-machine', 'none,memory-backend=m', '-object', 'memory-backend-ram,id=m,size=1G', '-S', '-incoming', 'defer', ...extra], dir, { name: 'src' });
  try {
    await q.execute('migrate-incoming', { uri: `exec:cat '${stream}'` });
    const st = await untilIncomingRuns(q, 120000);
    if (!st.ok) throw new Error(`QEMU's source did not load the random guest (${String(st.reached)})`);
    return q;
  } catch (e) {
    await q.quit();
    throw e;
  }
}

/**
 * Frees `bytes` of huge pages just before a destination starts, so that the
 * host is in the same "warm" state for every engine whatever its source
 * took. On our hosts (a VM with the balloon's free page reporting, order 9)
 * a huge page freed in the last ~2 s is still backed by the hypervisor and
 * costs ~0.1 s/GiB to fault in again; one freed longer ago costs 1.2-1.6
 * s/GiB (docs/benchmarks.md, "Why the destination's huge pages cost").
 * A child process takes the memory as guest RAM is taken (a
 * SharedArrayBuffer advised MADV_HUGEPAGE, faulted in with
 * MADV_POPULATE_WRITE, or written page by page without the addon) and exits.
 */
export function warmHugePages(bytes: number): Promise<void> {
  const hp = join(REPO_ROOT, 'native', 'hugepage', 'index.cjs');
  const script = `
    const hp = require(${JSON.stringify(hp)});
    for (let left = ${bytes}; left > 0; left -= 1 << 30) {
      const sab = new SharedArrayBuffer(Math.min(left, 1 << 30));
      hp.madviseHugepage(sab);
      if (!hp.madviseAdvice(sab, 'populate_write')) { const u = new Uint8Array(sab); for (let i = 0; i < u.length; i += 4096) u[i] = 1; }
      globalThis['keep' + left] = sab;
    }`;
  return new Promise((res, rej) => {
    const p = spawn(process.execPath, ['-e', script], { stdio: 'inherit' });
    p.once('error', rej);
    p.once('exit', (code) => (code === 0 ? res() : rej(new Error(`warmHugePages: exit ${code}`))));
  });
}
