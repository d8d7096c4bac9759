/**
 * An NBD client as QEMU's block/nbd.c speaks to a server: fixed newstyle,
 * structured replies when the server has them, NBD_OPT_GO (NBD_OPT_EXPORT_NAME
 * with a server that does not know it), then pipelined requests with a
 * handle each: read, write (FUA on request), flush, trim, write-zeroes.
 * Requests longer than the server's maximum are split. Once the
 * connection fails, every request in flight and every later one rejects
 * with NbdConnectionError; an error reply rejects only its request, with
 * NbdError.
 */
import { EventEmitter } from 'node:events';
import * as net from 'node:net';
import { describeAddress, type NbdAddress } from './address.js';
import { NbdConnectionError, NbdError, systemErrorText } from './errors.js';
import * as P from './protocol.js';
import { SocketReader } from './reader.js';

export interface ClientOptions {
  /** Negotiate structured replies (default true). */
  structuredReplies?: boolean;
  /** Give up connecting and negotiating after this long (default 30 s). */
  timeoutMs?: number;
}

export interface ExportEntry {
  name: string;
  description: string;
}

interface Pending {
  type: number;
  offset: number;
  /** READ: where the data goes. */
  buf?: Uint8Array;
  error?: NbdError;
  resolve(): void;
  reject(e: Error): void;
}

/** The server's largest request, when it does not say (QEMU's default when NBD_INFO_BLOCK_SIZE is absent). */
const DEFAULT_MAX_BLOCK = P.NBD_MAX_BUFFER_SIZE;

async function openSocket(addr: NbdAddress, timeoutMs: number): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const s =
      addr.kind === 'unix'
        ? net.createConnection({ path: addr.path })
        : addr.kind === 'inet'
          ? net.createConnection({ host: addr.host, port: addr.port, noDelay: true })
          : new net.Socket({ fd: addr.fd, readable: true, writable: true });
    const timer = setTimeout(() => {
      s.destroy();
      reject(new NbdConnectionError(`Failed to connect to '${describeAddress(addr)}': Connection timed out`));
    }, timeoutMs);
    s.once('error', (e) => {
      clearTimeout(timer);
      reject(new NbdConnectionError(`Failed to connect to '${addr.kind === 'unix' ? addr.path : describeAddress(addr)}': ${systemErrorText(e)}`));
    });
    const ok = () => {
      clearTimeout(timer);
      s.removeAllListeners('error');
      s.setNoDelay(true);
      resolve(s);
    };
    if (addr.kind === 'fd') ok();
    else s.once('connect', ok);
  });
}

/** The handshake's first part: magic, flags; returns whether the server is fixed newstyle and offers NO_ZEROES. */
async function hello(socket: net.Socket, r: SocketReader): Promise<{ fixed: boolean; noZeroes: boolean }> {
  const h = await r.read(P.HANDSHAKE_SIZE);
  const magic = h.readBigUInt64BE(0);
  if (magic !== P.NBD_INIT_MAGIC) throw new NbdConnectionError(`Bad initial magic received: 0x${magic.toString(16)}`);
  const m2 = h.readBigUInt64BE(8);
  if (m2 !== P.NBD_OPTS_MAGIC) throw new NbdConnectionError(`Bad server magic received: 0x${m2.toString(16)} (oldstyle servers are not supported)`);
  const hflags = h.readUInt16BE(16);
  const fixed = (hflags & P.NBD_FLAG_FIXED_NEWSTYLE) !== 0;
  const noZeroes = (hflags & P.NBD_FLAG_NO_ZEROES) !== 0;
  const c = Buffer.allocUnsafe(4);
  c.writeUInt32BE((fixed ? P.NBD_FLAG_C_FIXED_NEWSTYLE : 0) | (noZeroes ? P.NBD_FLAG_C_NO_ZEROES : 0), 0);
  socket.write(c);
  return { fixed, noZeroes };
}

