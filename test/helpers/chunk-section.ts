/**
 * A test-only live section, `test-chunks`: a byte store in 4 KiB chunks with
 * a dirty set, migrated beside RAM the way a disk would be. It proves that a
 * new section needs nothing but a SectionType (no line of the state
 * machines), and it exercises the generic paths: pending sums, slices over
 * several sections, END at completion, and at the postcopy switch for a
 * section that cannot do postcopy.
 *
 * Payload: records of (be32 chunk index, 4096 bytes), ended by be32 0xffffffff.
 * START carries the chunk count (be32) before the records.
 */
import type { SectionType, LiveSection, SectionLoader } from '../../src/migration/index.js';
import type { Pending } from '../../src/migration/sections/section.js';
import type { StreamReader } from '../../src/migration/stream/reader.js';
import type { StreamWriter } from '../../src/migration/stream/writer.js';
import { MigrationStreamError } from '../../src/migration/wire/errors.js';

export const CHUNK = 4096;
const END = 0xffffffff;

export class ChunkStore {
  readonly bytes: Uint8Array;
  readonly dirty = new Set<number>();
  /** Per migration: START, PART, END sections written (source) or loaded (destination). */
  readonly sections = { start: 0, part: 0, end: 0 };
  cleanups = 0;

  constructor(readonly chunks: number) {
    this.bytes = new Uint8Array(chunks * CHUNK);
  }

  /** Overwrite chunk `i` with a pattern from `seed`, and mark it dirty. */
  write(i: number, seed: number): void {
    let x = (seed * 2654435761 + i) >>> 0 || 1;
    const c = this.bytes.subarray(i * CHUNK, (i + 1) * CHUNK);
    for (let k = 0; k < CHUNK; k += 4) {
      x ^= x << 13;
      x ^= x >>> 17;
      x ^= x << 5;
      c[k] = x & 0xff;
      c[k + 1] = (x >>> 8) & 0xff;
      c[k + 2] = (x >>> 16) & 0xff;
      c[k + 3] = x >>> 24;
    }
    this.dirty.add(i);
  }
}

class ChunkSave implements LiveSection {
  readonly idstr = 'test-chunks';
  readonly instanceId = 0;
  readonly version: number;

  constructor(private readonly store: ChunkStore, version: number) {
    this.version = version;
    // every chunk goes at least once
    for (let i = 0; i < store.chunks; i++) store.dirty.add(i);
  }

  setup(w: StreamWriter): void {
    this.store.sections.start++;
    w.put32(this.store.chunks);
    w.put32(END);
  }

  pending(): Pending {
    return { precopy: this.store.dirty.size * (CHUNK + 4), postcopy: 0 };
  }

  private send(w: StreamWriter, max: number): void {
    let n = 0;
    for (const i of this.store.dirty) {
      if (n++ >= max) break;
      this.store.dirty.delete(i);
      w.put32(i);
      w.putBytes(this.store.bytes, i * CHUNK, CHUNK);
    }
    w.put32(END);
  }

  iterate(w: StreamWriter): void {
    this.store.sections.part++;
    this.send(w, 4); // a few chunks a slice, so that it takes several slices
  }

  async completePrecopy(w: StreamWriter): Promise<void> {
    this.store.sections.end++;
    this.send(w, Infinity);
  }

  cleanup(): void {
    this.store.cleanups++;
  }
}

class ChunkLoad implements SectionLoader {
  constructor(private readonly store: ChunkStore) {}

  async load(r: StreamReader, kind: 'start' | 'part' | 'end' | 'full'): Promise<void> {
    if (kind === 'start' || kind === 'part' || kind === 'end') this.store.sections[kind]++;
    if (kind === 'start') {
      if (!r.has(4)) await r.ensure(4);
      const n = r.get32();
      if (n !== this.store.chunks) throw new MigrationStreamError(`test-chunks: ${n} chunks, here ${this.store.chunks}`);
    }
    for (;;) {
      if (!r.has(4)) await r.ensure(4);
      const i = r.get32();
      if (i === END) return;
      if (i >= this.store.chunks) throw new MigrationStreamError(`test-chunks: chunk ${i} out of range`);
      if (!r.has(CHUNK)) await r.ensure(CHUNK);
      r.copyTo(this.store.bytes, i * CHUNK, CHUNK);
    }
  }

  cleanup(): void {
    this.store.cleanups++;
  }
}

/** The `test-chunks` section type over `store` (one store per side). */
export function chunkSection(store: ChunkStore, version = 1): SectionType {
  return {
    idstr: 'test-chunks',
    instanceId: 0,
    version,
    minVersion: 1,
    save: () => new ChunkSave(store, version),
    load: () => new ChunkLoad(store),
  };
}
