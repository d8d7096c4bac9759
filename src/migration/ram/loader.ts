/**
 * RamLoader: the destination side of the `ram` section (stream-format.md §9).
 * Parses RAM records from a StreamReader straight into the local RamBlocks.
 */
import type { RamBlock } from '../../machine/types.js';
import { TARGET_PAGE_SIZE } from '../../machine/types.js';
import type { DecompressPool } from '../codec/compress-pool.js';
import { xbzrleDecode } from '../codec/xbzrle.js';
import { PageInflater } from '../codec/zlib-page.js';
import { StreamReader } from '../stream/reader.js';
import { WIRE } from '../wire/constants.js';
import { ERR, MigrationStreamError } from '../wire/errors.js';

const F = WIRE.RAM;
const TWO32 = 4294967296;
const ZERO_PAGE = Buffer.alloc(TARGET_PAGE_SIZE);
const PAGE_RECORD = F.ZERO | F.PAGE | F.COMPRESS_PAGE | F.XBZRLE;

export interface RamLoaderOptions {
  /** Destination has the `compress` capability on (accept COMPRESS_PAGE). */
  compress?: boolean;
  /** Keep a bitmap of received pages per block (for postcopy). */
  trackReceived?: boolean;
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

export class RamLoader {
  readonly blocks: readonly RamBlock[];
  private readonly byName = new Map<string, number>();
  private readonly views: Buffer[];
  /** Received-page bitmaps (when trackReceived), indexed like blocks. */
  readonly received: Uint32Array[] | null;
  readonly counters: RamLoaderCounters = { pages: 0, zero: 0, normal: 0, xbzrle: 0, compressed: 0, bytes: 0 };
  /** Accept COMPRESS_PAGE records. */
  compress: boolean;
  /**
   * After POSTCOPY_LISTEN: only ZERO, PAGE and EOS are accepted, and a page
   * is placed only if it is still missing (its bit clear in the block's
   * `present` bitmap): once placed, the running guest owns it, and a second
   * copy in flight must not overwrite what the guest wrote since.
   */
  postcopy = false;
  private readonly placed: ((block: number, page: number) => void) | null;
  /** Block of the most recent record that named one; kept across sections. */
  private current = -1;
  /** Blocks listed by the source's MEM_SIZE record. */
  readonly announced = new Set<string>();
  private readonly pool: DecompressPool | null;
  /** Target (block, page) of each COMPRESS_PAGE waiting in the pool's input slots. */
  private readonly pendBlock: Uint32Array;
  private readonly pendPage: Uint32Array;
  private pendN = 0;
  private inflater: PageInflater | null = null;
  private readonly scratch = new Uint8Array(TARGET_PAGE_SIZE + 1);

