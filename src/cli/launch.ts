/**
 * Spawning QMP-speaking processes: a `ferry vm`, or anything else with a QMP
 * unix socket (QEMU). One place for the demo, the benchmarks and the tests:
 * spawn, wait for the socket (it appears at bind(), a moment before listen(),
 * so refused connects are retried), connect with QmpClient, collect the
 * output, know the exit, run commands, quit or kill.
 */
import { spawn, type ChildProcess, type StdioOptions } from 'node:child_process';
import { existsSync } from 'node:fs';
import * as net from 'node:net';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { QmpConnection } from '../client/index.js';
import { QmpClient, type QmpExecuteOptions } from '../qmp/client.js';

/** dist/src/cli/main.js: what `ferry` runs. */
export const FERRY_MAIN = resolve(dirname(fileURLToPath(import.meta.url)), 'main.js');

export interface LaunchOptions {
  /** the QMP unix socket the process listens on (its arguments say so) */
  sock: string;
  /** its directory (files it writes, pmemsave output) */
  dir: string;
  /** how errors name it (default: the binary) */
  what?: string;
  /** run qmp_capabilities once connected (default true) */
  negotiate?: boolean;
  /** give up waiting for the socket after this (default 20 s); the process is killed */
  timeoutMs?: number;
  /** QmpClient's own connect / greeting timeout (default its own, 10 s) */
  connectTimeoutMs?: number;
  /** default timeout of execute() (default none) */
  commandTimeoutMs?: number;
  /** quit(): how long the `quit` command may take, then how long until SIGKILL (default 5 s each) */
  quitCommandMs?: number;
  quitKillMs?: number;
  /** keep only this many characters of each output (the newest half when it overflows; default all) */
  maxOutput?: number;
  /** discard stdout instead of collecting it */
  ignoreStdout?: boolean;
  /** descriptors to pass from fd 3 on (e.g. a socket for `-incoming fd:3`) */
  extraStdio?: (number | net.Socket)[];
  cwd?: string;
}

/**
 * A child process with a QMP monitor. Created by launch() (or by a subclass
 * constructor followed by `await ready()`).
 */
export class QmpProcess {
  readonly proc: ChildProcess;
  readonly sock: string;
  readonly dir: string;
  readonly what: string;
  stderr = '';
  stdout = '';
  exitCode: number | null = null;
  exitSignal: NodeJS.Signals | null = null;
  readonly exited: Promise<void>;
  private client: QmpClient | undefined;
  private typed: QmpConnection | undefined;

  constructor(
    bin: string,
    args: string[],
    private readonly opts: LaunchOptions,
  ) {
    this.sock = opts.sock;
    this.dir = opts.dir;
    this.what = opts.what ?? bin;
    const stdio: StdioOptions = ['ignore', opts.ignoreStdout ? 'ignore' : 'pipe', 'pipe', ...(opts.extraStdio ?? [])];
    this.proc = spawn(bin, args, { stdio, cwd: opts.cwd });
    const keep = (s: string): string => {
      const max = opts.maxOutput;
      return max !== undefined && s.length > max ? s.slice(-(max >> 1)) : s;
    };
    this.proc.stderr?.on('data', (b: Buffer) => (this.stderr = keep(this.stderr + b.toString())));
    this.proc.stdout?.on('data', (b: Buffer) => (this.stdout = keep(this.stdout + b.toString())));
    this.exited = new Promise((res) => {
      this.proc.once('exit', (code, signal) => {
        this.exitCode = code;
        this.exitSignal = signal;
        res();
      });
    });
  }

  /** The QMP connection (after ready()). */
  get qmp(): QmpClient {
    if (!this.client) throw new Error(`${this.what}: not connected`);
    return this.client;
  }

  /** The typed client (ferry/client) on the same connection. */
  get api(): QmpConnection {
    return (this.typed ??= new QmpConnection(this.qmp));
  }

  get running(): boolean {
    return this.exitCode === null && this.exitSignal === null;
  }

  /** Wait for the socket and connect; on failure the process is killed. */
  async ready(): Promise<this> {
    const { sock } = this.opts;
    try {
      this.client = await waitFor(
        async () => {
          if (!this.running) throw new Error(`${this.what} exited early: ${this.stderr.trim()}`);
          if (!existsSync(sock)) return undefined;
          try {
            return await QmpClient.connect(sock, { negotiate: this.opts.negotiate ?? true, timeoutMs: this.opts.connectTimeoutMs });
          } catch (e) {
            if (/ECONNREFUSED|ENOENT/.test(String(e))) return undefined;
            throw e;
          }
        },
        this.opts.timeoutMs ?? 20000,
        `${this.what}: QMP socket ${sock}`,
      );
      return this;
    } catch (e) {
      this.kill();
      throw e;
    }
  }

