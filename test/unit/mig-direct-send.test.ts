/**
 * Direct sends: the sender writes RAM records to a plain socket straight out
 * of guest RAM (native/pages sendPages), with the staging buffer used only
 * for what the socket does not take at once. The bytes on the wire must be
 * exactly those of the staging path, whatever the socket takes.
 */
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtempSync, openSync, readFileSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { sendPageRun } from '../../src/base/native.js';
import { RamSender } from '../../src/migration/ram/sender.js';
import { StreamWriter } from '../../src/migration/stream/writer.js';
import { MigrationStreamError } from '../../src/migration/wire/errors.js';
import type { RamBlock } from '../../src/machine/types.js';
import { Collector, fillRandom, makeBlock, markDirty, rng } from './mig-helpers.js';

const PAGE = 4096;

/** A 16 MiB block: random pages, all-zero pages that were written, never-written pages. */
function guest(): RamBlock {
  const b = makeBlock('pc.ram', 16 << 20);
  fillRandom(b.bytes, rng(7));
  const next = rng(9);
  for (let p = 0; p < b.pages; p++) {
    const r = next() % 10;
    if (r === 0) b.bytes.fill(0, p * PAGE, (p + 1) * PAGE); // written, all zero
    if (r === 1) b.touched[p >>> 5] = (b.touched[p >>> 5]! & ~(1 << (p & 31))) >>> 0; // never written
  }
  return b;
}

/** A staged prefix, a full pass, then a second pass over pages dirtied meanwhile. */
async function send(w: StreamWriter, block: RamBlock): Promise<void> {
  const sender = new RamSender([block]);
  w.put32(0x5145564d);
  sender.syncDirtyLog();
  while (!sender.sendPages(w, { maxMillis: Infinity }).done) await w.flush();
  for (let p = 3; p < block.pages; p += 7) {
    block.bytes[p * PAGE + 100] ^= 0xff;
    markDirty(block, p);
  }
  sender.syncDirtyLog();
  w.put32(0x0a0b0c0d);
  while (!sender.sendPages(w, { maxMillis: Infinity }).done) await w.flush();
  w.put32(0x0e0f1011);
  await w.drain();
}

async function reference(): Promise<Buffer> {
  const c = new Collector();
  await send(new StreamWriter(c), guest());
  return c.data;
}

/** The receiving end, in a process of its own (as a destination is): reads everything, starting after delayMs. */
const RECEIVER = `
const net = require('node:net'), crypto = require('node:crypto');
const [kind, path, delay] = process.argv.slice(-3);
const h = crypto.createHash('sha256');
let n = 0;
const srv = net.createServer((s) => {
  s.pause();
  setTimeout(() => s.resume(), Number(delay));
  s.on('data', (d) => { h.update(d); n += d.length; });
  s.on('end', () => { process.stdout.write(JSON.stringify({ n, sha: h.digest('hex') }) + '\\n'); srv.close(); });
});
srv.listen(kind === 'tcp' ? { port: 0, host: '127.0.0.1' } : { path }, () => process.stdout.write(JSON.stringify(srv.address()) + '\\n'));
`;

async function overSocket(kind: 'tcp' | 'unix', delayMs: number): Promise<{ n: number; sha: string; w: StreamWriter }> {
  const dir = mkdtempSync(join(tmpdir(), 'ferry-direct-'));
  const child = spawn(process.execPath, ['-e', RECEIVER, '--', kind, join(dir, 'sock'), String(delayMs)], { stdio: ['ignore', 'pipe', 'inherit'] });
  try {
    const lines: string[] = [];
    let buf = '';
    const line = (): Promise<string> => new Promise((resolve, reject) => {
      const check = (): void => {
        const i = buf.indexOf('\n');
        if (i < 0) return;
        child.stdout.off('data', onData);
        child.off('exit', onExit);
        const l = buf.slice(0, i);
        buf = buf.slice(i + 1);
        resolve(l);
      };
      const onData = (d: Buffer): void => { buf += d.toString(); check(); };
      const onExit = (): void => reject(new Error('the receiver exited'));
      child.stdout.on('data', onData);
      child.once('exit', onExit);
      check();
    });
    const a = JSON.parse(await line()) as string | { port: number };
    lines.push(JSON.stringify(a));
    const sock = net.connect(typeof a === 'string' ? { path: a } : { port: a.port, host: '127.0.0.1' });
    await new Promise<void>((r) => sock.once('connect', r));
    const w = new StreamWriter(sock);
    await send(w, guest());
    sock.end();
    const got = JSON.parse(await line()) as { n: number; sha: string };
    return { ...got, w };
  } finally {
    child.kill();
    rmSync(dir, { recursive: true, force: true });
  }
}

