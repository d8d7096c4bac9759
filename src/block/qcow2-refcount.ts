/**
 * qcow2 host cluster management: the refcount table, the refcount blocks
 * and the cluster allocator (qcow2.txt, "Host cluster management").
 *
 * Refcount table entry t points to the refcount block of host clusters
 * [t * E, (t + 1) * E), E = cluster_size * 8 / refcount_bits; entry 0 (no
 * block) means all of them are free, and so is every cluster beyond the
 * table's reach. Refcounts of width 1 to 64 bits (refcount_order 0 to 6)
 * are read and written; Ferry only ever sets 1 (a new cluster) and lowers
 * a count by one (a cluster it no longer uses).
 *
 * Everything is write-through: a changed entry is written to the file at
 * once, and the callers order those writes (see the write order in
 * qcow2.ts). The allocator's own metadata steps:
 *
 *  - A new refcount block for range t goes to the first cluster of that
 *    range (free: the range has no block yet), counts itself, is written,
 *    then (barrier) the table entry pointing to it.
 *  - A refcount table that must grow moves: the new table and the new
 *    refcount blocks that count it are written past the end of the old
 *    table's reach, where every cluster is free, then (barrier) the header
 *    fields refcount_table_offset/clusters (one 12-byte write), then
 *    (barrier) the old table's clusters are freed.
 */
import { BlockError } from './types.js';
import { hex, type ImageFile, TableCache } from './io.js';
import { H_REFCOUNT_TABLE_OFFSET, MAX_REFTABLE_BYTES } from './qcow2-header.js';

const TWO32 = 4294967296;

/** Refcount entry i of a block, for refcount_order `order`. */
export function getRefcount(block: Buffer, i: number, order: number): number {
  switch (order) {
    case 4:
      return block.readUInt16BE(i << 1);
    case 3:
      return block[i]!;
    case 5:
      return block.readUInt32BE(i << 2);
    case 6:
      return block.readUInt32BE(i << 3) * TWO32 + block.readUInt32BE((i << 3) + 4);
    default: {
      // 1, 2 or 4 bits: bit 0 is the least significant bit of the byte.
      const bit = i << order;
      return (block[bit >>> 3]! >>> (bit & 7)) & ((1 << (1 << order)) - 1);
    }
  }
}

export function setRefcount(block: Buffer, i: number, order: number, v: number): void {
  switch (order) {
    case 4:
      block.writeUInt16BE(v, i << 1);
      return;
    case 3:
      block[i] = v;
      return;
    case 5:
      block.writeUInt32BE(v, i << 2);
      return;
    case 6:
      block.writeUInt32BE(Math.floor(v / TWO32), i << 3);
      block.writeUInt32BE(v >>> 0, (i << 3) + 4);
      return;
    default: {
      const bit = i << order;
      const mask = ((1 << (1 << order)) - 1) << (bit & 7);
      block[bit >>> 3] = (block[bit >>> 3]! & ~mask) | ((v << (bit & 7)) & mask);
    }
  }
}

export class Refcounts {
  /** The refcount table as in the file. */
  private table: Buffer;
  private tableOffset: number;
  private tableClusters: number;
  private readonly cache: TableCache;
  private readonly clusterSize: number;
  /** log2 of the entries per refcount block. */
  private readonly blockBits: number;
  private readonly perBlock: number;
  private readonly maxRefcount: number;
  /** No free cluster lies below this cluster index (QEMU's free_cluster_index). */
  private freeHint = 0;

  constructor(
    private readonly file: ImageFile,
    private readonly filename: string,
    clusterBits: number,
    private readonly order: number,
    tableOffset: number,
    table: Buffer,
  ) {
    this.clusterSize = 2 ** clusterBits;
    this.blockBits = clusterBits + 3 - order;
    this.perBlock = 2 ** this.blockBits;
    this.maxRefcount = 2 ** (2 ** order) - 1;
    this.table = table;
    this.tableOffset = tableOffset;
    this.tableClusters = table.length / this.clusterSize;
    this.cache = new TableCache(Math.max(16, Math.floor((1 << 20) / this.clusterSize)));
  }

  /** Entries in the refcount table. */
  get entries(): number {
    return this.table.length / 8;
  }

  /** File offset of the refcount block of range t, or 0. */
  blockOffset(t: number): number {
    return this.table.readUInt32BE(t * 8) * TWO32 + ((this.table.readUInt32BE(t * 8 + 4) & ~511) >>> 0);
  }

