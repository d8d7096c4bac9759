/**
 * An NBD server as QEMU's (nbd-server-start, nbd-server-add) and qemu-nbd
 * serve: fixed newstyle negotiation, NBD_OPT_EXPORT_NAME, INFO, GO, LIST,
 * ABORT, STRUCTURED_REPLY and the base:allocation metadata context; read,
 * write, flush, trim, write-zeroes, cache and block status, with simple or
 * structured replies. TLS is not offered (STARTTLS is refused with
 * NBD_REP_ERR_POLICY, as QEMU without tls-creds does).
 *
 * Each export serves an `NbdExportTarget` (a drive, an image). Requests of
 * one connection are read in order and run concurrently up to
 * MAX_IN_FLIGHT; replies go out as each finishes (the targets here run
 * their requests in issue order, so they mostly keep it).
 *
 * Bad requests get QEMU 7.2's texts. The error values follow the protocol
 * document's advice (EPERM for a write to a read-only export, ENOSPC for a
 * write past the end, EINVAL otherwise), where QEMU 7.2 answers EINVAL to
 * all of them. A request that leaves the stream unusable is answered and
 * then the connection is dropped (a hard disconnect, which the protocol
 * allows after a violation of a MUST): a bad request magic, and a WRITE
 * longer than NBD_MAX_BUFFER_SIZE (its payload is not read).
 */
import { EventEmitter } from 'node:events';
import * as net from 'node:net';
import { statSync, unlinkSync } from 'node:fs';
import { dirname } from 'node:path';
import { describeAddress, type NbdAddress } from './address.js';
import { systemErrorText } from './errors.js';
import * as P from './protocol.js';
import { NbdEof, SocketReader } from './reader.js';

/** What an export serves. Offsets and lengths are checked against `size` before a call. */
export interface NbdExportTarget {
  readonly size: number;
  read(offset: number, buf: Uint8Array): Promise<void>;
  write(offset: number, data: Uint8Array): Promise<void>;
  writeZeroes(offset: number, length: number): Promise<void>;
  flush(): Promise<void>;
  /** NBD_CMD_TRIM; without it a trim succeeds and changes nothing (the protocol allows that). */
  trim?(offset: number, length: number): Promise<void>;
  /** base:allocation of a range: at least 1 and at most `length` bytes share the answer. */
  allocation?(offset: number, length: number): Promise<{ hole: boolean; zero: boolean; length: number }>;
}

export interface ExportOptions {
  writable: boolean;
  description?: string;
}

export class NbdExport {
  readonly clients = new Set<ServerConnection>();
  constructor(
    readonly name: string,
    readonly target: NbdExportTarget,
    readonly writable: boolean,
    readonly description: string | undefined,
  ) {}

  /** The transmission flags of this export (structured: the client negotiated structured replies). */
  flags(structured: boolean): number {
    let f = P.NBD_FLAG_HAS_FLAGS | P.NBD_FLAG_SEND_FLUSH | P.NBD_FLAG_SEND_FUA | P.NBD_FLAG_SEND_CACHE | P.NBD_FLAG_CAN_MULTI_CONN;
    if (this.writable) f |= P.NBD_FLAG_SEND_TRIM | P.NBD_FLAG_SEND_WRITE_ZEROES;
    else f |= P.NBD_FLAG_READ_ONLY;
    if (structured) f |= P.NBD_FLAG_SEND_DF;
    return f;
  }
}

/** A refused server operation (QEMU's text). */
export class NbdServerError extends Error {
  override name = 'NbdServerError';
}

export interface ServerOptions {
  /** Connections at once (0: no limit); further ones are closed at once. */
  maxConnections?: number;
}

/** Requests of one connection being served at once (QEMU's MAX_NBD_REQUESTS). */
const MAX_IN_FLIGHT = 16;
/** The longest option payload accepted. */
const MAX_OPTION_LENGTH = P.NBD_MAX_BUFFER_SIZE;
/** QEMU's block size facts for an export: any alignment, 4 KiB preferred, 32 MiB at most. */
const MIN_BLOCK = 1;
const PREFERRED_BLOCK = 4096;

