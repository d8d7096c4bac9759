/**
 * The qcow2 format, versions 2 and 3 (QEMU's docs/interop/qcow2.txt):
 * guest clusters map through the L1 table and L2 tables to host clusters;
 * host clusters are counted in the refcount structures (qcow2-refcount.ts).
 *
 * L2 entry kinds (bits 62 and 0, bits 9-55 the host offset):
 *   unallocated  offset 0, no zero flag: read from the backing chain (zeros beyond it)
 *   normal       data at the host cluster; bit 63 (COPIED) when its refcount is 1
 *   zero         bit 0 (v3): reads as zeros; with a host offset the cluster stays
 *                allocated ("zero-alloc", COPIED as for normal clusters)
 *   compressed   bit 62: raw deflate data at a byte offset, a sector count above it
 *
 * Not supported (refused at open with QEMU-style texts): encryption, external
 * data files, extended L2 entries, compression types other than zlib, and
 * writing to images with internal snapshots (reading them is fine: only the
 * active L1 table is used). A dirty image (lazy refcounts) opens read-only
 * only: QEMU repairs its refcounts on a read-write open, Ferry does not.
 * Persistent dirty bitmaps are not kept: a read-write open clears the
 * autoclear bits, as qcow2.txt asks of a program without bitmap support, and
 * QEMU then treats the bitmaps as inconsistent (their clusters leak).
 */
import type { FileHandle } from 'node:fs/promises';
import { constants as zlibConstants, inflateRawSync } from 'node:zlib';
import { bufferView } from '../base/bytes.js';
import { checkRange, hex, ImageFile, SerialQueue, TableCache, ZERO_CHUNK, zeroChunk } from './io.js';
import {
  H_AUTOCLEAR,
  INCOMPAT_CORRUPT,
  INCOMPAT_DIRTY,
  MAX_L1_BYTES,
  MAX_REFTABLE_BYTES,
  parseHeader,
  probeHeader,
  type Qcow2Header,
  unsupportedFeatures,
} from './qcow2-header.js';
import { Refcounts } from './qcow2-refcount.js';
import { BlockError, type BlockImage, type BlockStatus, type OpenOptions } from './types.js';

const TWO32 = 4294967296;

// L2 entry kinds.
const K_UNALLOC = 0;
const K_NORMAL = 1;
const K_ZERO = 2;
const K_COMPRESSED = 3;

// High word flags of L1/L2 entries (bits 63, 62), low word zero flag (bit 0).
const HI_COPIED = 0x80000000;
const HI_COMPRESSED = 0x40000000;
const HI_OFFSET = 0x00ffffff; // bits 32-55
const LO_OFFSET = 0xfffffe00; // bits 9-31
const LO_ZERO = 1;

function kindOf(hi: number, lo: number): number {
  if ((hi & HI_COMPRESSED) !== 0) return K_COMPRESSED;
  if ((lo & LO_ZERO) !== 0) return K_ZERO;
  if ((hi & HI_OFFSET) === 0 && (lo & LO_OFFSET) === 0) return K_UNALLOC;
  return K_NORMAL;
}

function offsetOf(hi: number, lo: number): number {
  return (hi & HI_OFFSET) * TWO32 + ((lo & LO_OFFSET) >>> 0);
}

function putEntry(t: Buffer, at: number, offset: number, hiFlags: number, loFlags: number): void {
  t.writeUInt32BE((Math.floor(offset / TWO32) | hiFlags) >>> 0, at);
  t.writeUInt32BE(((offset >>> 0) | loFlags) >>> 0, at + 4);
}

// What a write does with each guest cluster it touches.
const M_INPLACE = 0; // a normal cluster with refcount 1: write over it
const M_NEW = 1; // a new host cluster, whole (the rest copied from what the cluster showed)
const M_REUSE = 2; // a zero-alloc cluster with refcount 1: its host cluster, written whole

export class Qcow2Image implements BlockImage {
  readonly format = 'qcow2' as const;
  backing: BlockImage | null = null;
  readonly virtualSize: number;
  readonly clusterSize: number;
  readonly header: Qcow2Header;