  /** Every refcount block lies, aligned, inside the file (checked at a read-write open; the error is the opener's reason). */
  checkTable(): void {
    const corrupt = (what: string) => new BlockError(`qcow2 image is corrupt: ${what}`);
    for (let t = 0; t < this.entries; t++) {
      if (this.table.readUInt32BE(t * 8) >= 0x200000) throw corrupt(`refcount block offset of reftable index ${hex(t)} is too large`);
      const off = this.blockOffset(t);
      if (off === 0) continue;
      if (off % this.clusterSize !== 0) throw corrupt(`refcount block offset ${hex(off)} unaligned (reftable index: ${hex(t)})`);
      if (off + this.clusterSize > this.file.size) {
        throw corrupt(`refcount block offset ${hex(off)} (reftable index: ${hex(t)}) lies past the end of the file (${this.file.size} bytes)`);
      }
    }
  }

  private corrupt(what: string): BlockError {
    return new BlockError(`qcow2 image '${this.filename}' is corrupt: ${what}`);
  }

  private async block(t: number): Promise<Buffer | null> {
    const off = this.blockOffset(t);
    if (off === 0) return null;
    let b = this.cache.get(off);
    if (b === undefined) {
      b = Buffer.allocUnsafe(this.clusterSize);
      const got = await this.file.read(b, off);
      if (got < this.clusterSize) throw this.corrupt(`refcount block at ${hex(off)} lies past the end of the file`);
      this.cache.set(off, b);
    }
    return b;
  }

  /** The refcount of host cluster `c` (index, not offset). */
  async get(c: number): Promise<number> {
    const t = Math.floor(c / this.perBlock);
    if (t >= this.entries) return 0;
    const b = await this.block(t);
    return b === null ? 0 : getRefcount(b, c - t * this.perBlock, this.order);
  }

  /**
   * Allocate `n` host clusters with refcount 1 (written before this
   * returns). Returns extents as [first cluster index, count] pairs, in
   * file order; the first free clusters from the hint are taken, so the
   * extents are few (one, unless freed holes or refcount blocks lie in
   * the way).
   */
  async allocate(n: number): Promise<number[]> {
    const out: number[] = [];
    while (n > 0) {
      const [start, len] = await this.findFree(n);
      if (!(await this.ensureBlocks(start, len))) continue; // metadata was placed: look again
      await this.change(start, len, 1);
      this.freeHint = start + len;
      out.push(start, len);
      n -= len;
    }
    return out;
  }

  /** Lower the refcount of clusters [c, c + count) by one each. */
  async release(c: number, count = 1): Promise<void> {
    await this.change(c, count, -1);
  }

  /** The first run of free clusters from the hint: [start, length ≤ n]. */
  private async findFree(n: number): Promise<[number, number]> {
    let c = this.freeHint;
    let start = -1;
    let len = 0;
    while (len < n) {
      const t = Math.floor(c / this.perBlock);
      if (t >= this.entries) {
        // Beyond the table's reach everything is free.
        if (start < 0) start = c;
        return [start, n];
      }
      const b = await this.block(t);
      const blockEnd = (t + 1) * this.perBlock;
      if (b === null) {
        if (start < 0) start = c;
        len += blockEnd - c;
        c = blockEnd;
        continue;
      }
      for (let i = c - t * this.perBlock; i < this.perBlock; i++, c++) {
        if (getRefcount(b, i, this.order) === 0) {
          if (start < 0) start = c;
          if (++len === n) return [start, n];
        } else if (start >= 0) {
          return [start, len];
        }
      }
    }
    return [start, Math.min(len, n)];
  }

  /**
   * Whether every cluster of [start, start + len) has a refcount block. If
   * not, places one block (or grows the table) and returns false: the
   * caller must look for free clusters again, since the new metadata may
   * sit where it looked.
   */
  private async ensureBlocks(start: number, len: number): Promise<boolean> {
    const last = Math.floor((start + len - 1) / this.perBlock);
    for (let t = Math.floor(start / this.perBlock); t <= last; t++) {
      if (t >= this.entries) {
        await this.growTable(last);
        return false;
      }
      if (this.blockOffset(t) === 0) {
        await this.newBlock(t);
        return false;
      }
    }
    return true;
  }

