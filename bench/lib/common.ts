/**
 * Shared helpers for the process-level benchmarks: a tiny QMP client (kept
 * here so the benchmarks do not depend on src/qmp while it changes), process
 * spawning for `ferry vm` and QEMU, free ports, medians, result files.
 *
 * QEMU is started through a symlink named `q72bench` (in the bench cache
 * dir): on the shared machine other people's test cleanups run
 * `pkill qemu-system...`, which would otherwise kill our VMs mid-run.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, symlinkSync, writeFileSync, mkdtempSync, rmSync } from 'node:fs';
import * as net from 'node:net';
import { homedir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
/** dist/bench/lib -> repo root */
export const REPO_ROOT = resolve(here, '../../..');
export const FERRY_MAIN = resolve(REPO_ROOT, 'dist/src/cli/main.js');
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

export function freePort(): Promise<number> {
  return new Promise((res, rej) => {
    const s = net.createServer();
    s.once('error', rej);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => res(port));
    });
  });
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

// ---- QMP --------------------------------------------------------------------

export class Qmp {
  private buf = '';
  private waiting: { resolve: (v: any) => void; reject: (e: Error) => void; cmd: string }[] = [];
  private closed: Error | null = null;
  readonly events: { event: string; data?: unknown; timestamp?: unknown }[] = [];

  private constructor(private readonly sock: net.Socket) {
    sock.setEncoding('utf8');
    sock.on('data', (d: string) => {
      this.buf += d;
      let nl: number;
      while ((nl = this.buf.indexOf('\n')) >= 0) {
        const line = this.buf.slice(0, nl).trim();
        this.buf = this.buf.slice(nl + 1);
        if (!line) continue;
        const m = JSON.parse(line);
        if (m.QMP) continue;
        if (m.event) {
          this.events.push(m);
          continue;
        }
        const w = this.waiting.shift();
        if (!w) continue;
        if (m.error) w.reject(new Error(`${w.cmd}: ${m.error.class}: ${m.error.desc}`));
        else w.resolve(m.return);
      }
    });
    const onEnd = (e?: Error): void => {
      this.closed = e ?? new Error('QMP connection closed');
      for (const w of this.waiting.splice(0)) w.reject(this.closed);
    };
    sock.on('error', onEnd);
    sock.on('close', () => onEnd());
  }

  static async connect(path: string, timeoutMs = 20000, alive?: () => boolean): Promise<Qmp> {
    const end = Date.now() + timeoutMs;
    for (;;) {
      if (alive && !alive()) throw new Error(`process exited before QMP ${path} was up`);
      try {
        const s = await new Promise<net.Socket>((res, rej) => {
          const c = net.createConnection(path);
          c.once('connect', () => res(c));
          c.once('error', rej);
        });
        const q = new Qmp(s);
        await q.execute('qmp_capabilities');
        return q;
      } catch (e) {
        if (Date.now() > end) throw new Error(`QMP ${path}: ${String(e)}`);
        await sleep(25);
      }
    }
  }

  /** Replies come in order; a command unanswered for timeoutMs closes the connection. */
  execute<T = any>(cmd: string, args?: object, timeoutMs = 60000): Promise<T> {
    if (this.closed) return Promise.reject(this.closed);
    return new Promise<T>((resolve, reject) => {
      const t = setTimeout(() => {
        this.sock.destroy(new Error(`QMP ${cmd}: no reply within ${timeoutMs} ms`));
      }, timeoutMs);
      this.waiting.push({
        resolve: (v) => (clearTimeout(t), resolve(v)),
        reject: (e) => (clearTimeout(t), reject(e)),
        cmd,
      });
      this.sock.write(JSON.stringify(args ? { execute: cmd, arguments: args } : { execute: cmd }) + '\n');
    });
  }

  destroy(): void {
    this.sock.destroy();
  }
}

// ---- processes -----------------------------------------------------------

export interface Vm {
  kind: 'ferry' | 'qemu';
  proc: ChildProcess;
  qmp: Qmp;
  sock: string;
  stderr: string;
  exited: Promise<void>;
  quit(): Promise<void>;
}

/** query-migrate on vm every everyMs until the migration has ended: its info, or null after timeoutMs. */
export function untilMigrationEnds(vm: Vm, timeoutMs: number, everyMs: number): Promise<any | null> {
  return pollUntil(async () => {
    const i = await vm.qmp.execute('query-migrate');
    return MIGRATION_ENDED.includes(i.status) ? i : null;
  }, timeoutMs, everyMs);
}

export interface SpawnOpts {
  /** extra node flags for ferry (e.g. --cpu-prof) */
  nodeFlags?: string[];
  cwd?: string;
  name?: string;
}

async function spawnVm(kind: 'ferry' | 'qemu', cmd: string, args: string[], sock: string, opts: SpawnOpts): Promise<Vm> {
  const proc = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'], cwd: opts.cwd });
  let stderr = '';
  proc.stderr!.on('data', (b: Buffer) => (stderr += b.toString()));
  let alive = true;
  const exited = new Promise<void>((r) => proc.once('exit', () => ((alive = false), r())));
  let qmp: Qmp;
  try {
    qmp = await Qmp.connect(sock, 60000, () => alive);
  } catch (e) {
    proc.kill('SIGKILL');
    throw new Error(`${kind} did not come up: ${String(e)}\n${stderr}`);
  }
  const vm: Vm = {
    kind,
    proc,
    qmp,
    sock,
    get stderr() {
      return stderr;
    },
    exited,
    async quit() {
      if (!alive) return;
      try {
        await Promise.race([qmp.execute('quit'), sleep(3000)]);
      } catch {
        /* gone */
      }
      const t = setTimeout(() => proc.kill('SIGKILL'), 15000);
      await exited;
      clearTimeout(t);
      qmp.destroy();
    },
  };
  return vm;
}

export async function startFerry(args: string[], dir: string, opts: SpawnOpts = {}): Promise<Vm> {
  const sock = join(dir, `${opts.name ?? 'ferry'}-${Math.random().toString(36).slice(2, 8)}.qmp`);
  const argv = [...(opts.nodeFlags ?? []), FERRY_MAIN, 'vm', '-qmp', `unix:${sock},server=on,wait=off`, ...args];
  return spawnVm('ferry', process.execPath, argv, sock, opts);
}

export async function startQemu(args: string[], dir: string, opts: SpawnOpts = {}): Promise<Vm> {
  const sock = join(dir, `${opts.name ?? 'qemu'}-${Math.random().toString(36).slice(2, 8)}.qmp`);
  const argv = ['-nodefaults', '-display', 'none', '-qmp', `unix:${sock},server=on,wait=off`, ...args];
  return spawnVm('qemu', qemuBinary(), argv, sock, opts);
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