  private readonly file: ImageFile;
  private readonly queue = new SerialQueue();
  private closed = false;
  private readonly l2Entries: number;
  private readonly l1: Buffer;
  private readonly l1Offset: number;
  private readonly refcounts: Refcounts | null;
  private readonly l2Cache: TableCache;
  /** Zero clusters may be written (version 3). */
  private readonly zeroClusters: boolean;
  // Compressed cluster descriptor: the offset is bits 0..x-1, x = 62 - (cluster_bits - 8).
  private readonly cOffsetHiMask: number;
  private readonly cSectorsShift: number;
  private readonly cSectorsMask: number;
  /** The last cluster decompressed (sequential reads of one cluster decompress it once). */
  private lastCompressed = -1;
  private readonly compressedBuf: Buffer;
  // Per-write scratch, one slot per guest cluster of the request (grown, reused).
  private planMode = new Uint8Array(0);
  private planHost = new Float64Array(0);

  private constructor(
    fh: FileHandle,
    readonly filename: string,
    fileSize: number,
    readonly readOnly: boolean,
    h: Qcow2Header,
    l1: Buffer,
    reftable: Buffer | null,
    opts: OpenOptions,
  ) {
    this.header = h;
    this.file = new ImageFile(fh, fileSize, opts.barriers ?? true);
    this.virtualSize = h.size;
    this.clusterSize = 2 ** h.clusterBits;
    this.l2Entries = this.clusterSize / 8;
    this.l1 = l1;
    this.l1Offset = h.l1TableOffset;
    this.zeroClusters = h.version >= 3;
    this.refcounts = reftable === null ? null : new Refcounts(this.file, filename, h.clusterBits, h.refcountOrder, h.refcountTableOffset, reftable);
    this.l2Cache = new TableCache(Math.max(16, Math.floor((opts.l2CacheBytes ?? 4 << 20) / this.clusterSize)));
    const x = 62 - (h.clusterBits - 8);
    this.cOffsetHiMask = 2 ** (x - 32) - 1;
    this.cSectorsShift = x - 32;
    this.cSectorsMask = 2 ** (h.clusterBits - 8) - 1;
    this.compressedBuf = Buffer.alloc(this.clusterSize);
  }

  /**
   * Open a qcow2 image on an open file. Throws a BlockError with the reason
   * (the caller adds "Could not open '<file>': "). The backing file is the
   * caller's (open.ts): `header.backingFile`, `header.backingFormat`.
   */
  static async open(fh: FileHandle, filename: string, fileSize: number, readOnly: boolean, opts: OpenOptions): Promise<Qcow2Image> {
    const io = new ImageFile(fh, fileSize, false);
    const first = Buffer.alloc(4096);
    await io.read(first, 0);
    const { clusterBits } = probeHeader(first, fileSize);
    const cs = 2 ** clusterBits;
    let cluster = first.subarray(0, Math.min(cs, 4096));
    if (cs > 4096) {
      cluster = Buffer.alloc(cs);
      await io.read(cluster, 0);
    }
    const h = parseHeader(cluster, fileSize);

    const features = unsupportedFeatures(h);
    if (features !== null) throw new BlockError(features);
    if ((h.incompatible & INCOMPAT_CORRUPT) !== 0n && !readOnly) {
      throw new BlockError('qcow2: Image is corrupt; cannot be opened read/write');
    }
    if ((h.incompatible & INCOMPAT_DIRTY) !== 0n && !readOnly) {
      throw new BlockError(
        "qcow2: Image is dirty (its refcounts may be stale) and Ferry does not repair it; run 'qemu-img check -r all' on it first, or open it read-only",
      );
    }
    if (h.refcountOrder > 6) throw new BlockError('Reference count entry width too large; may not exceed 64 bits');
    if (h.compressionType !== 0) throw new BlockError(`Invalid compression type ${h.compressionType}: the compression type feature bit is not set`);
    if (h.cryptMethod !== 0) throw new BlockError(`Encrypted images are not supported (qcow2 crypt_method ${h.cryptMethod})`);
    if (h.nbSnapshots !== 0 && !readOnly) {
      throw new BlockError(`qcow2 images with internal snapshots can only be opened read-only (this one has ${h.nbSnapshots})`);
    }

    // The L1 table.
    const l2Entries = cs / 8;
    if (h.l1Size * 8 > MAX_L1_BYTES) throw new BlockError('Active L1 table too large');
    if (h.l1Size < Math.ceil(h.size / (cs * l2Entries))) throw new BlockError('L1 table is too small');
    if (h.l1Size > 0) {
      if (h.l1TableOffset % cs !== 0 || h.l1TableOffset < cs) throw new BlockError('Invalid L1 table offset');
      if (h.l1TableOffset + h.l1Size * 8 > fileSize) {
        throw new BlockError(`Invalid L1 table offset ${hex(h.l1TableOffset)}: the table's ${h.l1Size * 8} bytes run past the end of the file (${fileSize} bytes)`);
      }
    }
    // The refcount table.
    if (h.refcountTableClusters === 0) throw new BlockError('Image does not contain a reference count table');
    if (h.refcountTableClusters * cs > MAX_REFTABLE_BYTES) throw new BlockError('Reference count table too large');
    if (h.refcountTableOffset % cs !== 0 || h.refcountTableOffset < cs) throw new BlockError('Invalid reference count table offset');
    if (h.refcountTableOffset + h.refcountTableClusters * cs > fileSize) {
      throw new BlockError(
        `Invalid reference count table offset ${hex(h.refcountTableOffset)}: the table's ${h.refcountTableClusters * cs} bytes run past the end of the file (${fileSize} bytes)`,
      );
    }

    const l1 = Buffer.alloc(h.l1Size * 8);
    await io.read(l1, h.l1TableOffset);
    for (let i = 0; i < h.l1Size; i++) {
      const hi = l1.readUInt32BE(i * 8);
      const off = offsetOf(hi, l1.readUInt32BE(i * 8 + 4));
      if (off === 0) continue;
      if (off % cs !== 0) throw new BlockError(`qcow2 image is corrupt: L2 table offset ${hex(off)} unaligned (L1 index: ${hex(i)})`);
      if (off + cs > fileSize) {
        throw new BlockError(`qcow2 image is corrupt: L2 table offset ${hex(off)} (L1 index: ${hex(i)}) lies past the end of the file (${fileSize} bytes)`);
      }
    }
    let reftable: Buffer | null = null;
    if (!readOnly) {
      reftable = Buffer.alloc(h.refcountTableClusters * cs);
      await io.read(reftable, h.refcountTableOffset);
    }

    const img = new Qcow2Image(fh, filename, fileSize, readOnly, h, l1, reftable, opts);
    if (!readOnly) {
      img.refcounts!.checkTable();
      // "An implementation may only write to an image with unknown
      // auto-clear features if it clears the respective bits first": Ferry
      // keeps none of them (bitmaps), so all go, before the first write.
      if (h.autoclear !== 0n) {
        await img.file.write(Buffer.alloc(8), H_AUTOCLEAR);
        await img.file.barrier();
        h.autoclear = 0n;
      }
    }
    return img;
  }