/** One option reply (checked against the option sent). */
async function optionReply(r: SocketReader, option: number): Promise<{ type: number; data: Buffer }> {
  const h = await r.read(P.OPTION_REPLY_HEADER_SIZE);
  if (h.readBigUInt64BE(0) !== P.NBD_REP_MAGIC) throw new NbdConnectionError('Unexpected option reply magic');
  if (h.readUInt32BE(8) !== option) throw new NbdConnectionError(`Unexpected option type ${h.readUInt32BE(8)}, expected ${option}`);
  const type = h.readUInt32BE(12);
  const length = h.readUInt32BE(16);
  if (length > P.NBD_MAX_BUFFER_SIZE) throw new NbdConnectionError(`Option reply of ${length} bytes is too long`);
  return { type, data: await r.read(length) };
}

function optionError(type: number, data: Buffer, what: string): NbdError {
  const msg = data.toString('utf8');
  return new NbdError(0, `${what}${msg !== '' ? `: ${msg}` : ''}`, type);
}

export class NbdClient extends EventEmitter {
  size = 0;
  /** Transmission flags. */
  flags = 0;
  minBlock = 1;
  preferredBlock = 4096;
  maxBlock = DEFAULT_MAX_BLOCK;
  description: string | undefined;
  structured = false;
  private nextHandle = 1n;
  private readonly pending = new Map<bigint, Pending>();
  private readonly inFlight = new Set<Promise<void>>();
  private failure: NbdConnectionError | null = null;
  private closing = false;
  private readonly pump: Promise<void>;

  private constructor(
    private readonly socket: net.Socket,
    private readonly reader: SocketReader,
    readonly address: NbdAddress,
    readonly exportName: string,
    info: { size: number; flags: number; minBlock?: number; preferredBlock?: number; maxBlock?: number; description?: string; structured: boolean },
  ) {
    super();
    this.size = info.size;
    this.flags = info.flags;
    if (info.minBlock !== undefined) this.minBlock = info.minBlock;
    if (info.preferredBlock !== undefined) this.preferredBlock = info.preferredBlock;
    if (info.maxBlock !== undefined) this.maxBlock = Math.min(info.maxBlock, DEFAULT_MAX_BLOCK);
    this.description = info.description;
    this.structured = info.structured;
    socket.on('error', () => {
      /* the reader sees it */
    });
    this.pump = this.replies();
  }

  /** Connect and negotiate the export; rejects with NbdConnectionError or NbdError (QEMU-like texts). */
  static async connect(addr: NbdAddress, exportName: string, opts: ClientOptions = {}): Promise<NbdClient> {
    const timeoutMs = opts.timeoutMs ?? 30000;
    const socket = await openSocket(addr, timeoutMs);
    const reader = new SocketReader(socket);
    const timer = setTimeout(() => socket.destroy(new Error('Connection timed out during negotiation')), timeoutMs);
    try {
      const { fixed, noZeroes } = await hello(socket, reader);
      let structured = false;
      if (fixed && (opts.structuredReplies ?? true)) {
        socket.write(P.encodeOption(P.NBD_OPT_STRUCTURED_REPLY));
        const rep = await optionReply(reader, P.NBD_OPT_STRUCTURED_REPLY);
        structured = rep.type === P.NBD_REP_ACK;
        if (!structured && !P.isRepError(rep.type)) throw new NbdConnectionError(`Unexpected reply type ${rep.type} to structured reply`);
      }
      if (fixed) {
        const name = Buffer.from(exportName, 'utf8');
        const data = Buffer.allocUnsafe(4 + name.length + 4);
        data.writeUInt32BE(name.length, 0);
        name.copy(data, 4);
        data.writeUInt16BE(1, 4 + name.length);
        data.writeUInt16BE(P.NBD_INFO_BLOCK_SIZE, 6 + name.length);
        socket.write(P.encodeOption(P.NBD_OPT_GO, data));
        const info: { size?: number; flags?: number; minBlock?: number; preferredBlock?: number; maxBlock?: number; description?: string } = {};
        for (;;) {
          const rep = await optionReply(reader, P.NBD_OPT_GO);
          if (rep.type === P.NBD_REP_ACK) break;
          if (rep.type === P.NBD_REP_INFO) {
            if (rep.data.length < 2) throw new NbdConnectionError('NBD_REP_INFO without a type');
            const t = rep.data.readUInt16BE(0);
            if (t === P.NBD_INFO_EXPORT && rep.data.length === 12) {
              info.size = Number(rep.data.readBigUInt64BE(2));
              info.flags = rep.data.readUInt16BE(10);
            } else if (t === P.NBD_INFO_BLOCK_SIZE && rep.data.length === 14) {
              info.minBlock = rep.data.readUInt32BE(2);
              info.preferredBlock = rep.data.readUInt32BE(6);
              info.maxBlock = rep.data.readUInt32BE(10);
            } else if (t === P.NBD_INFO_DESCRIPTION) {
              info.description = rep.data.subarray(2).toString('utf8');
            }
            continue;
          }
          if (rep.type === P.NBD_REP_ERR_UNSUP) return await NbdClient.exportNameFallback(socket, reader, addr, exportName, noZeroes, structured, timer);
          if (rep.type === P.NBD_REP_ERR_UNKNOWN) throw optionError(rep.type, rep.data, 'Requested export not available');
          if (P.isRepError(rep.type)) throw optionError(rep.type, rep.data, `Server rejected export '${exportName}'`);
          throw new NbdConnectionError(`Unexpected reply type ${rep.type} to NBD_OPT_GO`);
        }
        if (info.size === undefined || info.flags === undefined) throw new NbdConnectionError('server did not send NBD_INFO_EXPORT');
        clearTimeout(timer);
        return new NbdClient(socket, reader, addr, exportName, { ...info, size: info.size, flags: info.flags, structured });
      }
      return await NbdClient.exportNameFallback(socket, reader, addr, exportName, noZeroes, false, timer);
    } catch (e) {
      clearTimeout(timer);
      socket.destroy();
      if (e instanceof NbdError || e instanceof NbdConnectionError) throw e;
      throw new NbdConnectionError(`Failed to negotiate with '${describeAddress(addr)}': ${(e as Error).message}`);
    }
  }

