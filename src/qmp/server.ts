/**
 * The QMP monitor (server side): listeners, per-connection framing,
 * capabilities negotiation, request checking, dispatch through the
 * generated COMMANDS table, and events. Knows no command's meaning.
 */
import { EventEmitter } from 'node:events';
import * as fs from 'node:fs';
import * as net from 'node:net';
import { QmpError } from '../qapi/errors.js';
import { parseListenSpec, QmpAddress } from './address.js';
import { JsonLimits, JsonParseResult, JsonStreamParser, toQmpJson } from './json.js';
import { ScmReader, scmRightsAvailable } from './scm-rights.js';
import { CommandDef, DEFAULT_QMP_VERSION, QmpErrorBody, QmpTimestamp, QmpVersion } from './types.js';

export type QmpMode = 'negotiation' | 'command';

export interface QmpServerOptions<Ctx> {
  /** The generated command table (argument validation). */
  commands: ReadonlyMap<string, CommandDef>;
  /** name -> (args, ctx) => result | Promise<result>; `undefined` answers `{}`. */
  handlers: object;
  /** Per-connection context handed to every handler of that connection. */
  makeContext?: (client: QmpClientConn) => Ctx;
  /** Alias of makeContext (docs/architecture.md name). */
  ctxFactory?: (client: QmpClientConn) => Ctx;
  /** Greeting version; default 2.10.0 */
  version?: QmpVersion;
  /** Input limits per JSON value (default 64 MiB / 2 Mi tokens / depth 1024). */
  limits?: Partial<JsonLimits>;
  /** Parsed requests queued per client before its socket is paused (default 8). */
  maxQueuedRequests?: number;
  /**
   * Receive file descriptors (SCM_RIGHTS) on unix monitors through the native
   * addon: 'auto' (default) uses it when it is built, false never does.
   */
  scmRights?: 'auto' | false;
  /**
   * Output a client has not read, beyond the reply being written, before
   * the monitor drops it (default 1 MiB): events for a client that never
   * reads would otherwise pile up without bound. QEMU 7.2 has no bound.
   */
  maxOutputBacklog?: number;
  /** Told when a client is dropped for its backlog (a log line). */
  onDrop?: (client: QmpClientConn, backlog: number) => void;
}

export const DEFAULT_MAX_OUTPUT_BACKLOG = 1 << 20;

/** Where a listener is bound (tcp: the real port, also for port 0). */
export type QmpListenAddress = QmpAddress;

let nextConnId = 1;

/** One monitor connection. Handlers see it through their context. */
export class QmpClientConn {
  readonly id: number;
  /** Peer description for logs (`unix:PATH#n` or `tcp:HOST:PORT`). */
  readonly peer: string;
  /** @internal */ mode: QmpMode | 'switching' = 'negotiation';
  /** @internal */ closed = false;
  /** @internal */ readonly parser: JsonStreamParser;
  /** @internal */ readonly queue: JsonParseResult[] = [];
  /** @internal */ busy = false;
  /** @internal */ inputEnded = false;
  /** @internal */ paused = false;
  /** @internal */ pendingEvents: string[] = [];
  /** @internal */ ctx: unknown;
  /** @internal bytes of the reply being written (not counted as backlog) */
  replyBytes = 0;
  /** @internal input flow control (socket or native reader) */
  pauseInput: () => void;
  /** @internal */ resumeInput: () => void;
  /** True when this connection reads with recvmsg and can receive fds. */
  scmRights = false;
  private fds: number[] = [];

  /** @internal */
  constructor(
    readonly socket: net.Socket,
    peer: string,
    limits: Partial<JsonLimits> | undefined,
  ) {
    this.id = nextConnId++;
    this.peer = peer;
    this.parser = new JsonStreamParser(limits);
    this.pauseInput = () => socket.pause();
    this.resumeInput = () => socket.resume();
  }

  /** `negotiation` until qmp_capabilities succeeded, then `command`. */
  get state(): QmpMode {
    return this.mode === 'command' ? 'command' : 'negotiation';
  }

  get isClosed(): boolean {
    return this.closed;
  }