  // ---- the BlockImage API

  async read(offset: number, buf: Uint8Array): Promise<void> {
    this.check(offset, buf.length, false);
    return this.queue.run(async () => {
      this.checkOpen();
      await this.readAt(offset, bufferView(buf));
    });
  }

  async write(offset: number, data: Uint8Array): Promise<void> {
    this.check(offset, data.length, true);
    return this.queue.run(async () => {
      this.checkOpen();
      await this.writeAt(offset, bufferView(data));
    });
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    this.check(offset, length, true);
    return this.queue.run(async () => {
      this.checkOpen();
      await this.zeroAt(offset, length);
    });
  }

  async blockStatus(offset: number, length: number): Promise<BlockStatus> {
    this.check(offset, length, false);
    return this.queue.run(async () => {
      this.checkOpen();
      return this.statusAt(offset, length);
    });
  }

  async flush(): Promise<void> {
    return this.queue.run(async () => {
      this.checkOpen();
      if (!this.readOnly) await this.file.fh.datasync();
    });
  }

  async close(): Promise<void> {
    return this.queue.run(async () => {
      if (this.closed) return;
      this.closed = true;
      try {
        if (this.backing !== null) await this.backing.close();
      } finally {
        await this.file.fh.close();
      }
    });
  }

  private check(offset: number, length: number, write: boolean): void {
    this.checkOpen();
    if (write && this.readOnly) throw new BlockError(`Cannot write to '${this.filename}': the image is open read-only`);
    checkRange(this.filename, this.virtualSize, offset, length);
  }

  private checkOpen(): void {
    if (this.closed) throw new BlockError(`Image '${this.filename}' is closed`);
  }

  private corrupt(what: string): BlockError {
    return new BlockError(`qcow2 image '${this.filename}' is corrupt: ${what}`);
  }

  // ---- mapping