  /** A refcount block for range t at the range's first cluster, counting itself. */
  private async newBlock(t: number): Promise<void> {
    const c = t * this.perBlock;
    if (c === 0) throw this.corrupt('no refcount block covers the header');
    const b = Buffer.alloc(this.clusterSize);
    setRefcount(b, 0, this.order, 1);
    await this.file.write(b, c * this.clusterSize);
    await this.file.barrier();
    this.putTableEntry(this.table, t, c * this.clusterSize);
    await this.file.write(this.table.subarray(t * 8, t * 8 + 8), this.tableOffset + t * 8);
    this.cache.set(c * this.clusterSize, b);
  }

  /** Move the refcount table to a bigger one that reaches range `need`. */
  private async growTable(need: number): Promise<void> {
    const cs = this.clusterSize;
    const old = this.entries; // the first range without a table entry: all of it is free
    const region = old * this.perBlock; // its first cluster
    let clusters = Math.max(Math.ceil(((need + 1) * 8) / cs), this.tableClusters + Math.ceil(this.tableClusters / 2));
    let blocks = 1;
    for (;;) {
      while (blocks * this.perBlock < blocks + clusters) blocks++;
      if ((clusters * cs) / 8 >= old + blocks) break;
      clusters++;
    }
    if (clusters * cs > MAX_REFTABLE_BYTES) {
      throw new BlockError(`Cannot grow the reference count table of '${this.filename}' beyond ${MAX_REFTABLE_BYTES} bytes`);
    }
    // [blocks refcount blocks][the new table], counted by those blocks.
    const buf = Buffer.alloc((blocks + clusters) * cs);
    for (let i = 0; i < blocks + clusters; i++) {
      const j = Math.floor(i / this.perBlock);
      setRefcount(buf.subarray(j * cs, (j + 1) * cs), i - j * this.perBlock, this.order, 1);
    }
    const table = buf.subarray(blocks * cs);
    this.table.copy(table, 0);
    for (let j = 0; j < blocks; j++) this.putTableEntry(table, old + j, (region + j) * cs);
    await this.file.write(buf, region * cs);
    await this.file.barrier();

    const hdr = Buffer.alloc(12);
    hdr.writeUInt32BE(Math.floor(((region + blocks) * cs) / TWO32), 0);
    hdr.writeUInt32BE(((region + blocks) * cs) >>> 0, 4);
    hdr.writeUInt32BE(clusters, 8);
    await this.file.write(hdr, H_REFCOUNT_TABLE_OFFSET);
    await this.file.barrier();

    const oldOffset = this.tableOffset;
    const oldClusters = this.tableClusters;
    this.table = table;
    this.tableOffset = (region + blocks) * cs;
    this.tableClusters = clusters;
    for (let j = 0; j < blocks; j++) this.cache.set((region + j) * cs, buf.subarray(j * cs, (j + 1) * cs));
    await this.change(oldOffset / cs, oldClusters, -1);
  }

  private putTableEntry(table: Buffer, t: number, offset: number): void {
    table.writeUInt32BE(Math.floor(offset / TWO32), t * 8);
    table.writeUInt32BE(offset >>> 0, t * 8 + 4);
  }

  /** Add `delta` (+1 or -1) to the refcounts of [start, start + n), writing each changed block's span once. */
  private async change(start: number, n: number, delta: number): Promise<void> {
    const end = start + n;
    for (let c = start; c < end; ) {
      const t = Math.floor(c / this.perBlock);
      const b = t < this.entries ? await this.block(t) : null;
      if (b === null) throw this.corrupt(`no refcount block for host cluster ${hex(c * this.clusterSize)}`);
      const base = t * this.perBlock;
      const first = c - base;
      const stop = Math.min(end, base + this.perBlock) - base;
      for (let i = first; i < stop; i++) {
        const v = getRefcount(b, i, this.order) + delta;
        if (v < 0) throw this.corrupt(`refcount of host cluster ${hex((base + i) * this.clusterSize)} is already 0`);
        if (v > this.maxRefcount) throw this.corrupt(`refcount of host cluster ${hex((base + i) * this.clusterSize)} would overflow`);
        setRefcount(b, i, this.order, v);
        if (v === 0 && base + i < this.freeHint) this.freeHint = base + i;
      }
      const from = (first << this.order) >>> 3;
      const to = ((stop << this.order) + 7) >>> 3;
      await this.file.write(b.subarray(from, to), this.blockOffset(t) + from);
      c = base + stop;
    }
  }
}
