/**
 * StreamReader: the incoming migration stream over a node Readable.
 *
 * Received chunks are kept in a list; get8/16/32/64/getBytes read them
 * synchronously and throw "Unexpected end of migration stream" when the
 * bytes are not there. Callers check has(n) and `await ensure(n)` only when
 * data is missing. Any length taken from the wire goes through
 * checkLength() before it is trusted; ensure() refuses more than maxEnsure.
 */
import { Socket } from 'node:net';
import type { Readable } from 'node:stream';
import { copyBytes } from '../../base/native.js';
import { join64 } from '../../base/u64.js';
import { ERR, MigrationStreamError } from '../wire/errors.js';
import { pooledSocketReads } from './pooled-reads.js';

export interface StreamReaderOptions {
  /** Largest n ensure() accepts (default 64 MiB). */
  maxEnsure?: number;
  /** Pause the source when this much is buffered (default 8 MiB). */
  highWater?: number;
  /**
   * Read a plain socket into reusable buffers (pooled-reads.ts) instead of
   * a new buffer per read (default true). Views from getBytes() then stay
   * valid only until the caller next awaits.
   */
  pooledReads?: boolean;
}

const EMPTY = Buffer.alloc(0);

interface Waiter {
  n: number;
  resolve: () => void;
  reject: (e: Error) => void;
}

function toError(e: unknown): Error {
  return e instanceof Error ? e : new Error(String(e));
}

export class StreamReader {
  private chunks: Buffer[] = [];
  /** Per chunk: how to give its buffer back once it has been read (pooled reads), or undefined. */
  private releases: Array<(() => void) | undefined> = [];
  private head = 0;
  /** current chunk (chunks[head]) and read offset in it */
  private cur: Buffer = EMPTY;
  private off = 0;
  private avail = 0;
  private ended = false;
  private err: Error | null = null;
  private waiter: Waiter | null = null;
  private paused = false;
  private readonly maxEnsure: number;
  private highWater: number;
  /** Bytes consumed so far. */
  bytesRead = 0;
  /** Whether the source's reads go into reusable buffers. */
  readonly pooled: boolean = false;

  constructor(
    private readonly src: Readable | null,
    opts: StreamReaderOptions = {},
  ) {
    this.maxEnsure = opts.maxEnsure ?? 64 * 1024 * 1024;
    this.highWater = opts.highWater ?? 8 * 1024 * 1024;
    if (!src) {
      this.ended = true;
      return;
    }
    /** Whether reads go into pooled buffers (pooled-reads.ts). */
    this.pooled = (opts.pooledReads ?? true) && src instanceof Socket && pooledSocketReads(src, (c, release) => this.push(c, release));
    src.on('data', (c: Buffer | string) => this.push(typeof c === 'string' ? Buffer.from(c) : c));
    src.on('end', () => this.finish());
    src.on('close', () => this.finish());
    src.on('error', (e) => this.fail(new MigrationStreamError(ERR.readFailed(toError(e).message), { cause: e })));
  }

  /** A reader over bytes already in memory (no source: the end is the end). */
  static fromBuffer(buf: Uint8Array): StreamReader {
    const r = new StreamReader(null);
    if (buf.length > 0) r.push(Buffer.isBuffer(buf) ? buf : Buffer.from(buf.buffer, buf.byteOffset, buf.byteLength));
    return r;
  }

  /**
   * Append bytes (also used by fromBuffer and by tests). `release`, when
   * given, is called once every byte of `c` has been read: the buffer
   * behind it may then be reused.
   */
  push(c: Buffer, release?: () => void): void {
    if (c.length === 0) {
      release?.();
      return;
    }
    if (this.avail === 0) {
      this.dropAll();
      this.cur = c;
      this.off = 0;
    }
    this.chunks.push(c);
    this.releases.push(release);
    this.avail += c.length;
    const w = this.waiter;
    if (w && this.avail >= w.n) {
      this.waiter = null;
      w.resolve();
    }
    if (!this.waiter && this.avail > this.highWater && this.src && !this.paused) {
      this.paused = true;
      this.src.pause();
    }
  }