  /** The L2 table of L1 entry `i`, or null when it has none. */
  private async l2Table(i: number): Promise<Buffer | null> {
    const off = offsetOf(this.l1.readUInt32BE(i * 8), this.l1.readUInt32BE(i * 8 + 4));
    if (off === 0) return null;
    let t = this.l2Cache.get(off);
    if (t === undefined) {
      t = Buffer.allocUnsafe(this.clusterSize);
      const got = await this.file.read(t, off);
      if (got < this.clusterSize) throw this.corrupt(`L2 table offset ${hex(off)} (L1 index: ${hex(i)}) lies past the end of the file`);
      this.l2Cache.set(off, t);
    }
    return t;
  }

  /** The host offset of a normal (or zero-alloc) entry, checked: aligned, and for data inside the file. */
  private hostOf(hi: number, lo: number, l1i: number, l2i: number, data: boolean): number {
    const host = offsetOf(hi, lo);
    if (host % this.clusterSize !== 0) {
      throw this.corrupt(`cluster allocation offset ${hex(host)} unaligned (L1 index: ${hex(l1i)}, L2 index: ${hex(l2i)})`);
    }
    if (data && host >= this.file.size) {
      throw this.corrupt(
        `data cluster offset ${hex(host)} (L1 index: ${hex(l1i)}, L2 index: ${hex(l2i)}) lies past the end of the file (${this.file.size} bytes)`,
      );
    }
    return host;
  }

  /** Guest bytes at `pos` as the layers below show them: the backing chain, zeros past its end (or without one). */
  private async readBelow(pos: number, buf: Buffer): Promise<void> {
    const b = this.backing;
    const n = b === null ? 0 : Math.max(0, Math.min(buf.length, b.virtualSize - pos));
    if (n > 0) await b!.read(pos, n === buf.length ? buf : buf.subarray(0, n));
    if (n < buf.length) buf.fill(0, n);
  }

  /** The guest cluster behind a compressed entry, decompressed (a view of a buffer reused by the next call). */
  private async decompress(hi: number, lo: number, l1i: number, l2i: number): Promise<Buffer> {
    const coff = (hi & this.cOffsetHiMask) * TWO32 + lo;
    if (coff === this.lastCompressed) return this.compressedBuf;
    const sectors = ((hi >>> this.cSectorsShift) & this.cSectorsMask) + 1;
    const csize = sectors * 512 - (lo & 511);
    if (coff >= this.file.size) {
      throw this.corrupt(
        `compressed cluster offset ${hex(coff)} (L1 index: ${hex(l1i)}, L2 index: ${hex(l2i)}) lies past the end of the file (${this.file.size} bytes)`,
      );
    }
    const raw = Buffer.allocUnsafe(csize);
    await this.file.read(raw, coff);
    let out: Buffer;
    try {
      out = inflateRawSync(raw, { finishFlush: zlibConstants.Z_SYNC_FLUSH, maxOutputLength: this.clusterSize });
    } catch (e) {
      throw this.corrupt(`compressed cluster at ${hex(coff)} does not decompress (${(e as Error).message})`);
    }
    if (out.length < this.clusterSize) {
      throw this.corrupt(`compressed cluster at ${hex(coff)} decompresses to ${out.length} bytes, not ${this.clusterSize}`);
    }
    out.copy(this.compressedBuf, 0, 0, this.clusterSize);
    this.lastCompressed = coff;
    return this.compressedBuf;
  }

  // ---- reads

