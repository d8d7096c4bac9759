/**
 * RamLoader: the destination side of the `ram` section
 * (docs/spec/stream-format.md §9). Parses RAM records from a StreamReader
 * straight into the local RamBlocks.
 *
 * Three ways to place what it reads:
 *  - precopy (the default): every record is applied.
 *  - postcopy (after POSTCOPY_LISTEN): only ZERO, PAGE and EOS are accepted,
 *    and a page is placed only where it is still missing (postcopy/placement.ts).
 *  - inspection (`inspect`): nothing is written; the blocks are those the
 *    stream's MEM_SIZE record announces, and an observer sees every record
 *    (`ferry inspect`, tests).
 * An observer, when given, sees every record in all three.
 */
import { setBit, testBit } from '../../base/bitmap.js';
import { bufferView, isZeroPage } from '../../base/bytes.js';
import { copyBytes, loadPageRun, nativePages } from '../../base/native.js';
import { join64 } from '../../base/u64.js';
import type { RamBlock } from '../../machine/types.js';
import { TARGET_PAGE_SIZE } from '../../machine/types.js';
import type { DecompressPool } from '../codec/compress-pool.js';
import { xbzrleDecode } from '../codec/xbzrle-codec.js';
import { PageInflater } from '../codec/zlib-page.js';
import { PostcopyPlacer } from '../postcopy/placement.js';
import { StreamReader } from '../stream/reader.js';
import { WIRE } from '../wire/constants.js';
import { ERR, MigrationStreamError } from '../wire/errors.js';

const F = WIRE.RAM;
const PAGE_RECORD = F.ZERO | F.PAGE | F.COMPRESS_PAGE | F.XBZRLE;

/** Sees the records a RamLoader reads. */
export interface RamRecordObserver {
  /**
   * A ZERO, PAGE, XBZRLE or COMPRESS_PAGE record (`kind` is its flag,
   * `flags` all of them, CONTINUE included). `payload` is what followed the
   * header on the wire (the fill byte, the page, the delta, the zlib data);
   * a view, valid only during the call.
   */
  page(kind: number, flags: number, block: number, offset: number, payload: Uint8Array): void;
  /** The MEM_SIZE block list. */
  blockList?(total: number, blocks: ReadonlyArray<{ name: string; length: number }>): void;
  /** An EOS record (the end of a section's RAM payload). */
  eos?(flags: number): void;
}

export interface RamLoaderOptions {
  /** Destination has the `compress` capability on (accept COMPRESS_PAGE). */
  compress?: boolean;
  /**
   * Inflate COMPRESS_PAGE records in batches on these workers (the
   * `decompress-threads` pool). Without it they are inflated one by one on
   * the calling thread.
   */
  decompressPool?: DecompressPool;
  /**
   * Postcopy: called after a page has been placed (its contents complete),
   * so that the machine can set its present bit and wake blocked vCPUs.
   */
  placed?: (block: number, page: number) => void;
  observer?: RamRecordObserver;
  /** Inspection: write nothing; take the blocks from the stream's MEM_SIZE record. */
  inspect?: boolean;
  /** Called at every EOS record before the section ends (`multifd`: the channels' sync). */
  eos?: () => Promise<void>;
}

export interface RamLoaderCounters {
  /** page records applied (zero + normal + xbzrle + compressed) */
  pages: number;
  zero: number;
  normal: number;
  xbzrle: number;
  compressed: number;
  /** bytes of RAM payload consumed (records, block lists, EOS) */
  bytes: number;
}

function fail(msg: string): never {
  throw new MigrationStreamError(msg);
}

/** A block of an inspected stream: a name and a size, no memory. */
function announcedBlock(name: string, size: number): RamBlock {
  const none = new Int32Array(0);
  return { name, size, pages: Math.ceil(size / TARGET_PAGE_SIZE), bytes: new Uint8Array(0), dirty: none, touched: new Uint32Array(0), present: none };
}