  /** Run a command (with the launch's default timeout unless opts say otherwise). */
  execute<T = any>(cmd: string, args?: object, opts?: QmpExecuteOptions): Promise<T> {
    const timeoutMs = opts?.timeoutMs ?? this.opts.commandTimeoutMs;
    return this.qmp.execute<T>(cmd, args, { ...opts, timeoutMs });
  }

  async status(): Promise<string> {
    return (await this.api.queryStatus({ timeoutMs: this.opts.commandTimeoutMs })).status;
  }

  /** x-query-memory-digest (Ferry only). */
  async digest(): Promise<string> {
    return (await this.api.xQueryMemoryDigest({ timeoutMs: this.opts.commandTimeoutMs })).digest;
  }

  /** Another QMP connection to the same process. */
  connect(negotiate = true): Promise<QmpClient> {
    return QmpClient.connect(this.sock, { negotiate });
  }

  kill(sig: NodeJS.Signals = 'SIGKILL'): void {
    if (this.running) this.proc.kill(sig);
  }

  /** `quit` over QMP, SIGKILL if it has not exited in time; closes the connection. */
  async quit(): Promise<void> {
    if (this.running) {
      try {
        await this.client?.execute('quit', undefined, { timeoutMs: this.opts.quitCommandMs ?? 5000 });
      } catch {
        /* gone already, busy, or closed the socket while quitting */
      }
      const t = setTimeout(() => this.kill(), this.opts.quitKillMs ?? 5000);
      await this.exited;
      clearTimeout(t);
    }
    this.client?.destroy();
  }

  /** SIGKILL, wait for the exit, drop the connection. */
  async destroy(): Promise<void> {
    this.kill();
    await this.exited;
    this.client?.destroy();
  }
}

/** Spawn `bin args` (whose arguments make it listen on opts.sock) and connect. */
export function launch(bin: string, args: string[], opts: LaunchOptions): Promise<QmpProcess> {
  return new QmpProcess(bin, args, opts).ready();
}

/** The argument list of `node [nodeFlags] main.js vm -qmp unix:SOCK,server=on,wait=off ARGS`. */
export function ferryVmArgv(sock: string, args: string[], nodeFlags: string[] = []): string[] {
  return [...nodeFlags, FERRY_MAIN, 'vm', '-qmp', `unix:${sock},server=on,wait=off`, ...args];
}

export interface FerryOptions extends Omit<LaunchOptions, 'sock'> {
  /** the socket is DIR/NAME.qmp (default NAME: vm) */
  name?: string;
  /** or exactly this path */
  sock?: string;
  /** node flags before main.js (e.g. --cpu-prof) */
  nodeFlags?: string[];
}

/** Start a `ferry vm ARGS` with a QMP socket in opts.dir and connect. */
export function launchFerry(args: string[], opts: FerryOptions): Promise<QmpProcess> {
  const sock = opts.sock ?? join(opts.dir, `${opts.name ?? 'vm'}.qmp`);
  return launch(process.execPath, ferryVmArgv(sock, args, opts.nodeFlags), { what: 'ferry vm', ...opts, sock });
}

/** QEMU's arguments for a headless run with a QMP socket: -nodefaults -display none -qmp ... ARGS. */
export function qemuArgv(sock: string, args: string[]): string[] {
  return ['-nodefaults', '-display', 'none', '-qmp', `unix:${sock},server=on,wait=off`, ...args];
}

/** Run a program to its end (SIGKILL after timeoutMs); its exit code and stderr. */
export async function runToExit(bin: string, args: string[], timeoutMs: number): Promise<{ code: number | null; stderr: string }> {
  const proc = spawn(bin, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  proc.stderr!.on('data', (b: Buffer) => (stderr += b.toString()));
  const t = setTimeout(() => proc.kill('SIGKILL'), timeoutMs);
  const code = await new Promise<number | null>((r) => proc.once('exit', (c) => r(c)));
  clearTimeout(t);
  return { code, stderr };
}

/** Wait until `fn` returns a truthy value (polling every everyMs), or throw after timeoutMs. */
export async function waitFor<T>(fn: () => T | Promise<T>, timeoutMs = 20000, what = 'condition', everyMs = 25): Promise<T> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

/** A free TCP port on `host` (bound, then closed again before returning). */
export function freePort(host = '127.0.0.1'): Promise<number> {
  return new Promise((res, rej) => {
    const s = net.createServer();
    s.once('error', rej);
    s.listen(0, host, () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => res(port));
    });
  });
}