const OPT_NAMES: Record<number, string> = {
  [P.NBD_OPT_EXPORT_NAME]: 'export name',
  [P.NBD_OPT_ABORT]: 'abort',
  [P.NBD_OPT_LIST]: 'list',
  [P.NBD_OPT_STARTTLS]: 'starttls',
  [P.NBD_OPT_INFO]: 'info',
  [P.NBD_OPT_GO]: 'go',
  [P.NBD_OPT_STRUCTURED_REPLY]: 'structured reply',
  [P.NBD_OPT_LIST_META_CONTEXT]: 'list meta context',
  [P.NBD_OPT_SET_META_CONTEXT]: 'set meta context',
};

function optName(o: number): string {
  return OPT_NAMES[o] ?? '<unknown>';
}

/**
 * Events: 'client-closed' (exportName | null, clean: the client sent
 * NBD_CMD_DISC or NBD_OPT_ABORT), 'client-error' (Error) — a connection
 * ended because of a protocol violation or a socket error (for logs).
 */
export class NbdServer extends EventEmitter {
  private readonly exportsByName = new Map<string, NbdExport>();
  private readonly connections = new Set<ServerConnection>();
  private closed = false;

  private constructor(
    private readonly listener: net.Server,
    private readonly addr: NbdAddress,
    private readonly unixPath: string | undefined,
  ) {
    super();
  }

  /** Listen; rejects with QEMU's texts ("Failed to bind socket to PATH: ..."). */
  static async listen(addr: NbdAddress, opts: ServerOptions = {}): Promise<NbdServer> {
    const listener = net.createServer({ noDelay: true, pauseOnConnect: false });
    if (opts.maxConnections !== undefined && opts.maxConnections > 0) listener.maxConnections = opts.maxConnections;
    await new Promise<void>((resolve, reject) => {
      const fail = (e: Error) => {
        listener.close();
        reject(new NbdServerError(bindErrorText(addr, e)));
      };
      listener.once('error', fail);
      const done = () => {
        listener.off('error', fail);
        resolve();
      };
      if (addr.kind === 'unix') listener.listen(addr.path, done);
      else if (addr.kind === 'inet') listener.listen({ host: addr.host, port: addr.port }, done);
      else listener.listen({ fd: addr.fd }, done);
    });
    let bound = addr;
    const a = listener.address();
    if (addr.kind === 'inet' && a !== null && typeof a === 'object') bound = { kind: 'inet', host: addr.host, port: a.port };
    const server = new NbdServer(listener, bound, addr.kind === 'unix' ? addr.path : undefined);
    listener.on('connection', (s) => server.accept(s));
    listener.on('error', (e) => server.emit('client-error', e));
    return server;
  }

  /** The address it listens on (the real port when 0 was asked for). */
  address(): NbdAddress {
    return this.addr;
  }

  describe(): string {
    return describeAddress(this.addr);
  }

  /** Export `target` as `name` (QEMU's check: the name must not be in use). */
  addExport(name: string, target: NbdExportTarget, opts: ExportOptions): NbdExport {
    if (this.closed) throw new NbdServerError('NBD server not running');
    if (this.exportsByName.has(name)) throw new NbdServerError(`NBD server already has export named '${name}'`);
    const e = new NbdExport(name, target, opts.writable, opts.description);
    this.exportsByName.set(name, e);
    return e;
  }

  getExport(name: string): NbdExport | undefined {
    return this.exportsByName.get(name);
  }

  exportNames(): string[] {
    return [...this.exportsByName.keys()];
  }

  /**
   * Remove an export. 'safe' refuses while a client uses it ("export 'NAME'
   * still in use"); 'hard' drops those clients first.
   */
  async removeExport(name: string, mode: 'safe' | 'hard'): Promise<void> {
    const e = this.exportsByName.get(name);
    if (e === undefined) throw new NbdServerError(`Export '${name}' is not found`);
    if (mode === 'safe' && e.clients.size > 0) throw new NbdServerError(`export '${name}' still in use`);
    this.exportsByName.delete(name);
    await Promise.all([...e.clients].map((c) => c.drop()));
  }