  constructor(blocks: readonly RamBlock[], opts: RamLoaderOptions = {}) {
    this.blocks = blocks;
    blocks.forEach((b, i) => this.byName.set(b.name, i));
    this.views = blocks.map((b) => Buffer.from(b.bytes.buffer, b.bytes.byteOffset, b.bytes.byteLength));
    this.received = opts.trackReceived ? blocks.map((b) => new Uint32Array((b.pages + 31) >>> 5)) : null;
    this.compress = opts.compress ?? false;
    this.pool = opts.decompressPool ?? null;
    this.placed = opts.placed ?? null;
    const cap = this.pool?.capacity ?? 0;
    this.pendBlock = new Uint32Array(cap);
    this.pendPage = new Uint32Array(cap);
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

  private markTouched(block: RamBlock, page: number): void {
    block.touched[page >>> 5] = (block.touched[page >>> 5]! | (1 << (page & 31))) >>> 0;
  }

  private markReceived(b: number, page: number): void {
    const rb = this.received;
    if (rb !== null) rb[b]![page >>> 5] = (rb[b]![page >>> 5]! | (1 << (page & 31))) >>> 0;
  }

  private isZeroPage(b: number, page: number): boolean {
    // native memcmp against a zero page: fastest measured (bench/codec-ram.ts)
    const off = page * TARGET_PAGE_SIZE;
    return ZERO_PAGE.compare(this.views[b]!, off, off + TARGET_PAGE_SIZE) === 0;
  }

  private async loadRecords(r: StreamReader): Promise<void> {
    const invalid = this.compress ? 0 : F.COMPRESS_PAGE;
    for (;;) {
      if (!r.has(8)) await r.ensure(8);
      const hi = r.get32();
      const lo = r.get32();
      const flags = lo & F.FLAG_MASK;
      const offset = hi * TWO32 + ((lo & ~F.FLAG_MASK) >>> 0);

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
      if (this.postcopy && kind !== F.ZERO && kind !== F.PAGE && kind !== F.EOS) fail(ERR.unknownRamFlagsPostcopy(flags));
      // pages still in the decompress pool go to RAM before any other record
      // (a later record for the same page must win) and before the section ends
      if (this.pendN > 0 && kind !== F.COMPRESS_PAGE) await this.flushCompressed();

      if (kind === F.EOS) return;
      if (kind === F.MEM_SIZE) {
        await this.loadBlockList(r, offset);
        continue;
      }
      if (b < 0) fail(ERR.unknownRamFlags(flags));
      const block = this.blocks[b]!;
      if (offset >= block.size) fail(ERR.illegalRamOffset(offset));
      const page = offset / TARGET_PAGE_SIZE;
      if (this.postcopy) {
        // no promise per page: only a missing payload awaits
        const n = kind === F.ZERO ? 1 : TARGET_PAGE_SIZE;
        if (!r.has(n)) await r.ensure(n);
        this.placePostcopy(r, b, page, kind);
        continue;
      }

      switch (kind) {
        case F.ZERO: {
          if (!r.has(1)) await r.ensure(1);
          this.putZero(b, page, r.get8());
          break;
        }
        case F.PAGE:
          if (!r.has(TARGET_PAGE_SIZE)) await r.ensure(TARGET_PAGE_SIZE);
          r.copyTo(block.bytes, offset, TARGET_PAGE_SIZE);
          this.markTouched(block, page);
          this.counters.normal++;
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
          this.markTouched(block, page);
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
            if (this.pendN === pool.capacity) await this.flushCompressed();
            continue;
          }
          const data = r.getBytes(len);
          this.inflater ??= new PageInflater();
          if (!this.inflater.inflate(data, 0, len, this.scratch, 0)) fail(ERR.decompressFailed());
          block.bytes.set(this.scratch.subarray(0, TARGET_PAGE_SIZE), offset);
          this.counters.compressed++;
          this.markTouched(block, page);
          break;
        }
        default:
          fail(ERR.unknownRamFlags(flags));
      }
      this.counters.pages++;
      this.markReceived(b, page);
    }
  }

  /**
   * A ZERO record: the page becomes `fill` bytes. A page never written
   * (`touched` clear) is known to be zero and is skipped without being read.
   */
  private putZero(b: number, page: number, fill: number): void {
    const block = this.blocks[b]!;
    const touched = ((block.touched[page >>> 5]! >>> (page & 31)) & 1) !== 0;
    if (fill !== 0 || (touched && !this.isZeroPage(b, page))) {
      const offset = page * TARGET_PAGE_SIZE;
      block.bytes.fill(fill, offset, offset + TARGET_PAGE_SIZE);
    }
    if (fill !== 0) this.markTouched(block, page);
    this.counters.zero++;
  }

  /** One ZERO or PAGE record in postcopy mode; its payload is buffered. */
  private placePostcopy(r: StreamReader, b: number, page: number, kind: number): void {
    const block = this.blocks[b]!;
    const n = kind === F.ZERO ? 1 : TARGET_PAGE_SIZE;
    if (((block.present[page >>> 5]! >>> (page & 31)) & 1) !== 0) {
      r.skip(n);
      return;
    }
    const offset = page * TARGET_PAGE_SIZE;
    if (kind === F.ZERO) {
      // The local copy may be stale (received, then discarded): putZero
      // clears it unless it was never written (a missing page cannot have
      // been written by the guest), so untouched memory stays unallocated,
      // as UFFDIO_ZEROPAGE leaves it in QEMU.
      this.putZero(b, page, r.get8());
    } else {
      r.copyTo(block.bytes, offset, TARGET_PAGE_SIZE);
      this.markTouched(block, page);
      this.counters.normal++;
    }
    this.counters.pages++;
    this.markReceived(b, page);
    this.placed?.(b, page);
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
      block.bytes.set(pool.page(i), page * TARGET_PAGE_SIZE);
      this.markTouched(block, page);
      this.markReceived(b, page);
      this.counters.compressed++;
      this.counters.pages++;
    }
  }

  /** MEM_SIZE: `total` bytes of blocks follow as (counted name, be64 length). */
  private async loadBlockList(r: StreamReader, total: number): Promise<void> {
    let left = total;
    while (left > 0) {
      const name = await r.readCountedString();
      if (!r.has(8)) await r.ensure(8);
      const length = r.get64();
      const idx = this.byName.get(name);
      if (idx === undefined) fail(ERR.unknownRamBlock(name));
      const block = this.blocks[idx]!;
      if (length !== block.size) fail(ERR.sizeMismatch(name, length, block.size));
      if (length > left) fail(ERR.ramBlockListOverrun(name));
      this.announced.add(name);
      left -= length;
    }
  }
}