const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

describe('direct sends of RAM pages', { timeout: 60_000, skip: sendPageRun === null ? 'native/pages not built (or FERRY_NO_ZEROCOPY=1)' : false }, () => {
  for (const kind of ['tcp', 'unix'] as const) {
    it(`${kind}: the same bytes as the staging path, sent from guest RAM`, async () => {
      const want = await reference();
      const { n, sha: got, w } = await overSocket(kind, 0);
      assert.equal(n, want.length);
      assert.equal(got, sha(want), 'identical streams');
      assert.equal(w.bytesFlushed, w.bytesWritten);
      // the staged prefixes and whatever a full socket refused went through
      // the staging path; the bulk of the pages did not
      assert.ok(w.bytesDirect > want.length / 2, `${w.bytesDirect} of ${want.length} bytes sent directly`);
    });

    it(`${kind}: a reader that starts late (short writes, the rest staged in order)`, async () => {
      const want = await reference();
      const { n, sha: got, w } = await overSocket(kind, 300);
      assert.equal(n, want.length);
      assert.equal(got, sha(want), 'identical streams');
      assert.equal(w.bytesFlushed, w.bytesWritten);
      assert.ok(w.bytesDirect > 0, 'some bytes went directly');
      assert.ok(w.bytesDirect < w.bytesWritten, 'the socket was full at least once, so some bytes were staged');
    });
  }

  it('exec: (a socketpair to the child) takes direct sends; a FIFO does not', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'ferry-direct-'));
    try {
      const want = await reference();
      const out = join(dir, 'stream');
      const child = spawn('sh', ['-c', `cat > ${out}`], { stdio: ['pipe', 'ignore', 'inherit'] });
      const w = new StreamWriter(child.stdin);
      await send(w, guest());
      child.stdin.end();
      await new Promise((r) => child.once('exit', r));
      assert.equal(sha(readFileSync(out)), sha(want), 'identical streams');
      assert.ok(w.bytesDirect > 0, 'node gives a child its stdin as a socketpair, which sendmsg() takes');

      const fifo = join(dir, 'fifo');
      execFileSync('mkfifo', [fifo]);
      const fd = openSync(fifo, 'r+');
      const s = new net.Socket({ fd, readable: false, writable: true });
      try {
        assert.equal(new StreamWriter(s).directFd(), -1, 'sendmsg() cannot take a FIFO (fd: with a pipe)');
      } finally {
        s.destroy();
      }
      assert.equal(new StreamWriter(new Collector()).directFd(), -1, 'an in-process stream keeps its chunks');
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('a peer that goes away mid-stream: the sticky write error, as on the staging path', async () => {
    const server = net.createServer((s) => {
      let n = 0;
      s.on('data', (d) => {
        n += d.length;
        if (n > 1 << 20) s.destroy();
      });
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    const sock = net.connect((server.address() as net.AddressInfo).port, '127.0.0.1');
    sock.on('error', () => undefined);
    await new Promise<void>((r) => sock.once('connect', r));
    const w = new StreamWriter(sock);
    try {
      await assert.rejects(async () => {
        for (let i = 0; i < 50; i++) await send(w, guest());
      }, (e: unknown) => e instanceof MigrationStreamError && /EPIPE|ECONNRESET|write|destroyed|ended/i.test(e.message));
      assert.ok(w.error instanceof MigrationStreamError);
    } finally {
      sock.destroy();
      server.close();
    }
  });
});
