/**
 * One-page zlib codecs for the `compress` capability (docs/spec/xbzrle.md §6).
 *
 * Format, as QEMU's compress2()/uncompress(): a standard zlib stream
 * (RFC 1950: 2-byte header, raw deflate, Adler-32 trailer) of exactly one
 * page, window 15 bits, memLevel 8, default strategy, one Z_FINISH call, no
 * dictionary carried between pages. At level 1 the header is `78 01`.
 *
 * Speed: zlib.deflateSync/inflateSync set up (and tear down) a fresh z_stream
 * per call, a real cost next to a 4 KiB page (bench/compress.ts, one worker,
 * text pages, level 1: deflate 98 vs 82 MB/s, inflate 348 vs 237 MB/s; on
 * very compressible pages setup dominates: ~24 vs ~110 µs a page). The fast
 * path keeps one z_stream per level and drives Node's zlib binding directly
 * (`_handle.reset()` + `_handle.writeSync(Z_FINISH, …)`, the calls zlib.js
 * itself makes for the *Sync functions), with our own `onerror` so that an
 * invalid stream reports instead of destroying the handle. Those are Node
 * internals: the fast path is feature-tested and self-checked against the
 * public API on first use, and the public API is the fallback.
 */
import zlib from 'node:zlib';

export const PAGE_SIZE = 4096;
/** compressBound(4096) = 4096 + 1 + 13: the largest valid COMPRESS_PAGE length. */
export const COMPRESS_BOUND = 4110;

const Z_FINISH = zlib.constants.Z_FINISH;

interface RawHandle {
  reset(): void;
  writeSync(flush: number, input: Uint8Array, inOff: number, inLen: number, out: Uint8Array, outOff: number, outLen: number): void;
  onerror: (message: string, errno: number) => void;
}

interface FastStream {
  handle: RawHandle;
  /** [availOutAfter, availInAfter] after each writeSync */
  state: Uint32Array;
  error: string | null;
}

function openFast(s: zlib.Deflate | zlib.Inflate): FastStream | null {
  const any = s as unknown as { _handle?: RawHandle; _writeState?: Uint32Array };
  const handle = any._handle;
  const state = any._writeState;
  if (!handle || !(state instanceof Uint32Array) || typeof handle.writeSync !== 'function' || typeof handle.reset !== 'function') {
    return null;
  }
  const f: FastStream = { handle, state, error: null };
  handle.onerror = (message: string) => {
    f.error = message;
  };
  return f;
}

let fastDisabled = process.env.FERRY_ZLIB_FAST === '0';

/** Deflates whole pages at one level. */
export class PageDeflater {
  private fast: FastStream | null = null;
  private readonly tmp = Buffer.alloc(COMPRESS_BOUND);

  constructor(readonly level: number) {
    if (!fastDisabled) {
      try {
        this.fast = openFast(zlib.createDeflate({ level, windowBits: 15, memLevel: 8 }));
        if (this.fast && !this.selfCheck()) this.fast = null;
      } catch {
        this.fast = null;
      }
      if (this.fast === null) fastDisabled = true;
    }
  }

  private selfCheck(): boolean {
    const page = Buffer.alloc(PAGE_SIZE);
    for (let i = 0; i < PAGE_SIZE; i++) page[i] = (i * 31 + (i >> 7)) & 0x7f;
    const n = this.deflate(page, 0, this.tmp, 0);
    const ref = zlib.deflateSync(page, { level: this.level });
    return n === ref.length && ref.equals(this.tmp.subarray(0, n));
  }

  /**
   * Deflate the page src[srcOff, srcOff+4096) into dst at dstOff (room for
   * COMPRESS_BOUND bytes). Returns the compressed length.
   */
  deflate(src: Uint8Array, srcOff: number, dst: Uint8Array, dstOff: number): number {
    const f = this.fast;
    if (f !== null) {
      f.error = null;
      f.handle.reset();
      f.handle.writeSync(Z_FINISH, src, srcOff, PAGE_SIZE, dst, dstOff, COMPRESS_BOUND);
      if (f.error !== null || f.state[1] !== 0) throw new Error(`deflate failed: ${f.error ?? 'input left over'}`);
      return COMPRESS_BOUND - f.state[0]!;
    }
    const out = zlib.deflateSync(src.subarray(srcOff, srcOff + PAGE_SIZE), { level: this.level });
    if (out.length > COMPRESS_BOUND) throw new Error(`deflate produced ${out.length} bytes`);
    dst.set(out, dstOff);
    return out.length;
  }
}

/** Inflates one-page zlib streams, strictly. */
export class PageInflater {
  private fast: FastStream | null = null;

  constructor() {
    if (!fastDisabled) {
      try {
        this.fast = openFast(zlib.createInflate());
        if (this.fast && !this.selfCheck()) this.fast = null;
      } catch {
        this.fast = null;
      }
      if (this.fast === null) fastDisabled = true;
    }
  }

  private selfCheck(): boolean {
    const page = Buffer.alloc(PAGE_SIZE);
    for (let i = 0; i < PAGE_SIZE; i++) page[i] = (i * 7 + (i >> 5)) & 0xff;
    const z = zlib.deflateSync(page, { level: 1 });
    const out = Buffer.alloc(PAGE_SIZE + 1);
    if (!this.inflate(z, 0, z.length, out, 0) || !out.subarray(0, PAGE_SIZE).equals(page)) return false;
    // a corrupt stream must be reported, and the stream must stay usable
    const bad = Buffer.from(z);
    bad[bad.length - 1]! ^= 0xff;
    if (this.inflate(bad, 0, bad.length, out, 0)) return false;
    return this.inflate(z, 0, z.length, out, 0) && out.subarray(0, PAGE_SIZE).equals(page);
  }

  /**
   * Inflate src[srcOff, srcOff+len) into dst[dstOff, dstOff+4096). dst must
   * have one spare byte after the page (dstOff + 4097 <= dst.length) so that
   * an over-long stream is caught. Valid only if the stream is one complete
   * zlib stream (checksum included) of exactly one page with nothing after
   * it. Returns false otherwise (the page bytes are then undefined).
   */
  inflate(src: Uint8Array, srcOff: number, len: number, dst: Uint8Array, dstOff: number): boolean {
    if (len <= 0 || len > COMPRESS_BOUND) return false;
    const f = this.fast;
    if (f !== null) {
      f.error = null;
      f.handle.reset();
      f.handle.writeSync(Z_FINISH, src, srcOff, len, dst, dstOff, PAGE_SIZE + 1);
      if (f.error !== null) return false;
      return PAGE_SIZE + 1 - f.state[0]! === PAGE_SIZE && f.state[1] === 0;
    }
    try {
      const z = src.subarray(srcOff, srcOff + len);
      const out = zlib.inflateSync(z, { maxOutputLength: PAGE_SIZE });
      // (inflateSync ignores bytes after the end of the stream; only the
      // fast path can tell. QEMU ignores them too.)
      if (out.length !== PAGE_SIZE) return false;
      dst.set(out, dstOff);
      return true;
    } catch {
      return false;
    }
  }
}