export class RamLoader {
  readonly blocks: RamBlock[];
  private readonly byName = new Map<string, number>();
  private readonly views: Buffer[];
  readonly counters: RamLoaderCounters = { pages: 0, zero: 0, normal: 0, xbzrle: 0, compressed: 0, bytes: 0 };
  /** Accept COMPRESS_PAGE records. */
  compress: boolean;
  private readonly placer: PostcopyPlacer;
  private postcopyMode = false;
  private readonly observer: RamRecordObserver | null;
  private readonly inspect: boolean;
  /** Block of the most recent record that named one; kept across sections. */
  private current = -1;
  /** Blocks listed by the source's MEM_SIZE record. */
  readonly announced = new Set<string>();
  private readonly pool: DecompressPool | null;
  /** Target (block, page) of each COMPRESS_PAGE waiting in the pool's input slots. */
  private readonly pendBlock: Uint32Array;
  private readonly pendPage: Uint32Array;
  private readonly pendFlags: Uint32Array;
  private pendN = 0;
  private inflater: PageInflater | null = null;
  private readonly scratch = new Uint8Array(TARGET_PAGE_SIZE + 1);
  /** PAGE and ZERO records applied by the last native run (loadPageRun). */
  private readonly runCounts = new Float64Array(2);
  private readonly eosHook: (() => Promise<void>) | null;

  constructor(blocks: readonly RamBlock[], opts: RamLoaderOptions = {}) {
    this.inspect = opts.inspect ?? false;
    this.blocks = this.inspect ? [] : [...blocks];
    this.blocks.forEach((b, i) => this.byName.set(b.name, i));
    this.views = this.blocks.map((b) => bufferView(b.bytes));
    this.compress = opts.compress ?? false;
    this.pool = this.inspect ? null : opts.decompressPool ?? null;
    this.observer = opts.observer ?? null;
    this.eosHook = this.inspect ? null : opts.eos ?? null;
    this.placer = new PostcopyPlacer(this, opts.placed ?? null);
    const cap = this.pool?.capacity ?? 0;
    this.pendBlock = new Uint32Array(cap);
    this.pendPage = new Uint32Array(cap);
    this.pendFlags = new Uint32Array(cap);
  }

  /**
   * After POSTCOPY_LISTEN: only ZERO, PAGE and EOS are accepted, and a page
   * is placed only if it is still missing (its bit clear in the block's
   * `present` bitmap): once placed, the running guest owns it, and a second
   * copy in flight must not overwrite what the guest wrote since.
   */
  get postcopy(): boolean {
    return this.postcopyMode;
  }

  set postcopy(on: boolean) {
    this.postcopyMode = on;
  }

  /** Forget the current block (new incoming migration). */
  reset(): void {
    this.current = -1;
    this.pendN = 0;
  }

  /**
   * Load the payload of one `ram` section (START, PART or END) up to and
   * including its EOS record. `versionId` is the section's version (4).
   */
  async loadSection(r: StreamReader, versionId: number = F.VERSION): Promise<void> {
    if (versionId !== F.VERSION) fail(ERR.ramVersion(versionId));
    const start = r.bytesRead;
    try {
      await this.loadRecords(r);
    } catch (e) {
      this.pendN = 0;
      throw e;
    } finally {
      this.counters.bytes += r.bytesRead - start;
    }
  }

  private async blockRef(r: StreamReader, flags: number): Promise<number> {
    if (flags & F.CONTINUE) {
      if (this.current < 0) fail(ERR.badStream());
      return this.current;
    }
    if (!r.has(1)) await r.ensure(1);
    const len = r.peek8();
    if (!r.has(1 + len)) await r.ensure(1 + len);
    const name = r.getCountedString();
    const idx = this.byName.get(name);
    if (idx === undefined) fail(ERR.cantFindBlock(name));
    this.current = idx;
    return idx;
  }