  /** Stop listening and drop every connection; resolves once their requests in flight have finished. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const listening = new Promise<void>((r) => this.listener.close(() => r()));
    await Promise.all([...this.connections].map((c) => c.drop()));
    this.exportsByName.clear();
    await listening;
    if (this.unixPath !== undefined) {
      try {
        unlinkSync(this.unixPath);
      } catch {
        /* already gone */
      }
    }
  }

  private accept(socket: net.Socket): void {
    if (this.closed) {
      socket.destroy();
      return;
    }
    socket.setNoDelay(true);
    const c = new ServerConnection(socket, this.exportsByName, (e) => this.emit('client-error', e));
    this.connections.add(c);
    void c.run().finally(() => {
      this.connections.delete(c);
      this.emit('client-closed', c.export?.name ?? null, c.clean);
    });
  }
}

function bindErrorText(addr: NbdAddress, e: Error): string {
  const code = (e as NodeJS.ErrnoException).code;
  if (addr.kind === 'unix') return `Failed to bind socket to ${addr.path}: ${unixBindReason(addr.path, e)}`;
  if (addr.kind === 'inet' && (code === 'ENOTFOUND' || code === 'EAI_AGAIN' || code?.startsWith('EAI_'))) {
    return `address resolution failed for ${addr.host}:${addr.port}: Name or service not known`;
  }
  return `Failed to bind socket: ${systemErrorText(e)}`;
}

/** libuv reports a bind in a missing directory as EACCES; bind(2) says ENOENT (QEMU's text). */
function unixBindReason(path: string, e: Error): string {
  if ((e as NodeJS.ErrnoException).code === 'EACCES') {
    try {
      if (!statSync(dirname(path)).isDirectory()) return 'Not a directory';
    } catch (se) {
      return systemErrorText(se);
    }
  }
  return systemErrorText(e);
}

/** A bad request that the connection survives: answered with `errno` and QEMU's text. */
class RequestError extends Error {
  constructor(
    readonly errno: number,
    message: string,
  ) {
    super(message);
  }
}

/** A peer that broke the protocol: the connection ends. */
class ProtocolViolation extends Error {}

export class ServerConnection {
  /** The export in transmission, once chosen. */
  export: NbdExport | null = null;
  /** The client ended cleanly (NBD_CMD_DISC or NBD_OPT_ABORT). */
  clean = false;
  private readonly reader: SocketReader;
  private structured = false;
  private noZeroes = false;
  /** base:allocation was selected with NBD_OPT_SET_META_CONTEXT. */
  private baseAllocation = false;
  private readonly inFlight = new Set<Promise<void>>();
  private dropped = false;
  private done: Promise<void> = Promise.resolve();

  constructor(
    private readonly socket: net.Socket,
    private readonly exports: Map<string, NbdExport>,
    private readonly onError: (e: Error) => void,
  ) {
    this.reader = new SocketReader(socket);
    socket.on('error', () => {
      /* seen by the reader */
    });
  }

  /** Negotiate, then serve requests until the client leaves or the connection fails. */
  run(): Promise<void> {
    this.done = this.serve();
    return this.done;
  }

  /** Hard disconnect (export removed, server stopped); resolves when requests in flight are done. */
  async drop(): Promise<void> {
    this.dropped = true;
    this.socket.destroy();
    await this.done.catch(() => undefined);
  }

  private async serve(): Promise<void> {
    try {
      const exp = await this.negotiate();
      if (exp === null) return;
      this.export = exp;
      exp.clients.add(this);
      try {
        await this.transmission(exp);
      } finally {
        exp.clients.delete(this);
      }
    } catch (e) {
      if (!this.dropped && !(e instanceof NbdEof && e.got === 0 && e.socketError === undefined)) {
        this.onError(e instanceof Error ? e : new Error(String(e)));
      }
    } finally {
      await Promise.allSettled([...this.inFlight]);
      if (!this.socket.destroyed) this.socket.end();
      this.socket.destroy();
    }
  }

  private send(b: Buffer): void {
    if (!this.socket.destroyed) this.socket.write(b);
  }

  // ---- negotiation

