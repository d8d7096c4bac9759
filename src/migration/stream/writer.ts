/**
 * StreamWriter: staging buffers for the outgoing migration stream.
 *
 * Records are put into a big reusable staging buffer (no allocation per put);
 * flush() hands the staged bytes to a node Writable and swaps to the second
 * buffer (double buffering: one buffer is being written while the next one
 * fills). The first error is sticky: every later put is a no-op and flush()
 * rejects with it. A rate limiter with 100 ms windows mirrors QEMU's
 * qemu_file_rate_limit (budget = max-bandwidth / 10 per window).
 */
import { hi32, lo32 } from '../../base/u64.js';
import { fstatSync, WriteStream } from 'node:fs';
import { Socket } from 'node:net';
import { TLSSocket } from 'node:tls';
import type { Writable } from 'node:stream';
import { ERR, MigrationStreamError } from '../wire/errors.js';

/** Anything records can be encoded into. */
export interface ByteSink {
  put8(v: number): void;
  put16(v: number): void;
  put32(v: number): void;
  /** v must be a non-negative integer below 2^53 */
  put64(v: number): void;
  put64Parts(hi: number, lo: number): void;
  putBytes(src: Uint8Array, offset?: number, length?: number): void;
  putCountedString(s: string): void;
}

export interface StreamWriterOptions {
  /** Size of each staging buffer (default 2 MiB, minimum 64 KiB). */
  bufferSize?: number;
  /** Bytes per second, 0 = unlimited (default). */
  maxBandwidth?: number;
  /**
   * Reuse a staging buffer once its write callback has fired. Safe for
   * sockets, pipes and files (the data left the process by then), not for
   * in-memory streams that keep the chunk (PassThrough). Default: true for
   * net.Socket and fs.WriteStream, false otherwise.
   */
  reuseBuffers?: boolean;
  /** Clock in milliseconds (default performance.now). */
  now?: () => number;
  /**
   * Let senders write straight to the socket's descriptor (directFd) when
   * nothing is queued before them. Default true; only plain sockets
   * (net.Socket over TCP or a unix socket, not TLS) with buffer reuse qualify.
   */
  direct?: boolean;
}

/** Rate-limit window, as in QEMU (BUFFER_DELAY 100 ms). */
export const RATE_WINDOW_MS = 100;
/** Headroom kept free when wantsFlush() starts saying yes. */
const FLUSH_HEADROOM = 64 * 1024;

function toError(e: unknown): Error {
  return e instanceof Error ? e : new Error(String(e));
}

export class StreamWriter implements ByteSink {
  /** Current staging buffer. Valid offsets come from reserve(). */
  buf: Buffer;
  private dv: DataView;
  /** Staged bytes are buf[base, pos) (base > 0 only without buffer reuse). */
  private pos = 0;
  private base = 0;
  private readonly cap: number;
  private readonly flushAt: number;
  private readonly free: Buffer[] = [];
  /** Full chunks spilled by a put that did not fit, waiting for flush(). */
  private queued: Buffer[] = [];
  private inflight: Promise<void> | null = null;
  /** A writeChunks() is under way (inflight has not settled). */
  private writing = false;
  /** Plain socket that may take direct writes. */
  private readonly directOk: boolean;
  /** Its descriptor once known to be a socket; -2 once known not to be one; -1 not looked at yet. */
  private directFdCache = -1;
  /** A direct write found the socket full: staged bytes go through out.write() first. */
  private directBlocked = false;
  private err: Error | null = null;
  private readonly now: () => number;
  private readonly reuse: boolean;

  /** Every byte put so far (staged or written). */
  bytesWritten = 0;
  /** Bytes whose write callback completed (or that a direct write sent). */
  bytesFlushed = 0;
  /** Bytes sent by direct writes (afterDirect), a part of bytesFlushed. */
  bytesDirect = 0;

  private maxBw = 0;
  private budget = 0;
  private windowStart: number;
  private windowStartBytes = 0;

  constructor(
    private readonly out: Writable | null,
    opts: StreamWriterOptions = {},
  ) {
    this.cap = Math.max(opts.bufferSize ?? 2 * 1024 * 1024, 64 * 1024);
    this.flushAt = this.cap - Math.min(FLUSH_HEADROOM, this.cap >> 2);
    this.buf = Buffer.allocUnsafeSlow(this.cap);
    this.dv = new DataView(this.buf.buffer, this.buf.byteOffset, this.buf.byteLength);
    this.now = opts.now ?? (() => performance.now());
    this.reuse = opts.reuseBuffers ?? (out === null || out instanceof Socket || out instanceof WriteStream);
    if (this.reuse) this.free.push(Buffer.allocUnsafeSlow(this.cap));
    this.directOk = (opts.direct ?? true) && this.reuse && out instanceof Socket && !(out instanceof TLSSocket);
    this.windowStart = this.now();
    this.setMaxBandwidth(opts.maxBandwidth ?? 0);
    if (out) {
      out.on('error', (e) => this.setError(new MigrationStreamError(ERR.writeFailed(toError(e).message), { cause: e })));
    }
  }