  /**
   * Guest bytes [offset, offset + buf.length) into buf: runs of clusters of
   * one kind (and, for data, contiguous host clusters) in one request each.
   */
  private async readAt(offset: number, buf: Buffer): Promise<void> {
    const cs = this.clusterSize;
    const end = offset + buf.length;
    let pos = offset;
    while (pos < end) {
      const ci = Math.floor(pos / cs);
      const l1i = Math.floor(ci / this.l2Entries);
      const tableEnd = Math.min(end, (l1i + 1) * this.l2Entries * cs);
      const table = await this.l2Table(l1i);
      if (table === null) {
        await this.readBelow(pos, buf.subarray(pos - offset, tableEnd - offset));
        pos = tableEnd;
        continue;
      }
      let i = ci - l1i * this.l2Entries;
      while (pos < tableEnd) {
        const hi = table.readUInt32BE(i * 8);
        const lo = table.readUInt32BE(i * 8 + 4);
        const kind = kindOf(hi, lo);
        const inner = pos - Math.floor(pos / cs) * cs;
        let runEnd = Math.min(tableEnd, pos - inner + cs);
        i++;
        if (kind === K_COMPRESSED) {
          const data = await this.decompress(hi, lo, l1i, i - 1);
          data.copy(buf, pos - offset, inner, inner + (runEnd - pos));
          pos = runEnd;
          continue;
        }
        if (kind === K_NORMAL) {
          const host = this.hostOf(hi, lo, l1i, i - 1, true);
          let next = host + cs;
          while (runEnd < tableEnd) {
            const h2 = table.readUInt32BE(i * 8);
            const l2 = table.readUInt32BE(i * 8 + 4);
            if (kindOf(h2, l2) !== K_NORMAL || this.hostOf(h2, l2, l1i, i, true) !== next) break;
            next += cs;
            runEnd = Math.min(tableEnd, runEnd + cs);
            i++;
          }
          await this.file.read(buf.subarray(pos - offset, runEnd - offset), host + inner);
        } else {
          while (runEnd < tableEnd && kindOf(table.readUInt32BE(i * 8), table.readUInt32BE(i * 8 + 4)) === kind) {
            runEnd = Math.min(tableEnd, runEnd + cs);
            i++;
          }
          if (kind === K_ZERO) buf.fill(0, pos - offset, runEnd - offset);
          else await this.readBelow(pos, buf.subarray(pos - offset, runEnd - offset));
        }
        pos = runEnd;
      }
    }
  }

  /** The top image's status at `offset`, merged over the clusters that share it (within `length`). */
  private async statusAt(offset: number, length: number): Promise<BlockStatus> {
    const cs = this.clusterSize;
    const end = offset + length;
    let pos = offset;
    let allocated: boolean | null = null;
    let zero = false;
    while (pos < end) {
      const ci = Math.floor(pos / cs);
      const l1i = Math.floor(ci / this.l2Entries);
      const tableEnd = Math.min(end, (l1i + 1) * this.l2Entries * cs);
      const table = await this.l2Table(l1i);
      if (table === null) {
        if (allocated === null) allocated = false;
        else if (allocated || zero) break;
        pos = tableEnd;
        continue;
      }
      for (let i = ci - l1i * this.l2Entries; pos < tableEnd; i++) {
        const kind = kindOf(table.readUInt32BE(i * 8), table.readUInt32BE(i * 8 + 4));
        const a = kind !== K_UNALLOC;
        const z = kind === K_ZERO;
        if (allocated === null) {
          allocated = a;
          zero = z;
        } else if (a !== allocated || z !== zero) {
          return { allocated, zero, length: pos - offset };
        }
        pos = Math.min(tableEnd, (Math.floor(pos / cs) + 1) * cs);
      }
    }
    return { allocated: allocated ?? false, zero, length: Math.min(pos, end) - offset };
  }

  // ---- writes