  /** The export chosen, or null when the client aborted. */
  private async negotiate(): Promise<NbdExport | null> {
    const hello = Buffer.allocUnsafe(P.HANDSHAKE_SIZE);
    hello.writeBigUInt64BE(P.NBD_INIT_MAGIC, 0);
    hello.writeBigUInt64BE(P.NBD_OPTS_MAGIC, 8);
    hello.writeUInt16BE(P.NBD_FLAG_FIXED_NEWSTYLE | P.NBD_FLAG_NO_ZEROES, 16);
    this.send(hello);
    const cflags = (await this.reader.read(4)).readUInt32BE(0);
    if ((cflags & ~(P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES)) !== 0) {
      throw new ProtocolViolation(`Unsupported client flags 0x${cflags.toString(16)}`);
    }
    const fixed = (cflags & P.NBD_FLAG_C_FIXED_NEWSTYLE) !== 0;
    this.noZeroes = (cflags & P.NBD_FLAG_C_NO_ZEROES) !== 0;

    for (;;) {
      const h = await this.reader.read(P.OPTION_HEADER_SIZE);
      if (h.readBigUInt64BE(0) !== P.NBD_OPTS_MAGIC) throw new ProtocolViolation('Bad magic received');
      const option = h.readUInt32BE(8);
      const length = h.readUInt32BE(12);
      if (length > MAX_OPTION_LENGTH) throw new ProtocolViolation(`len (${length}) is larger than max len (${MAX_OPTION_LENGTH})`);
      const data = await this.reader.read(length);
      if (option === P.NBD_OPT_EXPORT_NAME) {
        const e = this.exports.get(data.toString('utf8'));
        // the option cannot answer an error: the session ends
        if (e === undefined) throw new ProtocolViolation(`export '${data.toString('utf8')}' not present`);
        const reply = Buffer.alloc(10 + (this.noZeroes ? 0 : P.EXPORT_NAME_PADDING));
        reply.writeBigUInt64BE(BigInt(e.target.size), 0);
        reply.writeUInt16BE(e.flags(this.structured), 8);
        this.send(reply);
        return e;
      }
      if (!fixed) throw new ProtocolViolation(`Unsupported option ${option} (${optName(option)}) without fixed newstyle`);
      const err = (type: number, msg: string) => this.send(P.encodeOptionReply(option, type, Buffer.from(msg, 'utf8')));
      switch (option) {
        case P.NBD_OPT_ABORT:
          this.send(P.encodeOptionReply(option, P.NBD_REP_ACK));
          this.clean = true;
          return null;
        case P.NBD_OPT_LIST:
          if (length !== 0) {
            err(P.NBD_REP_ERR_INVALID, "option 'list' has unexpected length");
            break;
          }
          for (const e of this.exports.values()) {
            const name = Buffer.from(e.name, 'utf8');
            const desc = Buffer.from(e.description ?? '', 'utf8');
            const d = Buffer.allocUnsafe(4 + name.length + desc.length);
            d.writeUInt32BE(name.length, 0);
            name.copy(d, 4);
            desc.copy(d, 4 + name.length);
            this.send(P.encodeOptionReply(option, P.NBD_REP_SERVER, d));
          }
          this.send(P.encodeOptionReply(option, P.NBD_REP_ACK));
          break;
        case P.NBD_OPT_STARTTLS:
          err(P.NBD_REP_ERR_POLICY, 'TLS not configured');
          break;
        case P.NBD_OPT_STRUCTURED_REPLY:
          if (length !== 0) err(P.NBD_REP_ERR_INVALID, "option 'structured reply' has unexpected length");
          else if (this.structured) err(P.NBD_REP_ERR_INVALID, 'structured reply already negotiated');
          else {
            this.structured = true;
            this.send(P.encodeOptionReply(option, P.NBD_REP_ACK));
          }
          break;
        case P.NBD_OPT_INFO:
        case P.NBD_OPT_GO: {
          const e = this.infoOrGo(option, data);
          if (e !== null && option === P.NBD_OPT_GO) return e;
          break;
        }
        case P.NBD_OPT_LIST_META_CONTEXT:
        case P.NBD_OPT_SET_META_CONTEXT:
          this.metaContext(option, data);
          break;
        default:
          err(P.NBD_REP_ERR_UNSUP, `Unsupported option ${option} (${optName(option)})`);
      }
    }
  }

