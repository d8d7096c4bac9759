/**
 * Test fixtures for the QMP monitor: a small fake command table with
 * handlers, an in-process server on a temp unix socket or tcp port 0, and a
 * raw-bytes client that records every chunk it receives.
 */
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { QapiError, QmpError } from '../../src/qapi/errors.js';
import { QmpClientConn, QmpServer, QmpServerOptions } from '../../src/qmp/server.js';
import type { CommandDef } from '../../src/qmp/types.js';

function isObj(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** A validator in the generated style: members name -> type, required set. */
function def(
  name: string,
  members: Record<string, 'str' | 'int' | 'number' | 'bool' | 'any'> = {},
  required: string[] = [],
): CommandDef {
  return {
    name,
    boxed: false,
    validate(args: unknown): unknown {
      if (!isObj(args)) throw new QapiError("Invalid parameter type for 'arguments', expected: object");
      for (const k of Object.keys(args)) {
        if (!(k in members)) throw new QapiError(`Parameter '${k}' is unexpected`);
      }
      for (const k of required) {
        if (!(k in args)) throw new QapiError(`Parameter '${k}' is missing`);
      }
      for (const [k, t] of Object.entries(members)) {
        if (!(k in args)) continue;
        const v = args[k];
        const ok =
          t === 'any' ||
          (t === 'str' && typeof v === 'string') ||
          (t === 'int' && Number.isInteger(v)) ||
          (t === 'number' && typeof v === 'number') ||
          (t === 'bool' && typeof v === 'boolean');
        const expected = { str: 'string', int: 'integer', number: 'number', bool: 'boolean', any: 'any' }[t];
        if (!ok) throw new QapiError(`Invalid parameter type for '${k}', expected: ${expected}`);
      }
      return { ...args };
    },
  };
}

export const FAKE_COMMANDS: ReadonlyMap<string, CommandDef> = new Map(
  [
    def('query-status'),
    def('stop'),
    def('cont'),
    def('echo', { value: 'any' }),
    def('sleep', { ms: 'int', tag: 'str' }, ['ms']),
    def('fail', { class: 'str', desc: 'str' }),
    def('throw-plain'),
    def('migrate', { uri: 'str', detach: 'bool' }, ['uri']),
    def('emit', { name: 'str', count: 'int' }, ['name']),
    def('whoami'),
    def('getfd', { fdname: 'str' }, ['fdname']),
    def('no-handler'),
  ].map((d) => [d.name, d]),
);

export interface FakeCtx {
  conn: QmpClientConn;
  server: () => QmpServer<FakeCtx>;
}

export interface FakeVm {
  running: boolean;
  log: string[];
}

export function fakeHandlers(vm: FakeVm) {
  return {
    'query-status': () => ({ status: vm.running ? 'running' : 'paused', running: vm.running, singlestep: false }),
    stop: (_a: unknown, ctx: FakeCtx) => {
      vm.running = false;
      ctx.server().broadcast('STOP');
    },
    cont: (_a: unknown, ctx: FakeCtx) => {
      vm.running = true;
      ctx.server().broadcast('RESUME');
    },
    echo: (a: { value?: unknown }) => (a.value === undefined ? {} : { value: a.value }),
    sleep: async (a: { ms: number; tag?: string }) => {
      vm.log.push(`start ${a.tag ?? a.ms}`);
      await new Promise((r) => setTimeout(r, a.ms));
      vm.log.push(`end ${a.tag ?? a.ms}`);
      return { slept: a.ms, tag: a.tag ?? null };
    },
    fail: (a: { class?: string; desc?: string }) => {
      throw new QmpError((a.class ?? 'GenericError') as 'GenericError', a.desc ?? 'failed');
    },
    'throw-plain': () => {
      throw new Error('plain failure');
    },
    migrate: async (a: { uri: string }, ctx: FakeCtx) => {
      ctx.server().broadcast('MIGRATION', { status: 'setup' });
      await new Promise((r) => setTimeout(r, 5));
      vm.log.push(`migrate ${a.uri}`);
    },
    emit: (a: { name: string; count?: number }, ctx: FakeCtx) => {
      for (let i = 0; i < (a.count ?? 1); i++) ctx.server().broadcast(a.name, { i });
    },
    whoami: (_a: unknown, ctx: FakeCtx) => ({ id: ctx.conn.id }),
    getfd: (a: { fdname: string }, ctx: FakeCtx) => {
      const fd = ctx.conn.takeFd();
      if (fd === undefined) throw new QmpError('GenericError', 'No file descriptor supplied via SCM_RIGHTS');
      try {
        fs.writeSync(fd, `hello from getfd ${a.fdname}\n`);
      } finally {
        fs.closeSync(fd);
      }
      vm.log.push(`getfd ${a.fdname}`);
    },
  };
}

export function tmpSocketPath(tag = 'qmp'): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-qmp-'));
  return path.join(dir, `${tag}.sock`);
}

