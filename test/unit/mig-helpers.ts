/** Shared helpers of the mig-*.test.ts files (byte-level migration layer). */
import path from 'node:path';
import { Writable } from 'node:stream';
import { fileURLToPath } from 'node:url';
import type { MigratableDevice, RamBlock } from '../../src/machine/types.js';
import { readDeviceSection } from '../../src/migration/devices.js';
import type { RamLoader } from '../../src/migration/ram/loader.js';
import type { StreamReader } from '../../src/migration/stream/reader.js';
import { WIRE } from '../../src/migration/wire/constants.js';
import { ERR, MigrationStreamError } from '../../src/migration/wire/errors.js';
import { readConfiguration, readFooter, readHeader, readSectionPartEnd, readSectionStartFull, readVmdesc } from '../../src/migration/wire/records.js';

const here = path.dirname(fileURLToPath(import.meta.url));
/** dist/test/unit -> repo root */
export const repoRoot = path.resolve(here, '../../..');
/** The stream vectors (test/golden/streams, copied from the spec with its README). */
export const vectorsDir = path.resolve(repoRoot, 'test/golden/streams');
/**
 * Always false: the vectors are in the repository. Kept because
 * mig-compress.test.ts still passes it as its `skip` option.
 */
export const skipVectors = false;

export function makeBlock(name: string, size: number): RamBlock {
  const pages = size / 4096;
  return {
    name,
    size,
    pages,
    bytes: new Uint8Array(new SharedArrayBuffer(size)),
    dirty: new Int32Array(new SharedArrayBuffer(Math.ceil(pages / 32) * 4)),
    // tests write blocks directly: every page may hold data
    touched: new Uint32Array(Math.ceil(pages / 32)).fill(0xffffffff),
    present: new Int32Array(new SharedArrayBuffer(Math.ceil(pages / 32) * 4)).fill(-1),
  };
}

export function markDirty(b: RamBlock, page: number): void {
  Atomics.or(b.dirty, page >>> 5, 1 << (page & 31));
}

/** A Writable that keeps everything. */
export class Collector extends Writable {
  chunks: Buffer[] = [];
  override _write(chunk: Buffer, _enc: BufferEncoding, cb: (e?: Error | null) => void): void {
    this.chunks.push(Buffer.from(chunk));
    cb();
  }
  get data(): Buffer {
    return Buffer.concat(this.chunks);
  }
}

/** A device with a fixed raw payload (like timer/globalstate). */
export function fixedDevice(idstr: string, version: number, payload: Uint8Array, instanceId = 0): MigratableDevice & { loaded?: Uint8Array } {
  const d: MigratableDevice & { loaded?: Uint8Array } = {
    idstr,
    instanceId,
    version,
    minVersion: 1,
    save: () => payload,
    load: (data: Uint8Array) => {
      d.loaded = Buffer.from(data);
    },
    payloadSize: () => payload.length,
  };
  return d;
}

/** Minimal destination section loop used by the tests (the real one lives in core/). */
export async function loadStream(
  r: StreamReader,
  loader: RamLoader,
  devices: ReadonlyMap<string, MigratableDevice>,
  machine = 'none',
): Promise<{ vmdesc: string | null }> {
  await readHeader(r);
  await readConfiguration(r, machine);
  const live = new Map<number, string>();
  for (;;) {
    if (!r.has(1)) await r.ensure(1);
    const t = r.get8();
    if (t === WIRE.SECTION.EOF) break;
    if (t === WIRE.SECTION.START) {
      const h = await readSectionStartFull(r);
      if (h.idstr !== 'ram') throw new MigrationStreamError(ERR.unknownSection(h.idstr, h.instanceId));
      live.set(h.sectionId, h.idstr);
      await loader.loadSection(r, h.versionId);
      await readFooter(r, h.idstr, h.sectionId);
    } else if (t === WIRE.SECTION.FULL) {
      await readDeviceSection(r, devices);
    } else if (t === WIRE.SECTION.PART || t === WIRE.SECTION.END) {
      const { sectionId } = await readSectionPartEnd(r);
      const idstr = live.get(sectionId);
      if (!idstr) throw new MigrationStreamError(ERR.unknownSectionId(sectionId));
      await loader.loadSection(r, 4);
      await readFooter(r, idstr, sectionId);
    } else {
      throw new MigrationStreamError(ERR.unknownSectionType(t));
    }
  }
  return { vmdesc: (await readVmdesc(r)).json };
}

/** Deterministic PRNG (xorshift32). */
export function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x;
  };
}

export function fillRandom(buf: Uint8Array, next: () => number): void {
  for (let i = 0; i < buf.length; i++) buf[i] = next() & 0xff;
}