  /** NBD_OPT_INFO / NBD_OPT_GO: the INFO replies and ACK, or an error reply; the export on success. */
  private infoOrGo(option: number, data: Buffer): NbdExport | null {
    const bad = () => {
      this.send(P.encodeOptionReply(option, P.NBD_REP_ERR_INVALID, Buffer.from(`Inconsistent lengths in option ${optName(option)}`)));
      return null;
    };
    if (data.length < 6) return bad();
    const nameLen = data.readUInt32BE(0);
    if (nameLen > data.length - 6) return bad();
    const name = data.subarray(4, 4 + nameLen).toString('utf8');
    const count = data.readUInt16BE(4 + nameLen);
    if (data.length !== 6 + nameLen + count * 2) return bad();
    const wanted = new Set<number>();
    for (let i = 0; i < count; i++) wanted.add(data.readUInt16BE(6 + nameLen + i * 2));
    const e = this.exports.get(name);
    if (e === undefined) {
      this.send(P.encodeOptionReply(option, P.NBD_REP_ERR_UNKNOWN, Buffer.from(`export '${name}' not present`)));
      return null;
    }
    const info = (type: number, payload: Buffer) => {
      const b = Buffer.allocUnsafe(2 + payload.length);
      b.writeUInt16BE(type, 0);
      payload.copy(b, 2);
      this.send(P.encodeOptionReply(option, P.NBD_REP_INFO, b));
    };
    if (wanted.has(P.NBD_INFO_NAME)) info(P.NBD_INFO_NAME, Buffer.from(e.name, 'utf8'));
    if (e.description !== undefined) info(P.NBD_INFO_DESCRIPTION, Buffer.from(e.description, 'utf8'));
    const bs = Buffer.allocUnsafe(12);
    bs.writeUInt32BE(MIN_BLOCK, 0);
    bs.writeUInt32BE(PREFERRED_BLOCK, 4);
    bs.writeUInt32BE(P.NBD_MAX_BUFFER_SIZE, 8);
    info(P.NBD_INFO_BLOCK_SIZE, bs);
    const ex = Buffer.allocUnsafe(10);
    ex.writeBigUInt64BE(BigInt(e.target.size), 0);
    ex.writeUInt16BE(e.flags(this.structured), 8);
    info(P.NBD_INFO_EXPORT, ex);
    this.send(P.encodeOptionReply(option, P.NBD_REP_ACK));
    return e;
  }

  /** NBD_OPT_LIST_META_CONTEXT / SET_META_CONTEXT: Ferry knows base:allocation (context id 0). */
  private metaContext(option: number, data: Buffer): void {
    const reply = (type: number, payload?: Buffer) => this.send(P.encodeOptionReply(option, type, payload));
    if (!this.structured) {
      reply(P.NBD_REP_ERR_INVALID, Buffer.from(`request option '${optName(option)}' when structured reply is not negotiated`));
      return;
    }
    const bad = () => reply(P.NBD_REP_ERR_INVALID, Buffer.from(`Inconsistent lengths in option ${optName(option)}`));
    if (data.length < 8) return bad();
    const nameLen = data.readUInt32BE(0);
    if (nameLen > data.length - 8) return bad();
    const name = data.subarray(4, 4 + nameLen).toString('utf8');
    let at = 4 + nameLen;
    const count = data.readUInt32BE(at);
    at += 4;
    const queries: string[] = [];
    for (let i = 0; i < count; i++) {
      if (at + 4 > data.length) return bad();
      const n = data.readUInt32BE(at);
      if (n > data.length - at - 4) return bad();
      queries.push(data.subarray(at + 4, at + 4 + n).toString('utf8'));
      at += 4 + n;
    }
    if (at !== data.length) return bad();
    if (!this.exports.has(name)) {
      reply(P.NBD_REP_ERR_UNKNOWN, Buffer.from(`export '${name}' not present`));
      return;
    }
    const list = option === P.NBD_OPT_LIST_META_CONTEXT;
    const matches = (q: string) => q === P.BASE_ALLOCATION || (list && (q === 'base:' || q === 'base:allocation'));
    const selected = (list && queries.length === 0) || queries.some(matches);
    if (selected) {
      const ctx = Buffer.from(P.BASE_ALLOCATION, 'utf8');
      const payload = Buffer.alloc(4 + ctx.length);
      ctx.copy(payload, 4);
      reply(P.NBD_REP_META_CONTEXT, payload);
    }
    if (!list) this.baseAllocation = selected;
    reply(P.NBD_REP_ACK);
  }

  // ---- transmission

