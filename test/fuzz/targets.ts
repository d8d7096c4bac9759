/**
 * The fuzz targets, one function each over the fuzzer's bytes. A target
 * returns normally when its code accepted or rejected the input the way it
 * means to (a typed rejection: a MigrationFailure of kind `stream`, a
 * BlockError, a QMP parse error text, xbzrle's -1) and throws for anything
 * else: that is a finding. The input sizes are capped here so that memory
 * stays bounded whatever the bytes ask for.
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BlockError, openImage } from '../../src/block/index.js';
import { MigrationFailure } from '../../src/migration/errors.js';
import { inspectStream } from '../../src/migration/inspect.js';
import { xbzrleDecode } from '../../src/migration/codec/xbzrle-codec.js';
import { JsonStreamParser } from '../../src/qmp/json.js';
import { COMMANDS } from '../../src/generated/qapi-commands.js';
import { QmpError } from '../../src/qapi/errors.js';
import { StreamReader } from '../../src/migration/stream/reader.js';
import { readRpMessage } from '../../src/migration/wire/records.js';

export interface Target {
  name: string;
  /** what `-i` instruments (paths under dist/) */
  instrument: string[];
  /** seed corpus directory, from the repository root */
  seeds: string;
  run(data: Buffer): void | Promise<void>;
  sync: boolean;
}

function rejectedByKind(e: unknown, kinds: string[]): void {
  if (e instanceof MigrationFailure && kinds.includes(e.kind)) return;
  throw e;
}

let tmp: string | null = null;

export const TARGETS: Target[] = [
  {
    name: 'qmp-json',
    instrument: ['src/qmp/json'],
    seeds: 'test/fuzz/corpus/qmp-json',
    sync: true,
    run(data) {
      // chunk sizes from the first byte: the streaming lexer must not care where a chunk ends
      const p = new JsonStreamParser({ maxBytes: 1 << 16, maxTokens: 1 << 12, maxDepth: 64 });
      const step = 1 + (data.length ? data[0]! : 0);
      for (let i = 1; i < data.length; i += step) {
        for (const r of p.feed(data.subarray(i, i + step))) {
          if (!r.ok && !/^(JSON parse error, |JSON (token size|token count|nesting depth) limit exceeded$)/.test(r.error)) {
            throw new Error(`not a QMP parse error text: ${r.error}`);
          }
        }
      }
    },
  },
  {
    // whole command objects: JSON, then the schema's argument validation of the command they name
    name: 'qmp-commands',
    instrument: ['src/qmp/json', 'src/generated/qapi-validators', 'src/qapi/'],
    seeds: 'test/fuzz/corpus/qmp-commands',
    sync: true,
    run(data) {
      const p = new JsonStreamParser({ maxBytes: 1 << 16, maxTokens: 1 << 12, maxDepth: 64 });
      for (const r of p.feed(data)) {
        if (!r.ok || typeof r.value !== 'object' || r.value === null || Array.isArray(r.value)) continue;
        const req = r.value as Record<string, unknown>;
        const def = typeof req.execute === 'string' ? COMMANDS.get(req.execute) : undefined;
        const args = req.arguments ?? {};
        if (!def || typeof args !== 'object' || args === null || Array.isArray(args)) continue;
        try {
          def.validate(args as Record<string, unknown>);
        } catch (e) {
          if (!(e instanceof QmpError)) throw e;
        }
      }
    },
  },
  {
    name: 'return-path',
    instrument: ['src/migration/wire/', 'src/migration/stream/'],
    seeds: 'test/fuzz/corpus/return-path',
    sync: false,
    async run(data) {
      const r = StreamReader.fromBuffer(data);
      try {
        while (!r.atEnd) await readRpMessage(r);
      } catch (e) {
        rejectedByKind(e, ['stream']);
      }
    },
  },
  {
    name: 'migration-stream',
    instrument: ['src/migration/'],
    seeds: 'test/fuzz/corpus/migration-stream',
    sync: false,
    async run(data) {
      try {
        await inspectStream(data, { keepRecords: false });
      } catch (e) {
        rejectedByKind(e, ['stream']);
      }
    },
  },
  {
    name: 'xbzrle',
    instrument: ['src/migration/codec/xbzrle'],
    seeds: 'test/fuzz/corpus/xbzrle',
    sync: true,
    run(data) {
      const page = new Uint8Array(4096);
      const n = xbzrleDecode(data, 0, data.length, page);
      if (n < -1 || n > page.length) throw new Error(`xbzrleDecode returned ${n}`);
    },
  },
  {
    name: 'qcow2',
    instrument: ['src/block/'],
    seeds: 'test/fuzz/corpus/qcow2',
    sync: false,
    async run(data) {
      tmp ??= mkdtempSync(join(tmpdir(), 'ferry-fuzz-qcow2-'));
      const file = join(tmp, 'img.qcow2');
      writeFileSync(file, data);
      let img;
      try {
        img = await openImage(file, { format: 'qcow2', readOnly: true, l2CacheBytes: 1 << 16 });
        const buf = Buffer.alloc(4096);
        const size = img.virtualSize;
        for (const off of [0, 65536, Math.max(0, size - 4096)]) {
          if (off + 4096 <= size) await img.read(off, buf);
        }
        if (size > 0) await img.blockStatus(0, Math.min(size, 1 << 20));
      } catch (e) {
        if (!(e instanceof BlockError)) throw e;
      } finally {
        await img?.close();
      }
    },
  },
];

export function cleanupTargets(): void {
  if (tmp) rmSync(tmp, { recursive: true, force: true });
  tmp = null;
}
