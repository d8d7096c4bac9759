/**
 * Guest RAM: the blocks (SharedArrayBuffers of at most 2 GiB, advised for
 * huge pages, with their dirty / touched / present bitmaps; types.ts
 * RamBlock), and what is done to RAM as a whole: the boot fill, the
 * background prefault of an incoming VM, the memory digest, pmemsave,
 * reads and address lookup. The fill, prefault and digest run on helper
 * worker threads (helpers.ts) over the shared buffers, without copies.
 *
 * Guest-physical addresses run over the blocks back to back from 0.
 */
import { createHash } from 'node:crypto';
import { open } from 'node:fs/promises';
import { countBits, popcount32 } from '../base/bitmap.js';
import { adviseHugepages } from '../base/native.js';
import { HelperPool } from './helpers.js';
import { MAX_BLOCK_SIZE } from './layout.js';
import { FILL_CHUNK } from './workload.js';
import { TARGET_PAGE_SIZE, type FillConfig, type RamBlock } from './types.js';

const DIGEST_CHUNK = 64 << 20;
/** Bytes of RAM per boot fill task. */
const FILL_TASK = 64 << 20;
/** Bytes pmemsave copies out of guest RAM per write. */
const PMEMSAVE_CHUNK = 64 << 20;

export interface MemoryDigest {
  digest: string;
  blocks: { name: string; size: number; digest: string }[];
}

/** Number of pages marked dirty in a block's bitmap (the bitmap is always on). */
export function countDirty(block: RamBlock): number {
  return countBits(block.dirty);
}

/** Clears a block's dirty bitmap atomically word by word; returns the number of pages that were dirty. */
export function clearDirty(block: RamBlock): number {
  return takeDirty(block, null);
}

/**
 * Takes and clears a block's dirty bitmap atomically word by word, ORing the
 * bits into `touched` and, when given, into `into`; returns the number of
 * pages that were dirty.
 */
export function takeDirty(block: RamBlock, into: Uint32Array | null): number {
  let n = 0;
  const d = block.dirty;
  for (let i = 0; i < d.length; i++) {
    if (d[i] !== 0) {
      const v = Atomics.exchange(d, i, 0);
      block.touched[i] = (block.touched[i]! | v) >>> 0;
      if (into !== null) into[i] = (into[i]! | v) >>> 0;
      n += popcount32(v);
    }
  }
  return n;
}

/** Throws unless `size` is a valid guest RAM size. */
export function checkRamSize(size: number): void {
  if (!Number.isSafeInteger(size) || size <= 0 || size % TARGET_PAGE_SIZE !== 0) {
    throw new Error(`RAM size ${size} must be a positive multiple of ${TARGET_PAGE_SIZE} bytes`);
  }
}

function allocateBlock(name: string, size: number): RamBlock {
  const pages = size / TARGET_PAGE_SIZE;
  let bytes: Uint8Array;
  try {
    const sab = new SharedArrayBuffer(size);
    adviseHugepages(sab);
    bytes = new Uint8Array(sab);
  } catch (e) {
    throw new Error(`cannot allocate ${size} bytes of guest RAM: ${(e as Error).message}`);
  }
  const words = Math.ceil(pages / 32);
  const dirty = new Int32Array(new SharedArrayBuffer(words * 4));
  const touched = new Uint32Array(words);
  // every page is present unless demand paging (demand-paging.ts) is told otherwise
  const present = new Int32Array(new SharedArrayBuffer(words * 4)).fill(-1);
  return { name, size, pages, bytes, dirty, touched, present };
}

/** The range one prefault task covers: small enough to interleave the helper threads. */
const PREFAULT_CHUNK = 64 * 1024 * 1024;

/** Whether any page of [offset, offset + length) of the block is marked touched (length: whole 32-page words). */
function anyTouched(b: RamBlock, offset: number, length: number): boolean {
  const first = offset / TARGET_PAGE_SIZE / 32;
  const last = Math.ceil((offset + length) / TARGET_PAGE_SIZE / 32);
  for (let i = first; i < last && i < b.touched.length; i++) if (b.touched[i] !== 0) return true;
  return false;
}