  /*
   * The write order (crash safety). A write that needs new host clusters
   * (a cluster that was unallocated, zero, compressed or shared) runs in
   * three stages:
   *
   *   A. Refcounts first: every new cluster (data and new L2 tables) gets
   *      refcount 1 in its refcount block before anything is written into
   *      it (the allocator's own steps, a new refcount block or a moved
   *      refcount table, have their own barriers: qcow2-refcount.ts). Then
   *      the data (the guest's bytes, and the rest of each new cluster
   *      copied from what the cluster showed before: the backing chain,
   *      zeros, the decompressed or old cluster), and each new L2 table,
   *      complete, while nothing points to it yet.
   *      -- barrier (fdatasync) --
   *   B. The pointers: the changed entries of the existing L2 tables, then
   *      the L1 entries of the new L2 tables.
   *      -- barrier, only when clusters are freed --
   *   C. Frees: the refcounts of the clusters nothing points to any more
   *      (a compressed cluster written over) are lowered.
   *
   * A crash leaves every pointer durable only after what it points to,
   * and every refcount raised before its cluster is referenced and lowered
   * after it is not: the worst outcome is a leaked cluster (qemu-img check
   * -r leaks). A write over normal clusters with refcount 1 is a plain
   * write with no metadata and no barrier.
   */
  private async writeAt(offset: number, data: Buffer): Promise<void> {
    if (data.length === 0) return;
    const cs = this.clusterSize;
    const end = offset + data.length;
    const c0 = Math.floor(offset / cs);
    const c1 = Math.floor((end - 1) / cs);
    const nc = c1 - c0 + 1;
    if (this.planMode.length < nc) {
      this.planMode = new Uint8Array(nc);
      this.planHost = new Float64Array(nc);
    }
    const mode = this.planMode;
    const host = this.planHost;
    const t0 = Math.floor(c0 / this.l2Entries);
    const nt = Math.floor(c1 / this.l2Entries) - t0 + 1;
    const tables: Array<Buffer | null> = [];
    for (let t = 0; t < nt; t++) tables.push(await this.l2Table(t0 + t));

    // What each cluster needs.
    let nNew = 0;
    let nReuse = 0;
    const frees: number[] = []; // [hi, lo] of entries whose host clusters are released in stage C
    for (let k = 0; k < nc; k++) {
      const c = c0 + k;
      const l1i = Math.floor(c / this.l2Entries);
      const table = tables[l1i - t0]!;
      if (table === null) {
        mode[k] = M_NEW;
        nNew++;
        continue;
      }
      const i = c - l1i * this.l2Entries;
      const hi = table.readUInt32BE(i * 8);
      const lo = table.readUInt32BE(i * 8 + 4);
      const kind = kindOf(hi, lo);
      const copied = (hi & HI_COPIED) !== 0;
      if (kind === K_NORMAL && copied) {
        mode[k] = M_INPLACE;
        host[k] = this.hostOf(hi, lo, l1i, i, true);
      } else if (kind === K_ZERO && copied && offsetOf(hi, lo) !== 0) {
        mode[k] = M_REUSE;
        host[k] = this.hostOf(hi, lo, l1i, i, false);
        nReuse++;
      } else {
        mode[k] = M_NEW;
        nNew++;
        if (kind === K_COMPRESSED || offsetOf(hi, lo) !== 0) frees.push(hi, lo);
      }
    }

    // The rest of the first and last cluster when they are written whole:
    // what the guest saw there, read before anything changes.
    const headLen = offset - c0 * cs;
    const tailLen = (c1 + 1) * cs - end;
    const head = mode[0] !== M_INPLACE && headLen > 0 ? await this.readShown(c0 * cs, headLen) : null;
    const tail = mode[nc - 1] !== M_INPLACE && tailLen > 0 ? await this.readShown(end, tailLen) : null;

    // Stage A: refcounts (new L2 tables, then the data clusters in guest order).
    const newTables: number[] = []; // indices into tables
    const tableOffsets: number[] = [];
    for (let t = 0; t < nt; t++) {
      if (tables[t] !== null) continue;
      const [c] = await this.refcounts!.allocate(1);
      tables[t] = Buffer.alloc(cs);
      newTables.push(t);
      tableOffsets[t] = c! * cs;
    }
    if (nNew > 0) {
      const extents = await this.refcounts!.allocate(nNew);
      let e = 0;
      let next = extents[0]! * cs;
      let left = extents[1]!;
      for (let k = 0; k < nc; k++) {
        if (mode[k] !== M_NEW) continue;
        if (left === 0) {
          e += 2;
          next = extents[e]! * cs;
          left = extents[e + 1]!;
        }
        host[k] = next;
        next += cs;
        left--;
      }
    }

    // Stage A: the data, in runs of contiguous host clusters.
    let runHost = -1; // file offset where the current run starts
    let runEnd = -1; // and ends
    let runFrom = 0; // data[runFrom, runTo) goes there
    let runTo = 0;
    let runHead = false;
    let runTail = false;
    const flush = async () => {
      if (runHost < 0) return;
      const bufs: Buffer[] = [];
      if (runHead) bufs.push(head!);
      bufs.push(data.subarray(runFrom, runTo));
      if (runTail) bufs.push(tail!);
      await this.file.writev(bufs, runHost);
      runHost = -1;
    };
    for (let k = 0; k < nc; k++) {
      const cStart = (c0 + k) * cs;
      const from = Math.max(offset, cStart) - offset;
      const to = Math.min(end, cStart + cs) - offset;
      const whole = mode[k] !== M_INPLACE;
      const segHost = whole ? host[k]! : host[k]! + (from + offset - cStart);
      const withHead = whole && k === 0 && head !== null;
      const withTail = whole && k === nc - 1 && tail !== null;
      if (runHost >= 0 && segHost === runEnd && !withHead) {
        runTo = to;
        runTail = withTail;
      } else {
        await flush();
        runHost = segHost;
        runFrom = from;
        runTo = to;
        runHead = withHead;
        runTail = withTail;
      }
      runEnd = whole ? host[k]! + cs : segHost + (to - from);
    }
    await flush();

    // Stage A: the new L2 tables, complete.
    for (const t of newTables) {
      const table = tables[t]!;
      this.fillEntries(table, t0 + t, c0, c1, mode, host);
      await this.file.write(table, tableOffsets[t]!);
    }
    if (nNew === 0 && nReuse === 0) return; // no new pointer: done
    await this.file.barrier();

    // Stage B: the existing L2 tables' entries, then the L1 entries.
    for (let t = 0; t < nt; t++) {
      if (newTables.includes(t)) continue;
      const table = tables[t]!;
      const [lo, hi] = this.fillEntries(table, t0 + t, c0, c1, mode, host);
      if (lo <= hi) {
        const l2Off = offsetOf(this.l1.readUInt32BE((t0 + t) * 8), this.l1.readUInt32BE((t0 + t) * 8 + 4));
        await this.file.write(table.subarray(lo * 8, (hi + 1) * 8), l2Off + lo * 8);
      }
    }
    if (newTables.length > 0) {
      for (const t of newTables) {
        putEntry(this.l1, (t0 + t) * 8, tableOffsets[t]!, HI_COPIED, 0);
        this.l2Cache.set(tableOffsets[t]!, tables[t]!);
      }
      const first = t0 + newTables[0]!;
      const last = t0 + newTables[newTables.length - 1]!;
      await this.file.write(this.l1.subarray(first * 8, (last + 1) * 8), this.l1Offset + first * 8);
    }

    // Stage C.
    if (frees.length > 0) {
      await this.file.barrier();
      for (let f = 0; f < frees.length; f += 2) await this.releaseEntry(frees[f]!, frees[f + 1]!);
    }
  }