  private static async exportNameFallback(
    socket: net.Socket,
    reader: SocketReader,
    addr: NbdAddress,
    exportName: string,
    noZeroes: boolean,
    structured: boolean,
    timer: NodeJS.Timeout,
  ): Promise<NbdClient> {
    socket.write(P.encodeOption(P.NBD_OPT_EXPORT_NAME, Buffer.from(exportName, 'utf8')));
    const r = await reader.read(10 + (noZeroes ? 0 : P.EXPORT_NAME_PADDING));
    clearTimeout(timer);
    return new NbdClient(socket, reader, addr, exportName, { size: Number(r.readBigUInt64BE(0)), flags: r.readUInt16BE(8), structured });
  }

  /** The server's exports (NBD_OPT_LIST), then NBD_OPT_ABORT. */
  static async list(addr: NbdAddress, timeoutMs = 30000): Promise<ExportEntry[]> {
    const socket = await openSocket(addr, timeoutMs);
    const reader = new SocketReader(socket);
    try {
      const { fixed } = await hello(socket, reader);
      if (!fixed) throw new NbdConnectionError('Server does not support listing exports');
      socket.write(P.encodeOption(P.NBD_OPT_LIST));
      const out: ExportEntry[] = [];
      for (;;) {
        const rep = await optionReply(reader, P.NBD_OPT_LIST);
        if (rep.type === P.NBD_REP_ACK) break;
        if (P.isRepError(rep.type)) throw optionError(rep.type, rep.data, 'Server rejected the export list');
        if (rep.type !== P.NBD_REP_SERVER || rep.data.length < 4) throw new NbdConnectionError('Bad NBD_REP_SERVER');
        const n = rep.data.readUInt32BE(0);
        if (n > rep.data.length - 4) throw new NbdConnectionError('Bad NBD_REP_SERVER name length');
        out.push({ name: rep.data.subarray(4, 4 + n).toString('utf8'), description: rep.data.subarray(4 + n).toString('utf8') });
      }
      socket.write(P.encodeOption(P.NBD_OPT_ABORT));
      await optionReply(reader, P.NBD_OPT_ABORT).catch(() => undefined);
      return out;
    } finally {
      socket.destroy();
    }
  }

  get readOnly(): boolean {
    return (this.flags & P.NBD_FLAG_READ_ONLY) !== 0;
  }