export class GuestRam {
  readonly size: number;
  /** `<backend>`, `<backend>.1`, … of at most 2 GiB each. */
  readonly blocks: readonly RamBlock[];
  private readonly helpers = new HelperPool();
  private prefaultStopped = false;

  /** Allocates `size` bytes of zeroed RAM in blocks named after `backendId` (default pc.ram). */
  constructor(size: number, backendId: string) {
    checkRamSize(size);
    if (backendId.length === 0 || backendId.length > 255) throw new Error(`Invalid memory backend id '${backendId}'`);
    const blocks: RamBlock[] = [];
    for (let off = 0, i = 0; off < size; off += MAX_BLOCK_SIZE, i++) {
      blocks.push(allocateBlock(i === 0 ? backendId : `${backendId}.${i}`, Math.min(MAX_BLOCK_SIZE, size - off)));
    }
    this.size = size;
    this.blocks = blocks;
  }

  /** Total pages. */
  get pages(): number {
    return this.size / TARGET_PAGE_SIZE;
  }

  /** Boot fill (deterministic by seed), in parallel on the helper threads; marks every page touched. */
  async fill(f: FillConfig): Promise<void> {
    if (f.kind === 'zero') return;
    for (const b of this.blocks) b.touched.fill(0xffffffff);
    if (f.kind !== 'random' && f.kind !== 'text') throw new Error(`Unknown fill '${(f as { kind: string }).kind}'`);
    const seed = f.seed ?? 0;
    if (!Number.isInteger(seed) || seed < 0 || seed > 0xffffffff) throw new Error(`fill seed ${seed} must be 0..4294967295`);
    const tasks: Promise<unknown>[] = [];
    let phys = 0;
    for (const b of this.blocks) {
      for (let o = 0; o < b.size; o += FILL_TASK) {
        const len = Math.min(FILL_TASK, b.size - o);
        tasks.push(
          this.helpers.run({
            op: 'fill',
            kind: f.kind,
            seed,
            buf: b.bytes.buffer as SharedArrayBuffer,
            offset: o,
            length: len,
            chunkIndex: (phys + o) / FILL_CHUNK,
            chunkSize: FILL_CHUNK,
          }),
        );
      }
      phys += b.size;
    }
    await Promise.all(tasks);
  }

  /**
   * Faults every page of guest RAM in for writing without changing its
   * contents, in PREFAULT_CHUNK ranges on the helper threads, all of them
   * at once (two threads touch settled memory in about half the time of
   * one). For -mem-prealloc, before anything else runs. Resolves when all
   * of it is present.
   */
  async prefault(): Promise<void> {
    const tasks: Promise<unknown>[] = [];
    for (const b of this.blocks) {
      for (let offset = 0; offset < b.size; offset += PREFAULT_CHUNK) tasks.push(this.prefaultChunk(b, offset));
    }
    await Promise.all(tasks);
  }

  private prefaultChunk(b: RamBlock, offset: number): Promise<unknown> {
    const buf = b.bytes.buffer as SharedArrayBuffer;
    return this.helpers.run({ op: 'prefault', buf, offset, length: Math.min(PREFAULT_CHUNK, b.size - offset) });
  }

  /**
   * An incoming VM has nothing to do until the stream arrives: fault its RAM
   * in meanwhile, so that the loader writes into present memory instead of
   * paying the first-touch cost per page (1.2-1.6 s per GiB of huge pages
   * the hypervisor has taken back on our hosts, docs/benchmarks.md). One
   * range at a time on one helper thread, from the top of RAM down, while
   * the loader writes from the bottom up (the first pass goes in address
   * order): the two never fault the same pages, the fault work is split
   * between two threads, and the last pages of the first pass, which go
   * while the source is stopped, land in memory faulted in already. It stops
   * at the first range the loader has written a page of (they met), or when
   * the incoming migration has loaded (endBackgroundPrefault). (Faulting
   * bottom-up beside the loader made both fault the same huge pages and
   * doubled the destination's time.) Errors only mean the loader pays the
   * cost itself.
   */
  prefaultInBackground(): void {
    const run = async (): Promise<void> => {
      for (let bi = this.blocks.length - 1; bi >= 0; bi--) {
        const b = this.blocks[bi]!;
        for (let offset = Math.floor((b.size - 1) / PREFAULT_CHUNK) * PREFAULT_CHUNK; offset >= 0; offset -= PREFAULT_CHUNK) {
          if (this.prefaultStopped || anyTouched(b, offset, Math.min(PREFAULT_CHUNK, b.size - offset))) return;
          await this.prefaultChunk(b, offset);
        }
      }
    };
    run().catch(() => undefined);
  }