  /** First error, or null. */
  get error(): Error | null {
    return this.err;
  }

  /** Make `e` the sticky error unless there already is one. */
  setError(e: Error): void {
    if (this.err === null) this.err = e;
  }

  /** Bytes staged and not yet handed to the Writable. */
  get pending(): number {
    let n = this.pos - this.base;
    for (const q of this.queued) n += q.length;
    return n;
  }

  /** Offset of the next byte in buf. */
  get offset(): number {
    return this.pos;
  }

  /**
   * True when the staging buffer is nearly full and the caller should flush,
   * or a direct write found the socket full (flush() then waits for room).
   */
  wantsFlush(): boolean {
    return this.pos - this.base >= this.flushAt || this.queued.length > 0 || this.directBlocked;
  }

  // ---- direct writes ------------------------------------------------------

  /**
   * The descriptor of the socket when a sender may write to it directly
   * now: a plain socket, no error, nothing queued or being written before
   * the staged bytes (which the sender must send first), and the socket's
   * own write queue empty. -1 otherwise.
   */
  directFd(): number {
    if (!this.directOk || this.err !== null || this.writing || this.directBlocked || this.queued.length > 0) return -1;
    const s = this.out as Socket;
    if (s.destroyed || s.writableLength > 0) return -1;
    if (this.directFdCache === -1) {
      const fd = (s as unknown as { _handle?: { fd?: number } })._handle?.fd;
      if (typeof fd !== 'number' || fd < 0) return -1;
      let socket = false;
      try {
        // an fd: migration may hand over a pipe or a FIFO, which sendmsg() cannot take
        socket = fstatSync(fd).isSocket();
      } catch {
        return -1;
      }
      this.directFdCache = socket ? fd : -2;
    }
    return this.directFdCache >= 0 ? this.directFdCache : -1;
  }

  /** Start of the staged bytes in buf (what a direct write sends first). */
  get stageStart(): number {
    return this.base;
  }

  /** Size of the staging buffer. */
  get capacity(): number {
    return this.cap;
  }

  /**
   * Account for a direct write: `encoded` new bytes were put, and of the
   * staged bytes plus those, all but `staged` left the process; the
   * `staged` rest now sits at stageStart. After a short write (the socket
   * was full, or failed) everything goes through out.write() until that
   * write completes: it waits for room, or reports the error.
   */
  afterDirect(encoded: number, staged: number, short: boolean): void {
    if (this.err !== null) return;
    const before = this.pos - this.base;
    const sent = before + encoded - staged;
    this.bytesWritten += encoded;
    this.bytesFlushed += sent;
    this.bytesDirect += sent;
    this.pos = this.base + staged;
    if (short) this.directBlocked = true;
  }

  /**
   * Bytes the migration sent on another channel (multifd): they count in
   * bytesWritten and bytesFlushed, so in the rate limit and the throughput,
   * like the bytes of this stream.
   */
  addSentElsewhere(n: number): void {
    this.bytesWritten += n;
    this.bytesFlushed += n;
  }

  // ---- puts -------------------------------------------------------------

  private room(n: number): void {
    if (this.pos + n > this.cap) this.spill(n);
  }

  /**
   * Move the staged bytes to the queue. With buffer reuse, continue in a free
   * buffer; without, continue after them in the same buffer (the queued view
   * is handed off for good) until it runs out, then allocate a new one.
   */
  private spill(need = 0): void {
    if (this.pos > this.base) this.queued.push(this.buf.subarray(this.base, this.pos));
    if (this.reuse) {
      if (this.pos === 0) return;
      this.buf = this.free.pop() ?? Buffer.allocUnsafeSlow(this.cap);
    } else {
      this.base = this.pos;
      if (this.pos + Math.max(need, FLUSH_HEADROOM) <= this.cap) return;
      this.buf = Buffer.allocUnsafeSlow(this.cap);
    }
    this.dv = new DataView(this.buf.buffer, this.buf.byteOffset, this.buf.byteLength);
    this.pos = 0;
    this.base = 0;
  }

