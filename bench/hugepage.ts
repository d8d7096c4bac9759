/**
 * Huge pages for guest RAM (native/hugepage addon) and the first-touch cost
 * of fresh SharedArrayBuffer memory, the two memory effects of a migration:
 *
 *   receive:  the destination copies 4 KiB pages out of 64 KiB socket chunks
 *             into fresh (never touched) RAM, as RamLoader does
 *             (fresh, fresh+MADV_HUGEPAGE, and hot = the same memory again)
 *   send:     the source copies 4 KiB pages of populated, cache-cold RAM
 *             into a 2 MiB staging buffer (as RamSender does) and writes it to
 *             a receiver process over 127.0.0.1 (with and without MADV_HUGEPAGE
 *             applied before the RAM was filled); also the copy stage alone
 *
 *   node dist/bench/hugepage.js [--size 512M] [--runs 3]
 * Without the addon built only the plain variants run.
 * Writes bench/results/hugepage.json.
 */
import { spawn } from 'node:child_process';
import { createRequire } from 'node:module';
import * as net from 'node:net';
import { join } from 'node:path';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { parseSize } from '../src/base/size.js';
import { RECEIVER } from './loopback.js';
import { MiB, REPO_ROOT, median, writeResult } from './lib/common.js';

interface Hugepage {
  available: boolean;
  madviseHugepage(b: SharedArrayBuffer | ArrayBufferView): boolean;
}
const hp = createRequire(import.meta.url)(join(REPO_ROOT, 'native/hugepage/index.cjs')) as Hugepage;

setFlagsFromString('--expose-gc');
const gc = runInNewContext('gc') as () => void;

function arg(name: string, dflt: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && process.argv[i + 1] ? process.argv[i + 1]! : dflt;
}
const size = parseSize(arg('size', '512M'));
const runs = Math.max(1, Number(arg('runs', '3')));
const PAGE = 4096;
const CHUNK = 64 * 1024;

/** Receive: copy pages from a hot 64 KiB chunk into `ram`, in order. Returns µs per page. */
function receiveInto(ram: Buffer): number {
  const chunk = Buffer.alloc(CHUNK, 0x5a);
  const t0 = performance.now();
  for (let off = 0; off < ram.length; off += CHUNK) {
    for (let p = 0; p < CHUNK; p += PAGE) chunk.copy(ram, off + p, p, p + PAGE);
  }
  return ((performance.now() - t0) * 1000) / (ram.length / PAGE);
}

function freshRam(huge: boolean): { sab: SharedArrayBuffer; buf: Buffer; advised: boolean } {
  gc();
  const sab = new SharedArrayBuffer(size);
  const advised = huge ? hp.madviseHugepage(sab) : false;
  return { sab, buf: Buffer.from(sab), advised };
}

/** Fill populated RAM with a cheap non-zero pattern (touches every page). */
function populate(buf: Buffer): void {
  const seed = Buffer.alloc(MiB);
  for (let i = 0; i < seed.length; i += 4) seed.writeUInt32LE((i * 2654435761) >>> 0, i);
  for (let off = 0; off < buf.length; off += MiB) seed.copy(buf, off);
}

/** Evict `ram` from the CPU caches by streaming through a 64 MiB other buffer. */
const evictor = Buffer.alloc(64 * MiB, 1);
function evict(): void {
  let s = 0;
  for (let i = 0; i < evictor.length; i += 64) s += evictor[i]!;
  if (s < 0) console.log(s);
}

/** Copy stage only: pages into a 2 MiB staging buffer, as RamSender. Returns MiB/s. */
function copyStage(ram: Buffer): number {
  const staging = Buffer.allocUnsafeSlow(2 * MiB);
  evict();
  const t0 = performance.now();
  for (let off = 0; off < ram.length; off += 2 * MiB) {
    for (let p = 0; p < 2 * MiB; p += PAGE) ram.copy(staging, p, off + p, off + p + PAGE);
  }
  return ram.length / MiB / ((performance.now() - t0) / 1000);
}

