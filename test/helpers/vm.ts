/**
 * Integration-test harness: spawn real `ferry vm` processes (through
 * src/cli/launch.ts, as the demo and the benchmarks do), talk QMP to them
 * over real unix sockets, and clean up whatever a test leaves behind.
 */
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, existsSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { FERRY_MAIN, QmpProcess, ferryVmArgv, runToExit, waitFor, type LaunchOptions } from '../../src/cli/launch.js';
import type { EventData, QmpApi } from '../../src/generated/qapi-client.js';

export { FERRY_MAIN, QmpProcess, runToExit, waitFor };

const here = dirname(fileURLToPath(import.meta.url));
/** the repository, from this file's compiled copy in dist/test/helpers */
export const REPO_ROOT = resolve(here, '../../..');

/** Every process a test started and has not seen exit (killed by cleanupAll). */
const live = new Set<QmpProcess>();
const dirs: string[] = [];

export function tempDir(prefix = 'ferry-test-'): string {
  const d = mkdtempSync(join(tmpdir(), prefix));
  dirs.push(d);
  return d;
}

/** Remember `h` until it exits, so that cleanupAll() can kill it. */
export function track<T extends QmpProcess>(h: T): T {
  live.add(h);
  void h.exited.then(() => live.delete(h));
  return h;
}

export interface VmOptions extends Partial<Pick<LaunchOptions, 'negotiate' | 'extraStdio' | 'commandTimeoutMs'>> {
  /** extra `ferry vm` arguments (the harness adds -qmp) */
  args?: string[];
  /** directory for the socket and files (default: a new temp dir) */
  dir?: string;
  name?: string;
}

/** A `ferry vm` under test. */
export type VmHandle = QmpProcess;

export async function startVm(opts: VmOptions = {}): Promise<VmHandle> {
  const dir = opts.dir ?? tempDir();
  const sock = join(dir, `${opts.name ?? 'vm'}.qmp`);
  const h = track(new QmpProcess(process.execPath, ferryVmArgv(sock, opts.args ?? []), { ...opts, sock, dir, what: 'ferry vm' }));
  return h.ready();
}

/** Run `ferry ARGS...` to its end (`signal` after timeoutMs): exit code, stdout and stderr. */
export function runFerry(args: string[], timeoutMs = 120000, signal: NodeJS.Signals = 'SIGKILL'): Promise<{ code: number | null; out: string; err: string }> {
  return new Promise((resolve) => {
    const p = spawn(process.execPath, [FERRY_MAIN, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    p.stdout.on('data', (b: Buffer) => (out += b.toString()));
    p.stderr.on('data', (b: Buffer) => (err += b.toString()));
    const t = setTimeout(() => p.kill(signal), timeoutMs);
    p.once('exit', (code) => {
      clearTimeout(t);
      resolve({ code, out, err });
    });
  });
}

/** Run `ferry vm` expecting it to fail at startup; returns exit code and stderr. */
export function runVmExpectingExit(args: string[], timeoutMs = 10000): Promise<{ code: number | null; stderr: string }> {
  return runToExit(process.execPath, [FERRY_MAIN, 'vm', ...args], timeoutMs);
}

/** Poll query-migrate (of a Ferry or a QEMU, through the typed client) until the status is one of `states`. */
export async function waitMigration(
  vm: QmpProcess | QmpApi,
  states: string[] = ['completed', 'failed', 'cancelled'],
  timeoutMs = 60000,
): Promise<Record<string, any>> {
  const api = vm instanceof QmpProcess ? vm.api : vm;
  return waitFor<Record<string, any> | null>(
    async () => {
      const info = await api.queryMigrate();
      return states.includes(info.status ?? 'none') ? info : null;
    },
    timeoutMs,
    `migration status in ${states.join('|')}`,
    50,
  ) as Promise<Record<string, any>>;
}

/** The MIGRATION event statuses a process reported so far, in order. */
export function migrationEvents(vm: QmpProcess): string[] {
  return vm.qmp.eventLog.filter((e) => e.event === 'MIGRATION').map((e) => (e.data as EventData['MIGRATION']).status);
}

/** Shell-quote a path for exec: URIs. */
export function shq(s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

export function readText(path: string): string {
  return existsSync(path) ? readFileSync(path, 'utf8') : '';
}

/** Kill the tracked processes still running that `which` selects. */
export async function killTracked(which: (h: QmpProcess) => boolean = () => true): Promise<void> {
  await Promise.all([...live].filter(which).map((h) => h.destroy()));
}

/** Kill every process still running and remove temp dirs (call from after()). */
export async function cleanupAll(): Promise<void> {
  await killTracked();
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
}