  private async transmission(exp: NbdExport): Promise<void> {
    for (;;) {
      while (this.inFlight.size >= MAX_IN_FLIGHT) await Promise.race(this.inFlight);
      const h = await this.reader.read(P.REQUEST_SIZE);
      const req = P.decodeRequest(h);
      if (req.magic !== P.NBD_REQUEST_MAGIC) {
        this.replyError(req.handle, P.NBD_EINVAL, `invalid magic (got 0x${req.magic.toString(16)})`);
        throw new ProtocolViolation(`invalid magic (got 0x${req.magic.toString(16)})`);
      }
      if (req.type === P.NBD_CMD_DISC) {
        this.clean = true;
        return;
      }
      let payload: Buffer | undefined;
      try {
        this.checkHeader(req);
        if (req.type === P.NBD_CMD_WRITE) payload = await this.reader.read(req.length);
        this.checkRequest(exp, req);
      } catch (e) {
        if (!(e instanceof RequestError)) throw e;
        this.replyError(req.handle, e.errno, e.message);
        if (req.type === P.NBD_CMD_WRITE && payload === undefined) {
          // the payload was not read: the stream cannot be followed any further
          throw new ProtocolViolation(e.message);
        }
        continue;
      }
      const p = this.handle(exp, req, payload).catch((e: unknown) => this.onError(e instanceof Error ? e : new Error(String(e))));
      this.inFlight.add(p);
      void p.finally(() => this.inFlight.delete(p));
    }
  }

  /** What can be checked before a WRITE's payload is read. */
  private checkHeader(r: P.NbdRequest): void {
    if (r.offset + BigInt(r.length) > 0xffffffffffffffffn) {
      throw new RequestError(P.NBD_EINVAL, "integer overflow detected, you're probably being attacked");
    }
    if ((r.type === P.NBD_CMD_READ || r.type === P.NBD_CMD_WRITE) && r.length > P.NBD_MAX_BUFFER_SIZE) {
      throw new RequestError(P.NBD_EINVAL, `len (${r.length} ) is larger than max len (${P.NBD_MAX_BUFFER_SIZE})`);
    }
  }

  /** The rest of QEMU's sanity checks, in its order. */
  private checkRequest(exp: NbdExport, r: P.NbdRequest): void {
    const known = [P.NBD_CMD_READ, P.NBD_CMD_WRITE, P.NBD_CMD_FLUSH, P.NBD_CMD_TRIM, P.NBD_CMD_CACHE, P.NBD_CMD_WRITE_ZEROES, P.NBD_CMD_BLOCK_STATUS];
    if (!known.includes(r.type)) throw new RequestError(P.NBD_EINVAL, `invalid request type (${r.type}) received`);
    const writes = r.type === P.NBD_CMD_WRITE || r.type === P.NBD_CMD_TRIM || r.type === P.NBD_CMD_WRITE_ZEROES;
    if (writes && !exp.writable) throw new RequestError(P.NBD_EPERM, 'Export is read-only');
    const size = BigInt(exp.target.size);
    if (r.type !== P.NBD_CMD_FLUSH && (r.offset > size || BigInt(r.length) > size - r.offset)) {
      const errno = r.type === P.NBD_CMD_WRITE || r.type === P.NBD_CMD_WRITE_ZEROES ? P.NBD_ENOSPC : P.NBD_EINVAL;
      throw new RequestError(errno, `operation past EOF; From: ${r.offset}, Len: ${r.length}, Size: ${size}`);
    }
    let valid = P.NBD_CMD_FLAG_FUA;
    if (r.type === P.NBD_CMD_READ && this.structured) valid |= P.NBD_CMD_FLAG_DF;
    if (r.type === P.NBD_CMD_WRITE_ZEROES) valid |= P.NBD_CMD_FLAG_NO_HOLE;
    if (r.type === P.NBD_CMD_BLOCK_STATUS) valid |= P.NBD_CMD_FLAG_REQ_ONE;
    if ((r.flags & ~valid) !== 0) {
      throw new RequestError(P.NBD_EINVAL, `unsupported flags for command ${P.CMD_NAMES[r.type]} (got 0x${r.flags.toString(16)})`);
    }
    if (r.type === P.NBD_CMD_BLOCK_STATUS && !this.baseAllocation) {
      throw new RequestError(P.NBD_EINVAL, 'CMD_BLOCK_STATUS not negotiated');
    }
    if (r.type === P.NBD_CMD_BLOCK_STATUS && r.length === 0) throw new RequestError(P.NBD_EINVAL, 'block status of no bytes');
  }

