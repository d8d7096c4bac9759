/** Shared helpers of the mig-*.test.ts files (byte-level migration layer). */
import path from 'node:path';
import { Writable } from 'node:stream';
import { fileURLToPath } from 'node:url';
import type { MigratableDevice, RamBlock } from '../../src/machine/types.js';
import { loadStream as loadWithLoop } from '../../src/migration/core/load-loop.js';
import { inspectStream, type InspectOptions, type InspectedRecord } from '../../src/migration/inspect.js';
import type { RamLoader } from '../../src/migration/ram/loader.js';
import { deviceLoader, findDevice } from '../../src/migration/sections/device-sections.js';
import type { StreamReader } from '../../src/migration/stream/reader.js';
import { WIRE } from '../../src/migration/wire/constants.js';
import { readVmdesc } from '../../src/migration/wire/records.js';

const here = path.dirname(fileURLToPath(import.meta.url));
/** dist/test/unit -> repo root */
export const repoRoot = path.resolve(here, '../../..');
/** The stream vectors (test/golden/streams, copied from the spec with its README). */
export const vectorsDir = path.resolve(repoRoot, 'test/golden/streams');

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

/**
 * Load a stream into `loader` (its `ram` sections) and `devices` (FULL
 * sections) through the destination's own loop (core/load-loop.ts), then
 * read the vmdesc trailer. Commands are accepted and ignored.
 */
export async function loadStream(
  r: StreamReader,
  loader: RamLoader,
  devices: readonly MigratableDevice[],
  machine = 'none',
): Promise<{ vmdesc: string | null }> {
  await loadWithLoop(r, {
    section(kind, idstr, instanceId) {
      if (kind === 'start') {
        if (idstr !== WIRE.RAM.IDSTR || instanceId !== 0) return undefined;
        return { loader: { load: (rd, _k, v) => loader.loadSection(rd, v) }, version: WIRE.RAM.VERSION, minVersion: WIRE.RAM.VERSION };
      }
      const d = findDevice(devices, idstr, instanceId);
      return d && { loader: deviceLoader(d), version: d.version, minVersion: d.minVersion };
    },
    command() {},
  }, { machineType: machine });
  return { vmdesc: (await readVmdesc(r)).json };
}

/** The records of a whole stream in memory (migration/inspect.ts). */
export async function parseStream(buf: Uint8Array, opts: InspectOptions = {}): Promise<InspectedRecord[]> {
  return (await inspectStream(buf, opts)).records;
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