  /** The connection failed or was closed: requests reject. */
  get error(): NbdConnectionError | null {
    return this.failure;
  }

  describe(): string {
    return `${describeAddress(this.address)} export '${this.exportName}'`;
  }

  // ---- requests

  async read(offset: number, buf: Uint8Array): Promise<void> {
    for (let done = 0; done < buf.length || (buf.length === 0 && done === 0); ) {
      const n = Math.min(this.maxBlock, buf.length - done);
      await this.request(P.NBD_CMD_READ, 0, offset + done, n, buf.subarray(done, done + n));
      done += n;
      if (n === 0) break;
    }
  }

  async write(offset: number, data: Uint8Array, fua = false): Promise<void> {
    if (data.length === 0) return this.request(P.NBD_CMD_WRITE, 0, offset, 0, undefined, data);
    for (let done = 0; done < data.length; ) {
      const n = Math.min(this.maxBlock, data.length - done);
      await this.request(P.NBD_CMD_WRITE, fua ? P.NBD_CMD_FLAG_FUA : 0, offset + done, n, undefined, data.subarray(done, done + n));
      done += n;
    }
  }

  async writeZeroes(offset: number, length: number, fua = false): Promise<void> {
    if ((this.flags & P.NBD_FLAG_SEND_WRITE_ZEROES) === 0) {
      // no WRITE_ZEROES: write zero buffers, as QEMU's block layer falls back
      const z = new Uint8Array(Math.min(length, 1 << 20));
      for (let done = 0; done < length; done += z.length) await this.write(offset + done, z.subarray(0, Math.min(z.length, length - done)), fua);
      return;
    }
    for (let done = 0; done < length || length === 0; ) {
      const n = Math.min(0xfffff000, length - done);
      await this.request(P.NBD_CMD_WRITE_ZEROES, fua ? P.NBD_CMD_FLAG_FUA : 0, offset + done, n);
      done += n;
      if (n === 0) break;
    }
  }

  async trim(offset: number, length: number): Promise<void> {
    if ((this.flags & P.NBD_FLAG_SEND_TRIM) === 0) return;
    for (let done = 0; done < length; ) {
      const n = Math.min(0xfffff000, length - done);
      await this.request(P.NBD_CMD_TRIM, 0, offset + done, n);
      done += n;
    }
  }

  async flush(): Promise<void> {
    if ((this.flags & P.NBD_FLAG_SEND_FLUSH) === 0) return;
    await this.request(P.NBD_CMD_FLUSH, 0, 0, 0);
  }

  /** Send NBD_CMD_DISC after the requests in flight and close. Idempotent. */
  async close(): Promise<void> {
    if (this.closing) return this.pump;
    this.closing = true;
    await Promise.allSettled([...this.inFlight]);
    if (this.failure === null && !this.socket.destroyed) {
      this.socket.write(P.encodeRequest({ flags: 0, type: P.NBD_CMD_DISC, handle: this.nextHandle++, offset: 0n, length: 0 }));
      this.socket.end();
    }
    this.fail(new NbdConnectionError('NBD connection closed'));
    this.socket.destroy();
    await this.pump;
  }

  /** Drop the connection now (requests in flight reject). */
  destroy(): void {
    this.closing = true;
    this.fail(new NbdConnectionError('NBD connection closed'));
    this.socket.destroy();
  }

  private request(type: number, flags: number, offset: number, length: number, buf?: Uint8Array, payload?: Uint8Array): Promise<void> {
    if (this.failure !== null) return Promise.reject(this.failure);
    if (this.closing) return Promise.reject(new NbdConnectionError('NBD connection closed'));
    const handle = this.nextHandle++;
    const p = new Promise<void>((resolve, reject) => {
      this.pending.set(handle, { type, offset, ...(buf !== undefined ? { buf } : {}), resolve, reject });
      this.socket.write(P.encodeRequest({ flags, type, handle, offset: BigInt(offset), length }));
      if (payload !== undefined && payload.length > 0) this.socket.write(payload);
    });
    this.inFlight.add(p);
    const forget = () => void this.inFlight.delete(p);
    p.then(forget, forget);
    return p;
  }

