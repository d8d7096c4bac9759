/**
 * Worker of a CompressPool / DecompressPool (compress-pool.ts). The shared
 * areas arrive once in workerData; each message then names a range of slots
 * [start, start + count) to process, and one reply says the range is done.
 *
 *   compress:   input slot i = 4096-byte page  -> output slot i = zlib stream,
 *               outLen[i] = its length
 *   decompress: input slot i = inLen[i] bytes of zlib stream -> output slot i
 *               = the page, outLen[i] = 4096, or -1 if the stream is invalid
 */
import { parentPort, workerData } from 'node:worker_threads';
import { PAGE_SIZE, PageDeflater, PageInflater } from './zlib-page.js';

export interface CodecWorkerData {
  op: 'compress' | 'decompress';
  input: SharedArrayBuffer;
  inStride: number;
  output: SharedArrayBuffer;
  outStride: number;
  inLen: SharedArrayBuffer;
  outLen: SharedArrayBuffer;
}

export interface CodecTask {
  id: number;
  start: number;
  count: number;
  /** compress only */
  level: number;
}

export interface CodecReply {
  id: number;
  ok: boolean;
  error?: string;
}

const d = workerData as CodecWorkerData;
const input = new Uint8Array(d.input);
const output = new Uint8Array(d.output);
const inLen = new Int32Array(d.inLen);
const outLen = new Int32Array(d.outLen);
const deflaters = new Map<number, PageDeflater>();
let inflater: PageInflater | null = null;
/** spare byte after the page so an over-long stream is caught */
const scratch = new Uint8Array(PAGE_SIZE + 1);

parentPort!.on('message', (t: CodecTask) => {
  try {
    if (d.op === 'compress') {
      let z = deflaters.get(t.level);
      if (z === undefined) {
        z = new PageDeflater(t.level);
        deflaters.set(t.level, z);
      }
      for (let i = t.start, end = t.start + t.count; i < end; i++) {
        outLen[i] = z.deflate(input, i * d.inStride, output, i * d.outStride);
      }
    } else {
      inflater ??= new PageInflater();
      for (let i = t.start, end = t.start + t.count; i < end; i++) {
        if (inflater.inflate(input, i * d.inStride, inLen[i]!, scratch, 0)) {
          output.set(scratch.subarray(0, PAGE_SIZE), i * d.outStride);
          outLen[i] = PAGE_SIZE;
        } else {
          outLen[i] = -1;
        }
      }
    }
    parentPort!.postMessage({ id: t.id, ok: true } satisfies CodecReply);
  } catch (e) {
    parentPort!.postMessage({ id: t.id, ok: false, error: (e as Error).message } satisfies CodecReply);
  }
});