  private finish(): void {
    if (this.ended) return;
    this.ended = true;
    const w = this.waiter;
    if (w) {
      this.waiter = null;
      w.reject(this.err ?? new MigrationStreamError(ERR.truncated()));
    }
  }

  private fail(e: Error): void {
    if (!this.err) this.err = e;
    const w = this.waiter;
    if (w) {
      this.waiter = null;
      w.reject(this.err);
    }
  }

  /** Bytes buffered and unread. */
  get available(): number {
    return this.avail;
  }

  /** True when the source has ended and everything was read. */
  get atEnd(): boolean {
    return this.ended && this.avail === 0;
  }

  get error(): Error | null {
    return this.err;
  }

  has(n: number): boolean {
    return this.avail >= n;
  }

  /** Wait until n bytes are buffered. */
  ensure(n: number): Promise<void> {
    if (this.avail >= n) return Promise.resolve();
    if (this.err) return Promise.reject(this.err);
    if (n > this.maxEnsure) return Promise.reject(new MigrationStreamError(ERR.lengthTooLarge('a read', n, this.maxEnsure)));
    if (this.ended) return Promise.reject(new MigrationStreamError(ERR.truncated()));
    if (this.waiter) return Promise.reject(new Error('StreamReader: concurrent ensure()'));
    return new Promise<void>((resolve, reject) => {
      this.waiter = { n, resolve, reject };
      if (this.paused && this.src) {
        this.paused = false;
        this.src.resume();
      }
    });
  }

  /** Throw unless len <= max (use for every length read from the wire). */
  static checkLength(len: number, max: number, what: string): number {
    if (!(len <= max)) throw new MigrationStreamError(ERR.lengthTooLarge(what, len, max));
    return len;
  }

  /**
   * Buffer at most about this much before pausing the source. Postcopy lowers
   * it, so that a requested page does not queue behind megabytes of
   * background pages read ahead.
   */
  setHighWater(n: number): void {
    this.highWater = n;
  }

  /** Stop reading from the source (pauses it; does not destroy it). */
  detach(): void {
    if (this.src && !this.paused) {
      this.paused = true;
      this.src.pause();
    }
  }

  // ---- consumption --------------------------------------------------------

  private short(): never {
    throw this.err ?? new MigrationStreamError(ERR.truncated());
  }

  /** Forget every chunk (all read), giving back the pooled ones. */
  private dropAll(): void {
    for (let i = this.head; i < this.releases.length; i++) this.releases[i]?.();
    this.chunks.length = 0;
    this.releases.length = 0;
    this.head = 0;
  }

  /** Move to the next chunk once the current one is used up. */
  private next(): void {
    this.chunks[this.head] = EMPTY;
    const release = this.releases[this.head];
    if (release !== undefined) {
      this.releases[this.head] = undefined;
      release();
    }
    this.head++;
    if (this.head < this.chunks.length) {
      this.cur = this.chunks[this.head]!;
    } else {
      this.dropAll();
      this.cur = EMPTY;
    }
    this.off = 0;
    if (this.head > 1024) {
      this.chunks = this.chunks.slice(this.head);
      this.releases = this.releases.slice(this.head);
      this.head = 0;
    }
    if (this.paused && this.src && this.avail < this.highWater >> 1) {
      this.paused = false;
      this.src.resume();
    }
  }

  private advance(n: number): void {
    this.off += n;
    this.avail -= n;
    this.bytesRead += n;
    if (this.off === this.cur.length && this.avail > 0) this.next();
    else if (this.avail === 0) {
      this.dropAll();
      this.cur = EMPTY;
      this.off = 0;
      if (this.paused && this.src) {
        this.paused = false;
        this.src.resume();
      }
    }
  }

  peek8(): number {
    if (this.avail < 1) this.short();
    return this.cur[this.off]!;
  }

  get8(): number {
    if (this.avail < 1) this.short();
    const v = this.cur[this.off]!;
    this.advance(1);
    return v;
  }