  /**
   * Set the entries of table `l1i` for the clusters of [c0, c1] that got
   * (or kept) a host cluster written whole. Returns the changed index span [lo, hi].
   */
  private fillEntries(table: Buffer, l1i: number, c0: number, c1: number, mode: Uint8Array, host: Float64Array): [number, number] {
    const base = l1i * this.l2Entries;
    const from = Math.max(c0, base);
    const to = Math.min(c1, base + this.l2Entries - 1);
    let lo = Infinity;
    let hi = -1;
    for (let c = from; c <= to; c++) {
      const k = c - c0;
      if (mode[k] === M_INPLACE) continue;
      const i = c - base;
      putEntry(table, i * 8, host[k]!, HI_COPIED, 0);
      if (i < lo) lo = i;
      hi = i;
    }
    return [lo, hi];
  }

  /** Guest bytes [pos, pos + len) as they read now (zeros past the virtual size). */
  private async readShown(pos: number, len: number): Promise<Buffer> {
    const buf = Buffer.alloc(len);
    const n = Math.max(0, Math.min(len, this.virtualSize - pos));
    if (n > 0) await this.readAt(pos, buf.subarray(0, n));
    return buf;
  }

  /** Lower the refcounts of the host clusters an entry no longer in use pointed to. */
  private async releaseEntry(hi: number, lo: number): Promise<void> {
    const cs = this.clusterSize;
    if (kindOf(hi, lo) === K_COMPRESSED) {
      // The clusters that hold any of its sectors, as qemu-img check counts them.
      const coff = (hi & this.cOffsetHiMask) * TWO32 + lo;
      const sectors = ((hi >>> this.cSectorsShift) & this.cSectorsMask) + 1;
      const csize = sectors * 512 - (lo & 511);
      const first = Math.floor(coff / cs);
      const last = Math.floor((coff + csize - 1) / cs);
      await this.refcounts!.release(first, last - first + 1);
      if (coff === this.lastCompressed) this.lastCompressed = -1;
    } else {
      await this.refcounts!.release(offsetOf(hi, lo) / cs);
    }
  }

  // ---- zero writes

  /**
   * Version 3: whole clusters become zero clusters (a normal cluster with
   * refcount 1 keeps its host cluster, flagged zero; anything else loses
   * it), partial clusters at either end get zeros written. Version 2 has no
   * zero flag: zeros are written, except where the image reads zeros
   * anyway (unallocated with no backing file). Without a backing file,
   * unallocated clusters are left alone in both versions.
   */
  private async zeroAt(offset: number, length: number): Promise<void> {
    const cs = this.clusterSize;
    const end = offset + length;
    if (!this.zeroClusters) return this.zeroBytes(offset, end);
    // The whole clusters [a, b); the image's last cluster counts as whole when the request reaches the end.
    const a = Math.ceil(offset / cs) * cs;
    const b = end === this.virtualSize ? Math.ceil(end / cs) * cs : Math.floor(end / cs) * cs;
    if (a >= b) return this.zeroBytes(offset, end);
    if (a > offset) await this.zeroBytes(offset, a);
    // some L2 tables at a time (one barrier per batch)
    const batch = 64 * this.l2Entries * cs;
    for (let p = a; p < b; p += batch) await this.zeroClustersIn(p, Math.min(b, p + batch));
    if (b < end) await this.zeroBytes(b, end);
  }

