/**
 * Integration-test harness: spawn real `ferry vm` processes, talk QMP to them
 * over real unix sockets, and clean up whatever a test leaves behind.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync, existsSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { QmpClient } from '../../src/qmp/client.js';

const here = dirname(fileURLToPath(import.meta.url));
/** dist/src/cli/main.js, next to this file's compiled copy in dist/test/helpers */
export const FERRY_MAIN = resolve(here, '../../src/cli/main.js');
export const REPO_ROOT = resolve(here, '../../..');

const live = new Set<VmHandle>();
const dirs: string[] = [];

export function tempDir(prefix = 'ferry-test-'): string {
  const d = mkdtempSync(join(tmpdir(), prefix));
  dirs.push(d);
  return d;
}

export interface VmOptions {
  /** extra `ferry vm` arguments (the harness adds -qmp) */
  args?: string[];
  /** connect and negotiate QMP (default true) */
  negotiate?: boolean;
  /** directory for the socket and files (default: a new temp dir) */
  dir?: string;
  name?: string;
}

/**
 * A child process with a QMP monitor (a `ferry vm` or a QEMU): its output,
 * its exit, and the QMP calls every test needs.
 */
export class QmpProcess {
  stderr: string;
  stdout: string;
  exitCode: number | null = null;
  exitSignal: NodeJS.Signals | null = null;
  readonly exited: Promise<void>;

  constructor(
    readonly proc: ChildProcess,
    readonly sock: string,
    readonly dir: string,
    public qmp: QmpClient,
    early: { stderr: string; stdout: string } = { stderr: '', stdout: '' },
  ) {
    // keep collecting output (what came before the handle existed is copied)
    this.stderr = early.stderr;
    this.stdout = early.stdout;
    proc.stderr?.on('data', (b: Buffer) => (this.stderr += b.toString()));
    proc.stdout?.on('data', (b: Buffer) => (this.stdout += b.toString()));
    this.exited = new Promise((res) => {
      const done = () => {
        this.exitCode = proc.exitCode;
        this.exitSignal = proc.signalCode;
        res();
      };
      if (proc.exitCode !== null || proc.signalCode !== null) done();
      else proc.once('exit', done);
    });
  }

  get running(): boolean {
    return this.exitCode === null && this.exitSignal === null;
  }

  execute<T = unknown>(cmd: string, args?: object): Promise<T> {
    return this.qmp.execute<T>(cmd, args);
  }

  async status(): Promise<string> {
    return (await this.execute<{ status: string }>('query-status')).status;
  }

  kill(sig: NodeJS.Signals = 'SIGKILL'): void {
    if (this.running) this.proc.kill(sig);
  }

  async quit(): Promise<void> {
    if (this.running) {
      try {
        await this.qmp.execute('quit', undefined, { timeoutMs: 5000 });
      } catch {
        /* gone already, or closed the socket while quitting */
      }
      const t = setTimeout(() => this.kill(), 5000);
      await this.exited;
      clearTimeout(t);
    }
    this.qmp.destroy();
  }
}

/**
 * Spawn `bin args`, wait for its QMP socket `sock` and connect. The socket
 * file appears at bind(), a moment before listen(): refused connects are
 * retried. Kills the process if it never answers.
 */
export async function spawnWithQmp(
  bin: string,
  args: string[],
  sock: string,
  opts: { negotiate?: boolean; timeoutMs?: number; what: string },
): Promise<{ proc: ChildProcess; qmp: QmpClient; early: { stderr: string; stdout: string } }> {
  const proc = spawn(bin, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  const early = { stderr: '', stdout: '' };
  proc.stderr!.on('data', (b: Buffer) => (early.stderr += b.toString()));
  proc.stdout!.on('data', (b: Buffer) => (early.stdout += b.toString()));
  let exited = false;
  proc.once('exit', () => (exited = true));
  try {
    const qmp = await waitFor(
      async () => {
        if (exited) throw new Error(`${opts.what} exited early (${proc.exitCode}): ${early.stderr}`);
        if (!existsSync(sock)) return undefined;
        try {
          return await QmpClient.connect(sock, { negotiate: opts.negotiate ?? true });
        } catch (e) {
          if (/ECONNREFUSED|ENOENT/.test(String(e))) return undefined;
          throw e;
        }
      },
      opts.timeoutMs ?? 20000,
      `QMP socket ${sock}`,
    );
    return { proc, qmp: qmp!, early };
  } catch (e) {
    proc.kill('SIGKILL');
    throw e;
  }
}

export class VmHandle extends QmpProcess {
  /** Another QMP connection to the same VM. */
  async connect(negotiate = true): Promise<QmpClient> {
    return QmpClient.connect(this.sock, { negotiate });
  }

  async digest(): Promise<string> {
    const d = await this.execute<{ digest: string }>('x-query-memory-digest');
    return d.digest;
  }
}

/** Wait until `fn` returns a truthy value (polling), or throw after timeoutMs. */
export async function waitFor<T>(fn: () => T | Promise<T>, timeoutMs = 20000, what = 'condition', everyMs = 25): Promise<T> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

export async function startVm(opts: VmOptions = {}): Promise<VmHandle> {
  const dir = opts.dir ?? tempDir();
  const sock = join(dir, `${opts.name ?? 'vm'}.qmp`);
  const args = [FERRY_MAIN, 'vm', '-qmp', `unix:${sock},server=on,wait=off`, ...(opts.args ?? [])];
  const { proc, qmp, early } = await spawnWithQmp(process.execPath, args, sock, {
    negotiate: opts.negotiate,
    what: 'ferry vm',
  });
  const h = new VmHandle(proc, sock, dir, qmp, early);
  void h.exited.then(() => live.delete(h));
  live.add(h);
  return h;
}

/** Run `ferry vm` expecting it to fail at startup; returns exit code and stderr. */
export function runVmExpectingExit(args: string[], timeoutMs = 10000): Promise<{ code: number | null; stderr: string }> {
  return runToExit(process.execPath, [FERRY_MAIN, 'vm', ...args], timeoutMs);
}

/** Run a program to its end (killed after timeoutMs); returns exit code and stderr. */
export async function runToExit(bin: string, args: string[], timeoutMs: number): Promise<{ code: number | null; stderr: string }> {
  const proc = spawn(bin, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  proc.stderr!.on('data', (b: Buffer) => (stderr += b.toString()));
  const t = setTimeout(() => proc.kill('SIGKILL'), timeoutMs);
  const code = await new Promise<number | null>((r) => proc.once('exit', (c) => r(c)));
  clearTimeout(t);
  return { code, stderr };
}

/** Poll query-migrate (of a Ferry or a QEMU) until the status is one of `states`. */
export async function waitMigration(
  vm: { execute<T>(cmd: string): Promise<T> },
  states: string[] = ['completed', 'failed', 'cancelled'],
  timeoutMs = 60000,
): Promise<Record<string, any>> {
  return waitFor<Record<string, any> | null>(
    async () => {
      const info = await vm.execute<Record<string, any>>('query-migrate');
      return states.includes(info.status) ? info : null;
    },
    timeoutMs,
    `migration status in ${states.join('|')}`,
    50,
  ) as Promise<Record<string, any>>;
}

export function readText(path: string): string {
  return existsSync(path) ? readFileSync(path, 'utf8') : '';
}

/** Kill every VM still running and remove temp dirs (call from after()). */
export async function cleanupAll(): Promise<void> {
  for (const h of [...live]) {
    h.kill();
    await h.exited;
    h.qmp.destroy();
  }
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
}