  /** The incoming migration has loaded: the background prefault stops after the range it is on. */
  endBackgroundPrefault(): void {
    this.prefaultStopped = true;
  }

  /** Block and offset of a guest-physical address. */
  locate(addr: number): { block: RamBlock; offset: number } {
    if (!Number.isSafeInteger(addr) || addr < 0 || addr >= this.size) {
      throw new Error(`address 0x${addr.toString(16)} is outside guest RAM (0x${this.size.toString(16)} bytes)`);
    }
    const b = Math.floor(addr / MAX_BLOCK_SIZE);
    return { block: this.blocks[b]!, offset: addr - b * MAX_BLOCK_SIZE };
  }

  /** sha256 of every block in 64 MiB chunks hashed in parallel by the helper threads. */
  async digest(): Promise<MemoryDigest> {
    const perBlock = await Promise.all(
      this.blocks.map((b) => {
        const jobs: Promise<Uint8Array>[] = [];
        for (let o = 0; o < b.size; o += DIGEST_CHUNK) {
          const len = Math.min(DIGEST_CHUNK, b.size - o);
          jobs.push(
            this.helpers
              .run({ op: 'digest', buf: b.bytes.buffer as SharedArrayBuffer, offset: o, length: len })
              .then((r) => r.digest as Uint8Array),
          );
        }
        return Promise.all(jobs);
      }),
    );
    const top = createHash('sha256');
    const blocks = this.blocks.map((b, i) => {
      const h = createHash('sha256');
      h.update(`ferry-ram-block\0${b.name}\0${b.size}\0`);
      for (const d of perBlock[i]!) h.update(d);
      const digest = h.digest('hex');
      top.update(`${b.name}\0${b.size}\0${digest}\0`);
      return { name: b.name, size: b.size, digest };
    });
    return { digest: top.digest('hex'), blocks };
  }

  /** Writes guest-physical [addr, addr+size) to filename. */
  async pmemsave(addr: number, size: number, filename: string): Promise<void> {
    if (!Number.isSafeInteger(addr) || addr < 0) throw new Error(`pmemsave: invalid address ${addr}`);
    if (!Number.isSafeInteger(size) || size < 0) throw new Error(`pmemsave: invalid size ${size}`);
    if (addr + size > this.size) {
      throw new Error(
        `pmemsave: range 0x${addr.toString(16)}+0x${size.toString(16)} is beyond guest RAM (0x${this.size.toString(16)} bytes)`,
      );
    }
    const fh = await open(filename, 'w');
    try {
      let a = addr;
      const end = addr + size;
      while (a < end) {
        const { block, offset } = this.locate(a);
        const len = Math.min(end - a, block.size - offset, PMEMSAVE_CHUNK);
        // copy out of the SAB so the write sees a stable snapshot of the chunk
        const buf = Buffer.from(block.bytes.subarray(offset, offset + len));
        let done = 0;
        while (done < len) done += (await fh.write(buf, done, len - done)).bytesWritten;
        a += len;
      }
    } finally {
      await fh.close();
    }
  }

  /** Reads guest-physical memory (a copy). */
  read(addr: number, size: number): Uint8Array {
    if (!Number.isSafeInteger(size) || size < 0 || addr + size > this.size) {
      throw new Error(`read: range 0x${addr.toString(16)}+0x${size.toString(16)} is beyond guest RAM`);
    }
    const out = new Uint8Array(size);
    let a = addr;
    let o = 0;
    while (o < size) {
      const { block, offset } = this.locate(a);
      const len = Math.min(size - o, block.size - offset);
      out.set(block.bytes.subarray(offset, offset + len), o);
      o += len;
      a += len;
    }
    return out;
  }

  /** Ends the helper threads (a later fill, digest or prefault fails). */
  close(): Promise<void> {
    return this.helpers.close();
  }
}