  private fail(e: NbdConnectionError): void {
    if (this.failure === null) this.failure = e;
    for (const p of this.pending.values()) p.reject(this.failure);
    this.pending.clear();
  }

  /** Reads replies until the connection ends. */
  private async replies(): Promise<void> {
    try {
      for (;;) {
        const magic = (await this.reader.read(4)).readUInt32BE(0);
        if (magic === P.NBD_SIMPLE_REPLY_MAGIC) await this.simpleReply();
        else if (magic === P.NBD_STRUCTURED_REPLY_MAGIC && this.structured) await this.chunk();
        else throw new NbdConnectionError(`invalid magic (got 0x${magic.toString(16)})`);
      }
    } catch (e) {
      const err =
        e instanceof NbdConnectionError
          ? e
          : new NbdConnectionError(this.closing ? 'NBD connection closed' : `NBD connection to ${describeAddress(this.address)} lost: ${(e as Error).message}`);
      const first = this.failure === null;
      this.fail(err);
      this.socket.destroy();
      if (first && !this.closing) this.emit('lost', err);
    }
  }

  private take(handle: bigint): Pending {
    const p = this.pending.get(handle);
    if (p === undefined) throw new NbdConnectionError(`Unexpected reply handle ${handle}`);
    return p;
  }

  private async simpleReply(): Promise<void> {
    const h = await this.reader.read(12);
    const error = h.readUInt32BE(0);
    const handle = h.readBigUInt64BE(4);
    const p = this.take(handle);
    if (error === 0 && p.type === P.NBD_CMD_READ && p.buf !== undefined && p.buf.length > 0) {
      const data = await this.reader.read(p.buf.length);
      p.buf.set(data);
    }
    this.pending.delete(handle);
    if (error !== 0) p.reject(NbdError.fromReply(error, undefined));
    else p.resolve();
  }

  private async chunk(): Promise<void> {
    const h = await this.reader.read(P.CHUNK_HEADER_SIZE - 4);
    const flags = h.readUInt16BE(0);
    const type = h.readUInt16BE(2);
    const handle = h.readBigUInt64BE(4);
    const length = h.readUInt32BE(12);
    const p = this.take(handle);
    const payload = await this.reader.read(length);
    const inRange = (off: bigint, n: number): number => {
      const start = Number(off) - p.offset;
      if (p.buf === undefined || start < 0 || start + n > p.buf.length) throw new NbdConnectionError('Structured reply chunk outside the request');
      return start;
    };
    switch (type) {
      case P.NBD_REPLY_TYPE_NONE:
        break;
      case P.NBD_REPLY_TYPE_OFFSET_DATA: {
        if (length < 9) throw new NbdConnectionError('Bad NBD_REPLY_TYPE_OFFSET_DATA chunk');
        const data = payload.subarray(8);
        p.buf!.set(data, inRange(payload.readBigUInt64BE(0), data.length));
        break;
      }
      case P.NBD_REPLY_TYPE_OFFSET_HOLE: {
        if (length !== 12) throw new NbdConnectionError('Bad NBD_REPLY_TYPE_OFFSET_HOLE chunk');
        const n = payload.readUInt32BE(8);
        const start = inRange(payload.readBigUInt64BE(0), n);
        p.buf!.fill(0, start, start + n);
        break;
      }
      case P.NBD_REPLY_TYPE_BLOCK_STATUS:
        break;
      default:
        if (!P.isReplyError(type)) throw new NbdConnectionError(`Unexpected structured reply type ${type}`);
        if (length < 6) throw new NbdConnectionError('Bad error chunk');
        {
          const msgLen = payload.readUInt16BE(4);
          if (msgLen > length - 6) throw new NbdConnectionError('Bad error chunk message length');
          p.error ??= NbdError.fromReply(payload.readUInt32BE(0), payload.subarray(6, 6 + msgLen).toString('utf8'));
        }
    }
    if ((flags & P.NBD_REPLY_FLAG_DONE) !== 0) {
      this.pending.delete(handle);
      if (p.error !== undefined) p.reject(p.error);
      else p.resolve();
    }
  }
}