  put8(v: number): void {
    if (this.err !== null) return;
    if (this.pos + 1 > this.cap) this.spill(1);
    this.buf[this.pos++] = v;
    this.bytesWritten += 1;
  }

  put16(v: number): void {
    if (this.err !== null) return;
    if (this.pos + 2 > this.cap) this.spill(2);
    this.dv.setUint16(this.pos, v);
    this.pos += 2;
    this.bytesWritten += 2;
  }

  put32(v: number): void {
    if (this.err !== null) return;
    if (this.pos + 4 > this.cap) this.spill(4);
    this.dv.setUint32(this.pos, v >>> 0);
    this.pos += 4;
    this.bytesWritten += 4;
  }

  put64(v: number): void {
    this.put64Parts(hi32(v), lo32(v));
  }

  put64Parts(hi: number, lo: number): void {
    if (this.err !== null) return;
    if (this.pos + 8 > this.cap) this.spill(8);
    const dv = this.dv;
    dv.setUint32(this.pos, hi >>> 0);
    dv.setUint32(this.pos + 4, lo >>> 0);
    this.pos += 8;
    this.bytesWritten += 8;
  }

  putBytes(src: Uint8Array, offset = 0, length = src.length - offset): void {
    if (this.err !== null) return;
    this.bytesWritten += length;
    while (length > 0) {
      let space = this.cap - this.pos;
      if (space === 0) {
        this.spill(1);
        space = this.cap - this.pos;
      }
      const n = length < space ? length : space;
      this.buf.set(n === src.length ? src : src.subarray(offset, offset + n), this.pos);
      this.pos += n;
      offset += n;
      length -= n;
    }
  }

  putCountedString(s: string): void {
    if (this.err !== null) return;
    const len = Buffer.byteLength(s, 'utf8');
    if (len > 255) throw new MigrationStreamError(`Counted string too long (${len} bytes): ${s.slice(0, 40)}`);
    this.room(1 + len);
    this.buf[this.pos] = len;
    if (len > 0) this.buf.write(s, this.pos + 1, len, 'utf8');
    this.pos += 1 + len;
    this.bytesWritten += 1 + len;
  }

  /**
   * Bytes that fit in `this.buf` after `offset` without a spill: an encoder
   * may fill up to that many there and then commit() what it wrote.
   */
  get spaceLeft(): number {
    return this.cap - this.pos;
  }

  /** Take n bytes (n <= spaceLeft) written directly into `this.buf` at `offset` as put. */
  commit(n: number): void {
    if (this.err !== null) return;
    if (n > this.cap - this.pos) throw new RangeError(`commit(${n}) exceeds the staging buffer`);
    this.pos += n;
    this.bytesWritten += n;
  }

  /**
   * Reserve n bytes (n <= buffer size) and return their offset in `this.buf`;
   * the caller fills them before the next put. After an error the offset is
   * still valid scratch space but the bytes are never written.
   */
  reserve(n: number): number {
    if (n > this.cap) throw new RangeError(`reserve(${n}) exceeds the staging buffer`);
    if (this.err !== null) return 0;
    if (this.pos + n > this.cap) this.spill(n);
    const at = this.pos;
    this.pos += n;
    this.bytesWritten += n;
    return at;
  }

  // ---- output -----------------------------------------------------------

  /**
   * Hand the staged bytes to the Writable. Resolves once the previous write
   * has completed and this one is issued (so the caller can fill the other
   * buffer while this one drains). Rejects with the sticky error.
   */
  async flush(): Promise<void> {
    if (this.err) throw this.err;
    if (this.inflight) await this.inflight;
    if (this.err) throw this.err;
    if (this.pos === this.base && this.queued.length === 0) return;
    this.spill();
    const chunks = this.queued;
    this.queued = [];
    if (!this.out) {
      // null sink: bytes vanish
      for (const c of chunks) this.release(c);
      return;
    }
    this.writing = true;
    this.inflight = this.writeChunks(chunks).finally(() => {
      this.writing = false;
      this.directBlocked = false;
    });
  }

  /** flush() and wait until everything is written. */
  async drain(): Promise<void> {
    await this.flush();
    if (this.inflight) await this.inflight;
    this.inflight = null;
    if (this.err) throw this.err;
  }

  private release(chunk: Buffer): void {
    this.bytesFlushed += chunk.length;
    if (this.reuse && this.free.length < 2) {
      // chunk is a view at offset 0 of a staging buffer
      this.free.push(Buffer.from(chunk.buffer, chunk.byteOffset, this.cap));
    }
  }