  /** Zeros written over [from, to), skipping runs that already read as zeros. */
  private async zeroBytes(from: number, to: number): Promise<void> {
    const z = zeroChunk();
    for (let pos = from; pos < to; ) {
      const st = await this.statusAt(pos, to - pos);
      if (!(st.zero || (!st.allocated && this.backing === null))) {
        for (let p = pos; p < pos + st.length; ) {
          const n = Math.min(ZERO_CHUNK, pos + st.length - p);
          await this.writeAt(p, z.subarray(0, n));
          p += n;
        }
      }
      pos += st.length;
    }
  }

  /** Zero clusters over the whole clusters [from, to) (cluster aligned), in the write order above. */
  private async zeroClustersIn(from: number, to: number): Promise<void> {
    const cs = this.clusterSize;
    const c0 = from / cs;
    const c1 = to / cs - 1;
    const t0 = Math.floor(c0 / this.l2Entries);
    const t1 = Math.floor(c1 / this.l2Entries);
    const frees: number[] = [];
    const newTables: Array<[number, number, Buffer]> = []; // [l1 index, offset, table]
    const changed: Array<[number, number, number, Buffer]> = []; // [table offset, lo, hi, table]
    for (let l1i = t0; l1i <= t1; l1i++) {
      const base = l1i * this.l2Entries;
      const first = Math.max(c0, base) - base;
      const last = Math.min(c1, base + this.l2Entries - 1) - base;
      let table = await this.l2Table(l1i);
      if (table === null) {
        if (this.backing === null) continue; // reads as zeros already
        const [c] = await this.refcounts!.allocate(1);
        table = Buffer.alloc(cs);
        for (let i = first; i <= last; i++) table.writeUInt32BE(LO_ZERO, i * 8 + 4);
        newTables.push([l1i, c! * cs, table]);
        continue;
      }
      let lo = Infinity;
      let hi = -1;
      for (let i = first; i <= last; i++) {
        const eh = table.readUInt32BE(i * 8);
        const el = table.readUInt32BE(i * 8 + 4);
        const kind = kindOf(eh, el);
        const copied = (eh & HI_COPIED) !== 0;
        if (kind === K_ZERO && (copied || offsetOf(eh, el) === 0)) continue; // already zero
        if (kind === K_UNALLOC && this.backing === null) continue; // reads as zeros already
        if (kind === K_NORMAL && copied) {
          table.writeUInt32BE((el | LO_ZERO) >>> 0, i * 8 + 4); // zero-alloc: keeps its host cluster
        } else {
          if (kind !== K_UNALLOC) frees.push(eh, el);
          table.writeUInt32BE(0, i * 8);
          table.writeUInt32BE(LO_ZERO, i * 8 + 4);
        }
        if (i < lo) lo = i;
        hi = i;
      }
      if (lo <= hi) changed.push([offsetOf(this.l1.readUInt32BE(l1i * 8), this.l1.readUInt32BE(l1i * 8 + 4)), lo, hi, table]);
    }
    // Stage A: new tables, complete; barrier; stage B: entries, L1; barrier; stage C: frees.
    for (const [, off, table] of newTables) await this.file.write(table, off);
    if (newTables.length > 0) await this.file.barrier();
    for (const [off, lo, hi, table] of changed) await this.file.write(table.subarray(lo * 8, (hi + 1) * 8), off + lo * 8);
    for (const [l1i, off, table] of newTables) {
      putEntry(this.l1, l1i * 8, off, HI_COPIED, 0);
      this.l2Cache.set(off, table);
      await this.file.write(this.l1.subarray(l1i * 8, l1i * 8 + 8), this.l1Offset + l1i * 8);
    }
    if (frees.length > 0) {
      await this.file.barrier();
      for (let f = 0; f < frees.length; f += 2) await this.releaseEntry(frees[f]!, frees[f + 1]!);
    }
  }
}