  private async loadRecords(r: StreamReader): Promise<void> {
    const invalid = this.compress || this.inspect ? 0 : F.COMPRESS_PAGE;
    // precopy with nobody watching: runs of CONTINUE PAGE/ZERO records are
    // applied straight out of the received chunk by native/pages; the loop
    // below takes whatever such a run stops at (another kind of record, one
    // split across chunks, an offset outside the block)
    const runs = nativePages && !this.inspect && this.observer === null;
    for (;;) {
      if (runs && this.current >= 0 && this.pendN === 0 && !this.postcopyMode) this.loadRun(r);
      if (!r.has(8)) await r.ensure(8);
      const hi = r.get32();
      const lo = r.get32();
      const flags = lo & F.FLAG_MASK;
      const offset = join64(hi, lo & ~F.FLAG_MASK);

      if (flags & invalid) fail(ERR.unexpectedCompressed());
      let b = -1;
      if (flags & PAGE_RECORD) {
        // CONTINUE (nearly every record) resolves without a promise
        if (flags & F.CONTINUE) {
          if (this.current < 0) fail(ERR.badStream());
          b = this.current;
        } else {
          b = await this.blockRef(r, flags);
        }
      }
      const kind = flags & ~F.CONTINUE;
      if (this.postcopyMode && kind !== F.ZERO && kind !== F.PAGE && kind !== F.EOS) fail(ERR.unknownRamFlagsPostcopy(flags));
      // pages still in the decompress pool go to RAM before any other record
      // (a later record for the same page must win) and before the section ends
      if (this.pendN > 0 && kind !== F.COMPRESS_PAGE) await this.flushCompressed();

      if (kind === F.EOS) {
        this.observer?.eos?.(flags);
        if (this.eosHook !== null) await this.eosHook();
        return;
      }
      if (kind === F.MEM_SIZE) {
        await this.loadBlockList(r, offset);
        continue;
      }
      if (b < 0) fail(ERR.unknownRamFlags(flags));
      const block = this.blocks[b]!;
      if (offset >= block.size) fail(ERR.illegalRamOffset(offset));
      const page = offset / TARGET_PAGE_SIZE;
      if (this.postcopyMode) {
        // no promise per page: only a missing payload awaits
        const n = kind === F.ZERO ? 1 : TARGET_PAGE_SIZE;
        if (!r.has(n)) await r.ensure(n);
        if (this.observer !== null) this.observer.page(kind, flags, b, offset, r.peekBytes(n));
        this.placer.place(r, b, page, kind);
        continue;
      }
      if (this.inspect) {
        await this.inspectRecord(r, kind, flags, b, offset);
        continue;
      }

      switch (kind) {
        case F.ZERO: {
          if (!r.has(1)) await r.ensure(1);
          const fill = r.get8();
          this.putZero(b, page, fill);
          if (this.observer !== null) this.observer.page(kind, flags, b, offset, Uint8Array.of(fill));
          break;
        }
        case F.PAGE:
          if (!r.has(TARGET_PAGE_SIZE)) await r.ensure(TARGET_PAGE_SIZE);
          this.putPage(r, b, page);
          if (this.observer !== null) this.observer.page(kind, flags, b, offset, block.bytes.subarray(offset, offset + TARGET_PAGE_SIZE));
          break;
        case F.XBZRLE: {
          if (!r.has(3)) await r.ensure(3);
          if (r.get8() !== F.XBZRLE_ENCODING) fail(ERR.xbzrleWrongEncoding());
          const len = r.get16();
          if (len > TARGET_PAGE_SIZE) fail(ERR.xbzrleLenOverflow());
          if (!r.has(len)) await r.ensure(len);
          const data = r.getBytes(len);
          if (xbzrleDecode(data, 0, len, block.bytes.subarray(offset, offset + TARGET_PAGE_SIZE)) < 0) {
            fail(ERR.xbzrleDecode(offset));
          }
          this.counters.xbzrle++;
          setBit(block.touched, page);
          if (this.observer !== null) this.observer.page(kind, flags, b, offset, data);
          break;
        }
        case F.COMPRESS_PAGE: {
          if (!r.has(4)) await r.ensure(4);
          const len = r.get32();
          if (len > WIRE.LIMITS.COMPRESS_BOUND) fail(ERR.invalidCompressedLength(len | 0));
          if (!r.has(len)) await r.ensure(len);
          const pool = this.pool;
          if (pool !== null) {
            // applied (and counted) when the batch comes back
            const k = this.pendN++;
            r.copyTo(pool.input, k * pool.inStride, len);
            pool.setLength(k, len);
            this.pendBlock[k] = b;
            this.pendPage[k] = page;
            this.pendFlags[k] = flags;
            if (this.observer !== null) this.observer.page(kind, flags, b, offset, pool.input.subarray(k * pool.inStride, k * pool.inStride + len));
            if (this.pendN === pool.capacity) await this.flushCompressed();
            continue;
          }
          const data = r.getBytes(len);
          this.inflater ??= new PageInflater();
          if (!this.inflater.inflate(data, 0, len, this.scratch, 0)) fail(ERR.decompressFailed());
          copyBytes(block.bytes, offset, this.scratch, 0, TARGET_PAGE_SIZE);
          this.counters.compressed++;
          setBit(block.touched, page);
          if (this.observer !== null) this.observer.page(kind, flags, b, offset, data);
          break;
        }
        default:
          fail(ERR.unknownRamFlags(flags));
      }
      this.counters.pages++;
    }
  }

  /** Apply the run of CONTINUE PAGE/ZERO records at the reader's position, in its current chunk. */
  private loadRun(r: StreamReader): void {
    const chunk = r.chunk;
    const block = this.blocks[this.current]!;
    const counts = this.runCounts;
    const n = loadPageRun(chunk, r.chunkOffset, chunk.length, block.bytes, block.touched, counts);
    if (n === 0) return;
    r.consumeInChunk(n);
    const c = this.counters;
    c.normal += counts[0]!;
    c.zero += counts[1]!;
    c.pages += counts[0]! + counts[1]!;
    counts[0] = 0;
    counts[1] = 0;
  }

