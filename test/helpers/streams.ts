/**
 * Stream builders and small migration helpers for the mig-* integration tests.
 *
 * Bad-stream tests start from a real stream (captured from a source VM with
 * `exec:cat > FILE`) and mutate it, or build a short stream by hand with the
 * wire encoders (`ByteSink` implemented over a growable Buffer).
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { ByteSink } from '../../src/migration/stream/writer.js';
import { WIRE } from '../../src/migration/wire/constants.js';
import { putConfiguration, putEof, putFooter, putHeader, putSectionStartFull } from '../../src/migration/wire/records.js';
import { runMigration } from './migration.js';

/** A ByteSink that collects into memory. */
export class BufSink implements ByteSink {
  private chunks: Buffer[] = [];
  put8(v: number): void {
    this.chunks.push(Buffer.from([v & 0xff]));
  }
  put16(v: number): void {
    const b = Buffer.alloc(2);
    b.writeUInt16BE(v);
    this.chunks.push(b);
  }
  put32(v: number): void {
    const b = Buffer.alloc(4);
    b.writeUInt32BE(v >>> 0);
    this.chunks.push(b);
  }
  put64(v: number): void {
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(BigInt(v));
    this.chunks.push(b);
  }
  put64Parts(hi: number, lo: number): void {
    this.put32(hi);
    this.put32(lo);
  }
  putBytes(src: Uint8Array, offset = 0, length = src.length - offset): void {
    this.chunks.push(Buffer.from(src.subarray(offset, offset + length)));
  }
  putCountedString(s: string): void {
    const b = Buffer.from(s, 'utf8');
    this.put8(b.length);
    this.putBytes(b);
  }
  bytes(): Buffer {
    return Buffer.concat(this.chunks);
  }
}

/** Offsets of the interesting records of a real (captured) Ferry stream. */
export interface StreamLayout {
  /** byte after magic + version */
  headerEnd: number;
  /** offset of the CONFIGURATION record type byte */
  config: number;
  /** offset of the machine name bytes and their length */
  machineName: number;
  machineNameLen: number;
  /** offset of the ram START record type byte */
  ramStart: number;
  /** offset of the ram START idstr length byte */
  ramIdstr: number;
  /** offset of the be32 section version of the ram START record */
  ramVersion: number;
  /** offset of the MEM_SIZE header word */
  memSize: number;
  /** first block: offset of its be64 used_length */
  firstBlockLength: number;
  firstBlockName: string;
}

export function parseLayout(b: Buffer): StreamLayout {
  if (b.readUInt32BE(0) !== WIRE.MAGIC) throw new Error('not a captured stream');
  const config = 8;
  if (b[config] !== WIRE.SECTION.CONFIGURATION) throw new Error('no configuration record');
  const machineNameLen = b.readUInt32BE(config + 1);
  const machineName = config + 5;
  let p = machineName + machineNameLen;
  // skip COMMAND records (return path) until the ram START
  while (b[p] === WIRE.SECTION.COMMAND) {
    const len = b.readUInt16BE(p + 3);
    p += 5 + len;
  }
  const ramStart = p;
  if (b[p] !== WIRE.SECTION.START) throw new Error(`expected START at ${p}, got ${b[p]}`);
  const ramIdstr = p + 5;
  const idlen = b[ramIdstr]!;
  const ramVersion = ramIdstr + 1 + idlen + 4;
  const memSize = ramVersion + 4;
  const nameLen = b[memSize + 8]!;
  const firstBlockName = b.subarray(memSize + 9, memSize + 9 + nameLen).toString('utf8');
  const firstBlockLength = memSize + 9 + nameLen;
  return {
    headerEnd: 8,
    config,
    machineName,
    machineNameLen,
    ramStart,
    ramIdstr,
    ramVersion,
    memSize,
    firstBlockLength,
    firstBlockName,
  };
}

/** Offset of the first full-page (PAGE flag) record header at or after `from`, or -1. */
export function findPageRecord(b: Buffer, from: number): number {
  for (let p = from; p + 8 <= b.length; p++) {
    // header word: offset | flags; a PAGE record of the first block carries CONTINUE or the block name
    const lo = b.readUInt32BE(p + 4);
    const flags = lo & 0xfff;
    if ((flags === WIRE.RAM.PAGE || flags === (WIRE.RAM.PAGE | WIRE.RAM.CONTINUE)) && (lo & ~0xfff) % 4096 === 0) {
      // PAGE with CONTINUE: 4096 data bytes follow; without: a counted block name first
      if (flags === WIRE.RAM.PAGE) {
        const n = b[p + 8]!;
        if (n > 0 && n < 64 && /^[\x20-\x7e]+$/.test(b.subarray(p + 9, p + 9 + n).toString('latin1'))) return p;
      } else return p;
    }
  }
  return -1;
}

/** Header + configuration (+ optional extra records) built with the wire encoders. */
export function buildStream(opts: { magic?: number; version?: number; machine?: string; body?: (w: BufSink) => void } = {}): Buffer {
  const w = new BufSink();
  if (opts.magic !== undefined || opts.version !== undefined) {
    w.put32(opts.magic ?? WIRE.MAGIC);
    w.put32(opts.version ?? WIRE.VERSION);
  } else {
    putHeader(w);
  }
  putConfiguration(w, opts.machine ?? 'none');
  opts.body?.(w);
  return w.bytes();
}

/** A stream whose first section is a START of an unknown device. */
export function unknownSectionStream(idstr = 'bogus-dev'): Buffer {
  return buildStream({
    body: (w) => {
      putSectionStartFull(w, WIRE.SECTION.START, 2, idstr, 0, 1);
      putFooter(w, 2);
      putEof(w);
    },
  });
}

export interface Capture {
  file: string;
  bytes: Buffer;
  digest: string;
}

/**
 * Migrate a paused source VM into `exec:cat > FILE` and return the stream.
 * The source is paused (stop) first so that its digest matches the stream.
 */
export async function captureStream(dir: string, args: string[], name = 'cap'): Promise<Capture> {
  const file = join(dir, `${name}.mig`);
  let digest = '';
  await runMigration({
    dir,
    source: { name: `${name}-src`, args },
    destination: null,
    transport: { uri: `exec:cat > ${file}` },
    before: ({ src }) => src.execute('stop'),
    after: async ({ src }) => void (digest = await src.digest()),
  });
  return { file, bytes: readFileSync(file), digest };
}

export function writeStream(dir: string, name: string, b: Buffer): string {
  const f = join(dir, name);
  writeFileSync(f, b);
  return f;
}