  private async handle(exp: NbdExport, r: P.NbdRequest, payload: Buffer | undefined): Promise<void> {
    const t = exp.target;
    const offset = Number(r.offset);
    const fua = (r.flags & P.NBD_CMD_FLAG_FUA) !== 0;
    try {
      switch (r.type) {
        case P.NBD_CMD_READ: {
          const buf = Buffer.allocUnsafe(r.length);
          await t.read(offset, buf);
          this.replyRead(r.handle, r.offset, buf);
          return;
        }
        case P.NBD_CMD_WRITE:
          await t.write(offset, payload!);
          if (fua) await t.flush();
          break;
        case P.NBD_CMD_WRITE_ZEROES:
          await t.writeZeroes(offset, r.length);
          if (fua) await t.flush();
          break;
        case P.NBD_CMD_TRIM:
          if (t.trim !== undefined) await t.trim(offset, r.length);
          if (fua) await t.flush();
          break;
        case P.NBD_CMD_FLUSH:
          await t.flush();
          break;
        case P.NBD_CMD_CACHE:
          break;
        case P.NBD_CMD_BLOCK_STATUS:
          await this.replyBlockStatus(t, r);
          return;
      }
      this.replyOk(r.handle);
    } catch (e) {
      this.replyError(r.handle, errnoOf(e), e instanceof Error ? e.message : String(e));
    }
  }

  private replyOk(handle: bigint): void {
    // a simple reply is allowed for anything but a read, structured or not
    this.send(P.encodeSimpleReply(0, handle));
  }

  private replyRead(handle: bigint, offset: bigint, data: Buffer): void {
    if (!this.structured) {
      this.send(P.encodeSimpleReply(0, handle));
      this.send(data);
      return;
    }
    if (data.length === 0) {
      this.send(P.encodeChunkHeader(P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_NONE, handle, 0));
      return;
    }
    const off = Buffer.allocUnsafe(8);
    off.writeBigUInt64BE(offset, 0);
    this.send(P.encodeChunkHeader(P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_OFFSET_DATA, handle, 8 + data.length));
    this.send(off);
    this.send(data);
  }

  /** An error reply: an error chunk with the text when structured replies are on, else a simple reply. */
  private replyError(handle: bigint, errno: number, message: string): void {
    if (this.structured) this.send(P.encodeErrorChunk(handle, errno, message));
    else this.send(P.encodeSimpleReply(errno, handle));
  }

  private async replyBlockStatus(t: NbdExportTarget, r: P.NbdRequest): Promise<void> {
    const one = (r.flags & P.NBD_CMD_FLAG_REQ_ONE) !== 0;
    const extents: number[] = [];
    let offset = Number(r.offset);
    const end = offset + r.length;
    // at most 16 extents per reply, as QEMU bounds it too
    while (offset < end && extents.length < (one ? 2 : 32)) {
      const s = t.allocation !== undefined ? await t.allocation(offset, end - offset) : { hole: false, zero: false, length: end - offset };
      const flags = (s.hole ? P.NBD_STATE_HOLE : 0) | (s.zero ? P.NBD_STATE_ZERO : 0);
      const n = Math.max(1, Math.min(s.length, end - offset));
      const last = extents.length;
      if (last > 0 && extents[last - 1] === flags && extents[last - 2]! + n <= 0xffffffff) extents[last - 2]! += n;
      else extents.push(n, flags);
      offset += n;
    }
    const payload = Buffer.allocUnsafe(4 + extents.length * 4);
    payload.writeUInt32BE(0, 0); // the context id of base:allocation
    extents.forEach((v, i) => payload.writeUInt32BE(v >>> 0, 4 + i * 4));
    this.send(P.encodeChunkHeader(P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_BLOCK_STATUS, r.handle, payload.length));
    this.send(payload);
  }
}

/** The NBD error value of a target's failure. */
function errnoOf(e: unknown): number {
  const code = (e as NodeJS.ErrnoException | null)?.code;
  if (code === 'ENOSPC' || code === 'EDQUOT' || code === 'EFBIG') return P.NBD_ENOSPC;
  if (code === 'EPERM' || code === 'EROFS' || code === 'EACCES') return P.NBD_EPERM;
  if (code === 'ENOMEM') return P.NBD_ENOMEM;
  return P.NBD_EIO;
}