  /** Inspection: check the record's framing, show it, skip it. */
  private async inspectRecord(r: StreamReader, kind: number, flags: number, b: number, offset: number): Promise<void> {
    let n: number;
    switch (kind) {
      case F.ZERO:
        n = 1;
        break;
      case F.PAGE:
        n = TARGET_PAGE_SIZE;
        break;
      case F.XBZRLE: {
        if (!r.has(3)) await r.ensure(3);
        if (r.get8() !== F.XBZRLE_ENCODING) fail(ERR.xbzrleWrongEncoding());
        n = r.get16();
        if (n > TARGET_PAGE_SIZE) fail(ERR.xbzrleLenOverflow());
        break;
      }
      case F.COMPRESS_PAGE: {
        if (!r.has(4)) await r.ensure(4);
        n = r.get32();
        if (n > WIRE.LIMITS.COMPRESS_BOUND) fail(ERR.invalidCompressedLength(n | 0));
        break;
      }
      default:
        fail(ERR.unknownRamFlags(flags));
    }
    if (!r.has(n)) await r.ensure(n);
    const payload = r.getBytes(n);
    this.observer?.page(kind, flags, b, offset, payload);
    this.count(kind);
  }

  private count(kind: number): void {
    const c = this.counters;
    if (kind === F.ZERO) c.zero++;
    else if (kind === F.PAGE) c.normal++;
    else if (kind === F.XBZRLE) c.xbzrle++;
    else c.compressed++;
    c.pages++;
  }

  /**
   * A ZERO record: the page becomes `fill` bytes. A page never written
   * (`touched` clear) is known to be zero and is skipped without being read.
   */
  putZero(b: number, page: number, fill: number): void {
    const block = this.blocks[b]!;
    const offset = page * TARGET_PAGE_SIZE;
    if (fill !== 0 || (testBit(block.touched, page) && !isZeroPage(this.views[b]!, offset))) {
      block.bytes.fill(fill, offset, offset + TARGET_PAGE_SIZE);
    }
    if (fill !== 0) setBit(block.touched, page);
    this.counters.zero++;
  }

  /** A PAGE record's payload (buffered) into page `page` of block `b`. */
  putPage(r: StreamReader, b: number, page: number): void {
    const block = this.blocks[b]!;
    r.copyTo(block.bytes, page * TARGET_PAGE_SIZE, TARGET_PAGE_SIZE);
    setBit(block.touched, page);
    this.counters.normal++;
  }

  /** Inflate the pending COMPRESS_PAGE records on the pool and write them to RAM in stream order. */
  private async flushCompressed(): Promise<void> {
    const pool = this.pool!;
    const n = this.pendN;
    this.pendN = 0;
    await pool.decompress(n);
    for (let i = 0; i < n; i++) {
      if (!pool.ok(i)) fail(ERR.decompressFailed());
      const b = this.pendBlock[i]!;
      const page = this.pendPage[i]!;
      const block = this.blocks[b]!;
      copyBytes(block.bytes, page * TARGET_PAGE_SIZE, pool.page(i), 0, TARGET_PAGE_SIZE);
      setBit(block.touched, page);
      this.counters.compressed++;
      this.counters.pages++;
    }
  }

  /** MEM_SIZE: `total` bytes of blocks follow as (counted name, be64 length). */
  private async loadBlockList(r: StreamReader, total: number): Promise<void> {
    let left = total;
    const list: Array<{ name: string; length: number }> = [];
    while (left > 0) {
      const name = await r.readCountedString();
      if (!r.has(8)) await r.ensure(8);
      const length = r.get64();
      if (this.inspect) {
        if (length > left || length === 0) fail(ERR.ramBlockListOverrun(name));
        if (!this.byName.has(name)) {
          this.byName.set(name, this.blocks.length);
          this.blocks.push(announcedBlock(name, length));
          this.views.push(Buffer.alloc(0));
        }
      } else {
        const idx = this.byName.get(name);
        if (idx === undefined) fail(ERR.unknownRamBlock(name));
        const block = this.blocks[idx]!;
        if (length !== block.size) fail(ERR.sizeMismatch(name, length, block.size));
        if (length > left) fail(ERR.ramBlockListOverrun(name));
      }
      this.announced.add(name);
      list.push({ name, length });
      left -= length;
    }
    this.observer?.blockList?.(total, list);
  }
}
