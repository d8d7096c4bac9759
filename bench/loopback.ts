/**
 * Loopback TCP ceiling: one node process pushes `total` bytes from a hot
 * (pre-touched, reused) buffer over 127.0.0.1 to a receiver in a second node
 * process that only counts bytes. Two processes, like a migration's source
 * and destination, so each side has its own event loop (and, on 2 cores, its
 * own core if nothing else runs).
 *
 *   node dist/bench/loopback.js [--total 2G] [--chunk 2M] [--runs 3]
 * Writes bench/results/loopback.json.
 */
import { spawn } from 'node:child_process';
import * as net from 'node:net';
import { fileURLToPath } from 'node:url';
import { parseSize } from '../src/base/size.js';
import { GiB, MiB, median, writeResult } from './lib/common.js';

/** node -e script: listens on 127.0.0.1, prints its port, counts bytes, prints {bytes, ms} at end. */
export const RECEIVER = `
const net = require('node:net');
const srv = net.createServer((s) => {
  let n = 0; let t0 = 0;
  s.on('data', (d) => { if (n === 0) t0 = performance.now(); n += d.length; });
  s.on('end', () => { process.stdout.write(JSON.stringify({ bytes: n, ms: performance.now() - t0 }) + '\\n'); s.end(); srv.close(); });
});
srv.listen(0, '127.0.0.1', () => process.stdout.write(String(srv.address().port) + '\\n'));
`;

export interface LoopbackResult {
  bytes: number;
  ms: number;
  bytesPerSec: number;
}

export async function loopbackOnce(total: number, chunk: number): Promise<LoopbackResult> {
  const child = spawn(process.execPath, ['-e', RECEIVER], { stdio: ['ignore', 'pipe', 'inherit'] });
  let out = '';
  const lines: string[] = [];
  let wake: (() => void) | null = null;
  child.stdout!.on('data', (b: Buffer) => {
    out += b.toString();
    let nl: number;
    while ((nl = out.indexOf('\n')) >= 0) {
      lines.push(out.slice(0, nl));
      out = out.slice(nl + 1);
      wake?.();
    }
  });
  const nextLine = async (): Promise<string> => {
    while (lines.length === 0) await new Promise<void>((r) => (wake = r));
    return lines.shift()!;
  };
  const port = Number(await nextLine());
  const buf = Buffer.alloc(chunk, 0xa5); // hot: touched once, reused
  const sock = await new Promise<net.Socket>((res, rej) => {
    const s = net.createConnection(port, '127.0.0.1');
    s.once('connect', () => res(s));
    s.once('error', rej);
  });
  const t0 = performance.now();
  let sent = 0;
  // same pattern as StreamWriter: one write in flight, wait for its callback
  while (sent < total) {
    const n = Math.min(chunk, total - sent);
    await new Promise<void>((res, rej) => sock.write(n === chunk ? buf : buf.subarray(0, n), (e) => (e ? rej(e) : res())));
    sent += n;
  }
  await new Promise<void>((r) => sock.end(r));
  const rx = JSON.parse(await nextLine()) as { bytes: number; ms: number };
  const ms = performance.now() - t0;
  sock.destroy();
  await new Promise((r) => child.once('exit', r));
  if (rx.bytes !== total) throw new Error(`loopback: receiver got ${rx.bytes} of ${total}`);
  return { bytes: total, ms, bytesPerSec: total / (ms / 1000) };
}

export async function measureLoopback(total = 2 * GiB, chunk = 2 * MiB, runs = 3): Promise<Record<string, unknown>> {
  const r: LoopbackResult[] = [];
  for (let i = 0; i < runs; i++) r.push(await loopbackOnce(total, chunk));
  const m = median(r.map((x) => x.bytesPerSec));
  console.log(
    `loopback tcp 127.0.0.1, node→node, ${chunk / MiB} MiB hot chunks, ${(total / GiB).toFixed(1)} GiB: ` +
      `median ${(m / MiB).toFixed(0)} MiB/s (${r.map((x) => (x.bytesPerSec / MiB).toFixed(0)).join(', ')})`,
  );
  return { bench: 'loopback', totalBytes: total, chunkBytes: chunk, runs: r, medianBytesPerSec: m };
}

function arg(name: string, dflt: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && process.argv[i + 1] ? process.argv[i + 1]! : dflt;
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const res = await measureLoopback(parseSize(arg('total', '2G')), parseSize(arg('chunk', '2M')), Number(arg('runs', '3')));
  writeResult('loopback', { ...res, date: new Date().toISOString(), node: process.version });
}