  /**
   * Take the oldest file descriptor received over SCM_RIGHTS with the
   * current command (unix monitor with the native addon only); the caller
   * owns it afterwards. `undefined` if none was supplied.
   */
  takeFd(): number | undefined {
    return this.fds.shift();
  }

  /** @internal fds that arrived with input bytes */
  pushFds(fds: readonly number[]): void {
    if (this.closed) {
      closeFds(fds);
      return;
    }
    this.fds.push(...fds);
  }

  /** @internal close fds nobody took */
  dropFds(): void {
    const fds = this.fds;
    this.fds = [];
    closeFds(fds);
  }
}

function closeFds(fds: readonly number[]): void {
  for (const fd of fds) {
    try {
      fs.closeSync(fd);
    } catch {
      /* already closed */
    }
  }
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function timestamp(): QmpTimestamp {
  const ms = performance.timeOrigin + performance.now();
  if (!Number.isFinite(ms)) return { seconds: -1, microseconds: -1 };
  const seconds = Math.floor(ms / 1000);
  let microseconds = Math.floor((ms - seconds * 1000) * 1000);
  if (microseconds > 999999) microseconds = 999999;
  if (microseconds < 0) microseconds = 0;
  return { seconds, microseconds };
}

function errorBody(e: unknown): QmpErrorBody {
  if (e instanceof QmpError) return { class: e.errorClass, desc: e.desc };
  if (isObject(e) && typeof e.errorClass === 'string' && typeof e.desc === 'string') {
    return { class: e.errorClass, desc: e.desc };
  }
  if (e instanceof Error) return { class: 'GenericError', desc: e.message };
  return { class: 'GenericError', desc: String(e) };
}

interface Outcome {
  reply: Record<string, unknown>;
  /** qmp_capabilities succeeded: enter command mode once the reply is out */
  negotiated?: boolean;
}

/** Capabilities this monitor offers in its greeting (none: no OOB). */
const OFFERED_CAPS: readonly string[] = [];

/** Validation of qmp_capabilities arguments when COMMANDS lacks it. */
function validateCapsArgs(args: Record<string, unknown>): { enable?: string[] } {
  for (const k of Object.keys(args)) {
    if (k !== 'enable') throw new QmpError('GenericError', `Parameter '${k}' is unexpected`);
  }
  if (!('enable' in args)) return {};
  const en = args.enable;
  if (!Array.isArray(en)) throw new QmpError('GenericError', "Invalid parameter type for 'enable', expected: array");
  en.forEach((c, i) => {
    if (typeof c !== 'string') {
      throw new QmpError('GenericError', `Invalid parameter type for 'enable[${i}]', expected: string`);
    }
    if (c !== 'oob') {
      throw new QmpError('GenericError', `Parameter 'enable[${i}]' does not accept value '${c}'`);
    }
  });
  return { enable: en as string[] };
}

export interface QmpServerEvents {
  connect: [QmpClientConn];
  negotiated: [QmpClientConn];
  disconnect: [QmpClientConn];
}

export class QmpServer<Ctx = QmpClientConn> extends EventEmitter<QmpServerEvents> {
  private readonly commands: ReadonlyMap<string, CommandDef>;
  private readonly handlers: object;
  private readonly makeContext: (client: QmpClientConn) => Ctx;
  private readonly greetingLine: string;
  private readonly limits: Partial<JsonLimits> | undefined;
  private readonly maxQueued: number;
  private readonly useScm: boolean;
  private readonly maxBacklog: number;
  private readonly onDrop: ((client: QmpClientConn, backlog: number) => void) | undefined;
  private readonly listeners_: { server: net.Server; address: QmpListenAddress; unlink?: string }[] = [];
  private readonly clients = new Set<QmpClientConn>();
  private closing = false;

  constructor(opts: QmpServerOptions<Ctx>) {
    super();
    this.commands = opts.commands;
    this.handlers = opts.handlers;
    const mk = opts.makeContext ?? opts.ctxFactory;
    this.makeContext = mk ?? ((c: QmpClientConn) => c as unknown as Ctx);
    const v = opts.version ?? DEFAULT_QMP_VERSION;
    this.greetingLine =
      toQmpJson({
        QMP: {
          version: {
            qemu: { micro: v.qemu.micro, minor: v.qemu.minor, major: v.qemu.major },
            package: v.package,
          },
          capabilities: [...OFFERED_CAPS],
        },
      }) + '\r\n';
    this.limits = opts.limits;
    this.maxQueued = Math.max(1, opts.maxQueuedRequests ?? 8);
    this.useScm = opts.scmRights !== false && scmRightsAvailable();
    this.maxBacklog = opts.maxOutputBacklog ?? DEFAULT_MAX_OUTPUT_BACKLOG;
    this.onDrop = opts.onDrop;
  }

  /** Bound addresses of all listeners. */
  get addresses(): QmpListenAddress[] {
    return this.listeners_.map((l) => l.address);
  }

  /** Connected clients (both modes). */
  get connections(): QmpClientConn[] {
    return [...this.clients];
  }

  /**
   * Listen on `unix:PATH,server=on,wait=off` or `tcp:HOST:PORT,server=on,wait=off`
   * (also `server,nowait`, `tcp:[::1]:PORT`, port 0). May be called several
   * times. With wait=on it resolves once the first client has connected.
   */
  async listen(spec: string): Promise<QmpListenAddress> {
    if (this.closing) throw new Error('QMP server is closed');
    const { address, wait } = parseListenSpec(spec);
    let unlink: string | undefined;
    if (address.kind === 'unix') {
      let st: fs.Stats | undefined;
      try {
        st = fs.lstatSync(address.path);
      } catch {
        st = undefined;
      }
      if (st) {
        if (!st.isSocket()) {
          throw new Error(`Failed to listen on '${spec}': ${address.path} exists and is not a socket`);
        }
        fs.unlinkSync(address.path); // stale socket from an earlier run
      }
      unlink = address.path;
    }
    // With the addon, unix connections are read by recvmsg() (fds arrive);
    // the net.Socket must then never start reading on its own.
    const native = address.kind === 'unix' && this.useScm;
    const server = net.createServer({ allowHalfOpen: true, pauseOnConnect: native }, (sock) =>
      this.onConnection(sock, address, native),
    );
    await new Promise<void>((resolve, reject) => {
      const onError = (err: Error) => {
        reject(new Error(`Failed to listen on '${spec}': ${err.message}`));
      };
      server.once('error', onError);
      const done = () => {
        server.off('error', onError);
        resolve();
      };
      if (address.kind === 'unix') server.listen(address.path, done);
      else server.listen({ host: address.host || undefined, port: address.port }, done);
    });
    server.on('error', () => {
      /* accept errors after listening: ignore, keep serving */
    });
    let bound: QmpListenAddress = address;
    if (address.kind === 'tcp') {
      const a = server.address();
      if (a && typeof a === 'object') bound = { kind: 'tcp', host: a.address, port: a.port };
    }
    this.listeners_.push({ server, address: bound, unlink });
    if (wait) {
      await new Promise<void>((resolve) => {
        const on = () => resolve();
        server.once('connection', on);
      });
    }
    return bound;
  }

  /** Send an event to every client in command mode. */
  broadcast(event: string, data?: object): void {
    const msg: Record<string, unknown> = { timestamp: timestamp(), event };
    if (data !== undefined) msg.data = data;
    const line = toQmpJson(msg) + '\r\n';
    for (const c of this.clients) {
      if (c.closed) continue;
      if (c.mode === 'command') this.rawWrite(c, line);
      else if (c.mode === 'switching') c.pendingEvents.push(line);
    }
  }

  /** Stop listening, drop all clients, remove unix socket files. */
  async close(): Promise<void> {
    this.closing = true;
    const ls = this.listeners_.splice(0);
    for (const c of this.clients) c.socket.destroy();
    await Promise.all(
      ls.map(
        (l) =>
          new Promise<void>((resolve) => {
            l.server.close(() => resolve());
          }),
      ),
    );
    for (const l of ls) {
      if (l.unlink) {
        try {
          fs.unlinkSync(l.unlink);
        } catch {
          /* gone already */
        }
      }
    }
  }

  // -------------------------------------------------------------------------

  private onConnection(sock: net.Socket, address: QmpAddress, native: boolean): void {
    if (this.closing) {
      sock.destroy();
      return;
    }
    const peer =
      address.kind === 'unix'
        ? `unix:${address.path}`
        : `tcp:${sock.remoteAddress ?? '?'}:${sock.remotePort ?? '?'}`;
    const conn = new QmpClientConn(sock, peer, this.limits);
    if (address.kind === 'tcp') sock.setNoDelay(true);
    sock.on('error', () => {
      /* reset by peer etc.: 'close' follows */
    });
    let reader: ScmReader | undefined;
    sock.on('close', () => {
      reader?.close();
      conn.closed = true;
      conn.queue.length = 0;
      conn.pendingEvents = [];
      conn.dropFds();
      this.clients.delete(conn);
      this.emit('disconnect', conn);
    });
    try {
      conn.ctx = this.makeContext(conn);
    } catch {
      sock.destroy();
      return;
    }
    this.clients.add(conn);
    // greeting: one line, one write
    this.rawWrite(conn, this.greetingLine);
    const onEnd = () => {
      conn.inputEnded = true;
      this.maybeEnd(conn);
    };
    if (native) {
      reader = ScmReader.start(sock, {
        data: (chunk, fds) => {
          // descriptors belong to the commands in (or completed by) this chunk
          if (fds.length) conn.pushFds(fds);
          this.onData(conn, chunk);
        },
        end: onEnd,
        error: () => sock.destroy(),
      });
    }
    if (reader) {
      const r = reader;
      conn.scmRights = true;
      conn.pauseInput = () => r.pause();
      conn.resumeInput = () => r.resume();
    } else {
      sock.on('data', (chunk: Buffer) => this.onData(conn, chunk));
      sock.on('end', onEnd);
      if (native) sock.resume();
    }
    this.emit('connect', conn);
  }

  /** @internal feed input bytes (also used by the native fd-receiving reader) */
  onData(conn: QmpClientConn, chunk: Buffer): void {
    if (conn.closed) return;
    const results = conn.parser.feed(chunk);
    if (results.length === 0) return;
    conn.queue.push(...results);
    if (conn.queue.length >= this.maxQueued && !conn.paused) {
      conn.paused = true;
      conn.pauseInput();
    }
    void this.pump(conn);
  }

  private maybeEnd(conn: QmpClientConn): void {
    if (conn.inputEnded && !conn.busy && conn.queue.length === 0 && !conn.closed) {
      // With the native reader Node never sees the peer's EOF itself, so
      // finish the socket explicitly once our side has been flushed.
      conn.socket.end(() => {
        if (conn.scmRights) conn.socket.destroy();
      });
    }
  }

  private async pump(conn: QmpClientConn): Promise<void> {
    if (conn.busy) return;
    conn.busy = true;
    try {
      while (!conn.closed && conn.queue.length > 0) {
        const item = conn.queue.shift()!;
        if (conn.paused && conn.queue.length < this.maxQueued / 2) {
          conn.paused = false;
          conn.resumeInput();
        }
        let outcome: Outcome;
        try {
          outcome = await this.handle(conn, item);
        } catch (e) {
          outcome = { reply: { error: errorBody(e) } };
        }
        if (conn.closed) break;
        let line: string;
        try {
          line = toQmpJson(outcome.reply) + '\r\n';
        } catch (e) {
          line = toQmpJson({ error: errorBody(e) }) + '\r\n';
        }
        if (outcome.negotiated) conn.mode = 'switching';
        await this.writeAndWait(conn, line);
        if (outcome.negotiated && !conn.closed) {
          // Events go out only in writes after the qmp_capabilities reply.
          conn.mode = 'command';
          const pending = conn.pendingEvents;
          conn.pendingEvents = [];
          for (const ev of pending) this.rawWrite(conn, ev);
          this.emit('negotiated', conn);
        }
      }
    } finally {
      conn.busy = false;
      if (conn.paused && !conn.closed) {
        conn.paused = false;
        conn.resumeInput();
      }
      this.maybeEnd(conn);
    }
  }

  private rawWrite(conn: QmpClientConn, line: string): void {
    const s = conn.socket;
    if (conn.closed || s.destroyed || !s.writable) return;
    // what the kernel would not take yet, apart from the reply in flight
    const backlog = s.writableLength - conn.replyBytes;
    if (backlog + line.length > this.maxBacklog) {
      this.onDrop?.(conn, backlog);
      s.destroy();
      return;
    }
    s.write(line);
  }

  private writeAndWait(conn: QmpClientConn, line: string): Promise<void> {
    const s = conn.socket;
    if (conn.closed || s.destroyed || !s.writable) return Promise.resolve();
    conn.replyBytes = Buffer.byteLength(line);
    return new Promise<void>((resolve) => {
      const onClose = () => resolve();
      s.once('close', onClose);
      s.write(line, () => {
        conn.replyBytes = 0;
        s.off('close', onClose);
        resolve();
      });
    });
  }

  private async handle(conn: QmpClientConn, item: JsonParseResult): Promise<Outcome> {
    if (!item.ok) return { reply: { error: { class: 'GenericError', desc: item.error } } };
    const req = item.value;
    if (!isObject(req)) {
      return { reply: { error: { class: 'GenericError', desc: 'QMP input must be a JSON object' } } };
    }
    const hasId = Object.prototype.hasOwnProperty.call(req, 'id');
    const id = req.id;
    const fail = (cls: string, desc: string): Outcome => ({
      reply: hasId ? { id, error: { class: cls, desc } } : { error: { class: cls, desc } },
    });
    const ok = (ret: unknown): Outcome => ({
      reply: hasId ? { return: ret, id } : { return: ret },
    });

    for (const k of Object.keys(req)) {
      if (k !== 'execute' && k !== 'arguments' && k !== 'id') {
        return fail('GenericError', `QMP input member '${k}' is unexpected`);
      }
    }
    if (!Object.prototype.hasOwnProperty.call(req, 'execute')) {
      return fail('GenericError', "QMP input lacks member 'execute'");
    }
    const name = req.execute;
    if (typeof name !== 'string') return fail('GenericError', "QMP input member 'execute' must be a string");
    const hasArgs = Object.prototype.hasOwnProperty.call(req, 'arguments');
    if (hasArgs && !isObject(req.arguments)) {
      return fail('GenericError', "QMP input member 'arguments' must be an object");
    }
    const rawArgs = hasArgs ? (req.arguments as Record<string, unknown>) : {};

    try {
      if (name === 'qmp_capabilities') {
        const def = this.commands.get(name);
        const args = (def ? def.validate(rawArgs) : validateCapsArgs(rawArgs)) as { enable?: unknown } | undefined;
        if (conn.mode !== 'negotiation') {
          return fail('CommandNotFound', 'Capabilities negotiation is already complete, command ignored');
        }
        const enable = args && Array.isArray(args.enable) ? (args.enable as unknown[]) : [];
        for (const cap of enable) {
          if (!OFFERED_CAPS.includes(String(cap))) {
            return fail('GenericError', `Capability '${String(cap)}' not available`);
          }
        }
        return { ...ok({}), negotiated: true };
      }
      if (conn.mode !== 'command') {
        return fail('CommandNotFound', "Expecting capabilities negotiation with 'qmp_capabilities'");
      }
      const def = this.commands.get(name);
      const handler = def ? this.lookupHandler(name) : undefined;
      if (!def || !handler) return fail('CommandNotFound', `The command ${name} has not been found`);
      const args = def.validate(rawArgs);
      let result = handler.call(this.handlers, args, conn.ctx as Ctx);
      if (result !== null && typeof result === 'object' && typeof (result as PromiseLike<unknown>).then === 'function') {
        result = await result;
      }
      return ok(result === undefined ? {} : result);
    } catch (e) {
      const b = errorBody(e);
      return fail(b.class, b.desc);
    }
  }

  private lookupHandler(name: string): ((args: unknown, ctx: Ctx) => unknown) | undefined {
    // only names from the COMMANDS table reach here; still avoid Object.prototype
    let o: object | null = this.handlers;
    while (o && o !== Object.prototype) {
      const d = Object.getOwnPropertyDescriptor(o, name);
      if (d) return typeof d.value === 'function' ? (d.value as (args: unknown, ctx: Ctx) => unknown) : undefined;
      o = Object.getPrototypeOf(o) as object | null;
    }
    return undefined;
  }
}