  /** Never rejects: failures become the sticky error. */
  private async writeChunks(chunks: Buffer[]): Promise<void> {
    const out = this.out!;
    for (const chunk of chunks) {
      if (this.err) return;
      try {
        await new Promise<void>((resolve, reject) => {
          if (out.destroyed || out.writableEnded) {
            reject(new Error(out.writableEnded ? 'write after end' : 'stream destroyed'));
            return;
          }
          out.write(chunk, (e) => (e ? reject(e) : resolve()));
        });
        this.release(chunk);
      } catch (e) {
        this.setError(new MigrationStreamError(ERR.writeFailed(toError(e).message), { cause: e }));
        return;
      }
    }
  }

  // ---- rate limit -------------------------------------------------------

  get maxBandwidth(): number {
    return this.maxBw;
  }

  /** Bytes per second; 0 = unlimited. Takes effect in the current window. */
  setMaxBandwidth(bps: number): void {
    this.maxBw = bps > 0 ? bps : 0;
    this.budget = this.maxBw / (1000 / RATE_WINDOW_MS);
  }

  /** Bytes put in the current window. */
  get windowBytes(): number {
    return this.bytesWritten - this.windowStartBytes;
  }

  private roll(now: number): void {
    if (now - this.windowStart < RATE_WINDOW_MS) return;
    // carry the overshoot of the last window (at most one budget) into the next
    const used = this.bytesWritten - this.windowStartBytes;
    const over = this.budget > 0 ? Math.min(Math.max(used - this.budget, 0), this.budget) : 0;
    this.windowStart = now;
    this.windowStartBytes = this.bytesWritten - over;
  }

  /** True when this window's budget is spent (or after an error). */
  rateLimitExceeded(): boolean {
    if (this.err !== null) return true;
    if (this.budget === 0) return false;
    this.roll(this.now());
    return this.bytesWritten - this.windowStartBytes >= this.budget;
  }

  /** Bytes that may still be put in this window before the limit (Infinity when unlimited). */
  windowRoom(): number {
    if (this.budget === 0) return Infinity;
    this.roll(this.now());
    return Math.max(0, this.budget - (this.bytesWritten - this.windowStartBytes));
  }

  /** Sleep until the current window ends and start a new one. */
  async waitForWindow(): Promise<void> {
    const left = this.windowStart + RATE_WINDOW_MS - this.now();
    if (left > 0) await new Promise<void>((r) => setTimeout(r, Math.ceil(left)));
    this.roll(Math.max(this.now(), this.windowStart + RATE_WINDOW_MS));
  }
}

/**
 * A growable in-memory ByteSink (for PACKAGED blobs, COLO buffers, tests).
 * Not for the hot path.
 */
export class BufferSink implements ByteSink {
  private buf = Buffer.alloc(4096);
  private pos = 0;

  private room(n: number): void {
    if (this.pos + n <= this.buf.length) return;
    let size = this.buf.length * 2;
    while (size < this.pos + n) size *= 2;
    const b = Buffer.alloc(size);
    this.buf.copy(b, 0, 0, this.pos);
    this.buf = b;
  }
  get length(): number {
    return this.pos;
  }
  put8(v: number): void {
    this.room(1);
    this.buf[this.pos++] = v;
  }
  put16(v: number): void {
    this.room(2);
    this.buf.writeUInt16BE(v, this.pos);
    this.pos += 2;
  }
  put32(v: number): void {
    this.room(4);
    this.buf.writeUInt32BE(v >>> 0, this.pos);
    this.pos += 4;
  }
  put64(v: number): void {
    this.put64Parts(hi32(v), lo32(v));
  }
  put64Parts(hi: number, lo: number): void {
    this.room(8);
    this.buf.writeUInt32BE(hi >>> 0, this.pos);
    this.buf.writeUInt32BE(lo >>> 0, this.pos + 4);
    this.pos += 8;
  }
  putBytes(src: Uint8Array, offset = 0, length = src.length - offset): void {
    this.room(length);
    this.buf.set(src.subarray(offset, offset + length), this.pos);
    this.pos += length;
  }
  putCountedString(s: string): void {
    const b = Buffer.from(s, 'utf8');
    if (b.length > 255) throw new MigrationStreamError(`Counted string too long (${b.length} bytes): ${s.slice(0, 40)}`);
    this.put8(b.length);
    this.putBytes(b);
  }
  /** A copy of the bytes put so far. */
  toBuffer(): Buffer {
    return Buffer.from(this.buf.subarray(0, this.pos));
  }
}