export interface FakeServer {
  server: QmpServer<FakeCtx>;
  vm: FakeVm;
  socketPath?: string;
  port?: number;
  close(): Promise<void>;
}

export async function startFakeServer(
  kind: 'unix' | 'tcp' = 'unix',
  extra: Partial<QmpServerOptions<FakeCtx>> = {},
): Promise<FakeServer> {
  const vm: FakeVm = { running: true, log: [] };
  let srv!: QmpServer<FakeCtx>;
  srv = new QmpServer<FakeCtx>({
    commands: FAKE_COMMANDS,
    handlers: fakeHandlers(vm),
    makeContext: (conn) => ({ conn, server: () => srv }),
    version: { qemu: { major: 7, minor: 2, micro: 0 }, package: 'ferry-test' },
    ...extra,
  });
  if (kind === 'unix') {
    const p = tmpSocketPath();
    await srv.listen(`unix:${p},server=on,wait=off`);
    return { server: srv, vm, socketPath: p, close: () => srv.close() };
  }
  const a = await srv.listen('tcp:127.0.0.1:0,server=on,wait=off');
  return { server: srv, vm, port: a.kind === 'tcp' ? a.port : undefined, close: () => srv.close() };
}

/** A raw client: records chunks, splits lines, waits for them. */
export class RawConn {
  readonly chunks: Buffer[] = [];
  private buf = '';
  readonly lines: string[] = [];
  private waiters: (() => void)[] = [];
  closed = false;

  private constructor(readonly sock: net.Socket) {
    sock.on('data', (b: Buffer) => {
      this.chunks.push(b);
      this.buf += b.toString('latin1');
      let nl: number;
      while ((nl = this.buf.indexOf('\n')) >= 0) {
        this.lines.push(this.buf.slice(0, nl + 1));
        this.buf = this.buf.slice(nl + 1);
      }
      this.wake();
    });
    sock.on('close', () => {
      this.closed = true;
      this.wake();
    });
    sock.on('error', () => undefined);
  }

  private wake(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  static connect(target: { path: string } | { port: number; host?: string }): Promise<RawConn> {
    return new Promise((resolve, reject) => {
      const s =
        'path' in target
          ? net.createConnection({ path: target.path })
          : net.createConnection({ host: target.host ?? '127.0.0.1', port: target.port });
      s.once('error', reject);
      s.once('connect', () => {
        s.off('error', reject);
        resolve(new RawConn(s));
      });
    });
  }

  send(data: string | Buffer): void {
    this.sock.write(data);
  }

  /** Wait until at least n lines have arrived in total. */
  async waitLines(n: number, timeoutMs = 5000): Promise<string[]> {
    const deadline = Date.now() + timeoutMs;
    while (this.lines.length < n) {
      if (this.closed) throw new Error(`connection closed with ${this.lines.length}/${n} lines: ${this.lines.join('')}`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timeout: ${this.lines.length}/${n} lines: ${this.lines.join('')}`);
      await new Promise<void>((r) => {
        const t = setTimeout(r, left);
        this.waiters.push(() => {
          clearTimeout(t);
          r();
        });
      });
    }
    return this.lines.slice(0, n);
  }

  /** Next n lines after `from`, parsed. */
  async json(from: number, n = 1): Promise<Record<string, unknown>[]> {
    const ls = await this.waitLines(from + n);
    return ls.slice(from, from + n).map((l) => JSON.parse(l) as Record<string, unknown>);
  }

  /** Greeting + negotiation; returns the line count consumed (2). */
  async negotiate(): Promise<number> {
    await this.waitLines(1);
    this.send('{"execute":"qmp_capabilities"}\n');
    await this.waitLines(2);
    return 2;
  }

  close(): void {
    this.sock.destroy();
  }
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
