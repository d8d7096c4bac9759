/**
 * Helper worker: boot fill, prefault and memory digest chunks, over the RAM
 * SharedArrayBuffers (no copies). Messages: HelperTask in, HelperResult out.
 */
import { createHash } from 'node:crypto';
import { parentPort } from 'node:worker_threads';
import { populateWrite } from '../base/native.js';
import { fillRandom, fillText, makeTextPool } from './workload.js';

export type HelperTask =
  | { id: number; op: 'digest'; buf: SharedArrayBuffer; offset: number; length: number }
  | { id: number; op: 'prefault'; buf: SharedArrayBuffer; offset: number; length: number }
  | {
      id: number;
      op: 'fill';
      kind: 'random' | 'text';
      seed: number;
      buf: SharedArrayBuffer;
      offset: number;
      length: number;
      /** global index of the first FILL_CHUNK of this range */
      chunkIndex: number;
      chunkSize: number;
    };

export interface HelperResult {
  id: number;
  ok: boolean;
  digest?: Buffer;
  error?: string;
}

let pool: { seed: number; data: Uint8Array } | null = null;

parentPort!.on('message', (t: HelperTask) => {
  try {
    if (t.op === 'prefault') {
      // Fault [offset, offset + length) in without changing a byte: the
      // loader may be writing into it at the same time. MADV_POPULATE_WRITE
      // where we can, else an atomic add of 0 to one word per 4 KiB page (a
      // locked RMW never loses a concurrent store to the same word). Ranges
      // are small (PREFAULT_CHUNK), so the word count always fits.
      if (!populateWrite(new Uint8Array(t.buf, t.offset, t.length))) {
        const words = new Int32Array(t.buf, t.offset, Math.floor(t.length / 4));
        for (let i = 0; i < words.length; i += 1024) Atomics.add(words, i, 0);
      }
      parentPort!.postMessage({ id: t.id, ok: true } satisfies HelperResult);
    } else if (t.op === 'digest') {
      const h = createHash('sha256');
      h.update(new Uint8Array(t.buf, t.offset, t.length));
      const r: HelperResult = { id: t.id, ok: true, digest: h.digest() };
      parentPort!.postMessage(r);
    } else {
      const bytes = new Uint8Array(t.buf);
      if (t.kind === 'text' && (!pool || pool.seed !== t.seed)) pool = { seed: t.seed, data: makeTextPool(t.seed) };
      for (let o = 0, c = t.chunkIndex; o < t.length; o += t.chunkSize, c++) {
        const len = Math.min(t.chunkSize, t.length - o);
        if (t.kind === 'random') fillRandom(bytes, t.offset + o, len, t.seed, c);
        else fillText(bytes, t.offset + o, len, pool!.data, t.seed, c);
      }
      parentPort!.postMessage({ id: t.id, ok: true } satisfies HelperResult);
    }
  } catch (e) {
    parentPort!.postMessage({ id: t.id, ok: false, error: (e as Error).message } satisfies HelperResult);
  }
});

// Loaded: the pool may terminate this worker from now on without leaving the
// module loader's descriptors open (helpers.ts). Id 0 is never a task's.
parentPort!.postMessage({ id: 0, ok: true } satisfies HelperResult);