/** Copy into double-buffered 2 MiB staging and write to a receiver process. Returns MiB/s. */
async function sendOver(ram: Buffer): Promise<number> {
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
  const next = async (): Promise<string> => {
    while (!lines.length) await new Promise<void>((r) => (wake = r));
    return lines.shift()!;
  };
  const port = Number(await next());
  const sock = await new Promise<net.Socket>((res, rej) => {
    const s = net.createConnection(port, '127.0.0.1');
    s.once('connect', () => res(s));
    s.once('error', rej);
  });
  const bufs = [Buffer.allocUnsafeSlow(2 * MiB), Buffer.allocUnsafeSlow(2 * MiB)];
  evict();
  const t0 = performance.now();
  let inflight: Promise<void> | null = null;
  for (let off = 0, k = 0; off < ram.length; off += 2 * MiB, k ^= 1) {
    const st = bufs[k]!;
    for (let p = 0; p < 2 * MiB; p += PAGE) ram.copy(st, p, off + p, off + p + PAGE);
    if (inflight) await inflight;
    inflight = new Promise<void>((res, rej) => sock.write(st, (e) => (e ? rej(e) : res())));
  }
  if (inflight) await inflight;
  await new Promise<void>((r) => sock.end(r));
  await next();
  const ms = performance.now() - t0;
  sock.destroy();
  await new Promise((r) => child.once('exit', r));
  return ram.length / MiB / (ms / 1000);
}

const variants = hp.available ? [false, true] : [false];
const rx: Record<string, number[]> = { fresh4k: [], hot4k: [], freshHuge: [], hotHuge: [] };
const tx: Record<string, number[]> = { copy4k: [], copyHuge: [], send4k: [], sendHuge: [] };
let advisedOk = true;
for (let i = 0; i < runs; i++) {
  for (const huge of i % 2 ? [...variants].reverse() : variants) {
    const r = freshRam(huge);
    if (huge) advisedOk &&= r.advised;
    rx[huge ? 'freshHuge' : 'fresh4k']!.push(receiveInto(r.buf));
    rx[huge ? 'hotHuge' : 'hot4k']!.push(receiveInto(r.buf));
  }
}
for (let i = 0; i < runs; i++) {
  for (const huge of i % 2 ? [...variants].reverse() : variants) {
    const r = freshRam(huge);
    populate(r.buf);
    tx[huge ? 'copyHuge' : 'copy4k']!.push(copyStage(r.buf));
    tx[huge ? 'sendHuge' : 'send4k']!.push(await sendOver(r.buf));
  }
}

const med = (a: number[]): number | null => (a.length ? median(a) : null);
const usToMiBs = (us: number | null): number | null => (us ? PAGE / MiB / (us / 1e6) : null);
const res = {
  bench: 'hugepage',
  date: new Date().toISOString(),
  node: process.version,
  addon: hp.available,
  madviseOk: hp.available ? advisedOk : null,
  sizeBytes: size,
  runs,
  receiveUsPerPage: Object.fromEntries(Object.entries(rx).map(([k, v]) => [k, { runs: v, median: med(v) }])),
  receiveMiBps: Object.fromEntries(Object.entries(rx).map(([k, v]) => [k, usToMiBs(med(v))])),
  sendMiBps: Object.fromEntries(Object.entries(tx).map(([k, v]) => [k, { runs: v, median: med(v) }])),
};
const f = (v: number | null, d = 2): string => (v === null ? '-' : v.toFixed(d));
console.log(`hugepage bench, ${size / MiB} MiB, median of ${runs}; addon ${hp.available ? 'loaded' : 'NOT built (plain only)'}`);
console.log(
  `  receive into fresh SAB, 4 KiB pages: ${f(med(rx.fresh4k!))} µs/page (${f(usToMiBs(med(rx.fresh4k!)), 0)} MiB/s); ` +
    `same memory again (hot): ${f(med(rx.hot4k!))} µs/page (${f(usToMiBs(med(rx.hot4k!)), 0)} MiB/s)`,
);
if (hp.available) {
  console.log(
    `  receive into fresh SAB + MADV_HUGEPAGE: ${f(med(rx.freshHuge!))} µs/page (${f(usToMiBs(med(rx.freshHuge!)), 0)} MiB/s); ` +
      `hot: ${f(med(rx.hotHuge!))} µs/page`,
  );
}
console.log(
  `  source copy stage (cold RAM → 2 MiB staging): 4 KiB ${f(med(tx.copy4k!), 0)} MiB/s` +
    (hp.available ? `, huge ${f(med(tx.copyHuge!), 0)} MiB/s` : ''),
);
console.log(
  `  source send over 127.0.0.1 (copy + write): 4 KiB ${f(med(tx.send4k!), 0)} MiB/s` +
    (hp.available ? `, huge ${f(med(tx.sendHuge!), 0)} MiB/s` : ''),
);
writeResult('hugepage', res);