  get16(): number {
    if (this.avail < 2) this.short();
    if (this.off + 2 <= this.cur.length) {
      const v = this.cur.readUInt16BE(this.off);
      this.advance(2);
      return v;
    }
    return (this.get8() << 8) | this.get8();
  }

  get32(): number {
    if (this.avail < 4) this.short();
    if (this.off + 4 <= this.cur.length) {
      const v = this.cur.readUInt32BE(this.off);
      this.advance(4);
      return v;
    }
    return ((this.get8() << 24) | (this.get8() << 16) | (this.get8() << 8) | this.get8()) >>> 0;
  }

  /** be64 as a number; values >= 2^53 are refused. */
  get64(): number {
    if (this.avail < 8) this.short();
    const hi = this.get32();
    const lo = this.get32();
    if (hi >= 0x200000) throw new MigrationStreamError(ERR.lengthTooLarge('a 64-bit value', join64(hi, lo), Number.MAX_SAFE_INTEGER));
    return join64(hi, lo);
  }

  /** Copy n bytes into dst at dstOffset. */
  copyTo(dst: Uint8Array, dstOffset: number, n: number): void {
    if (this.avail < n) this.short();
    while (n > 0) {
      const take = Math.min(n, this.cur.length - this.off);
      copyBytes(dst, dstOffset, this.cur, this.off, take);
      dstOffset += take;
      n -= take;
      this.advance(take);
    }
  }

  /**
   * The received chunk that the next byte is read from, and that byte's
   * offset in it: for decoders that take a run of records straight out of
   * the chunk and then consumeInChunk() what they took. Empty when nothing
   * is buffered.
   */
  get chunk(): Buffer {
    return this.cur;
  }

  get chunkOffset(): number {
    return this.off;
  }

  /** Consume n bytes of the current chunk (n <= chunk.length - chunkOffset). */
  consumeInChunk(n: number): void {
    if (n > this.cur.length - this.off) throw new RangeError(`consumeInChunk(${n}) past the chunk`);
    if (n > 0) this.advance(n);
  }

  /**
   * n bytes: a zero-copy view when they lie in one received chunk, else a
   * fresh copy. With pooled reads the view is valid until the caller next
   * awaits (the buffer is refilled by a later read); copy what is kept.
   */
  getBytes(n: number): Buffer {
    if (this.avail < n) this.short();
    if (this.off + n <= this.cur.length) {
      const v = this.cur.subarray(this.off, this.off + n);
      this.advance(n);
      return v;
    }
    const b = Buffer.allocUnsafe(n);
    this.copyTo(b, 0, n);
    return b;
  }

  /** n bytes without consuming them: a view when they lie in one chunk, else a copy. */
  peekBytes(n: number): Buffer {
    if (this.avail < n) this.short();
    if (this.off + n <= this.cur.length) return this.cur.subarray(this.off, this.off + n);
    const b = Buffer.allocUnsafe(n);
    let at = 0;
    for (let i = this.head, off = this.off; at < n; i++, off = 0) {
      const c = this.chunks[i]!;
      const take = Math.min(n - at, c.length - off);
      c.copy(b, at, off, off + take);
      at += take;
    }
    return b;
  }

  skip(n: number): void {
    if (this.avail < n) this.short();
    while (n > 0) {
      const take = Math.min(n, this.cur.length - this.off);
      n -= take;
      this.advance(take);
    }
  }

  /** Counted string (u8 length + bytes), decoded as UTF-8 (latin1-safe for ASCII names). */
  getCountedString(): string {
    if (this.avail < 1) this.short();
    const len = this.cur[this.off]!;
    if (this.avail < 1 + len) this.short();
    this.advance(1);
    if (this.off + len <= this.cur.length) {
      const s = this.cur.toString('utf8', this.off, this.off + len);
      this.advance(len);
      return s;
    }
    return this.getBytes(len).toString('utf8');
  }

  /** Wait for and read a counted string. */
  async readCountedString(): Promise<string> {
    if (!this.has(1)) await this.ensure(1);
    const len = this.peek8();
    if (!this.has(1 + len)) await this.ensure(1 + len);
    return this.getCountedString();
  }
}
