/**
 * fd: transports. A descriptor that no libuv handle owns is needed, as with
 * getfd; a child process gets one as its fd 3 (spawn stdio), so the socket
 * cases run this very file as a helper child.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawn, spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import type { Readable, Writable } from 'node:stream';
import { connectOutgoing, listenIncoming, parseMigrationUri, type Channel } from '../../src/migration/channel/index.js';

const MiB = 1 << 20;
const BIG = 64 * MiB;
const HELPER_ENV = 'FERRY_CHANNEL_FD_HELPER';

async function send(out: Writable, total: number): Promise<string> {
  const hash = createHash('sha256');
  const pattern = randomBytes(MiB);
  for (let sent = 0, i = 0; sent < total; i++) {
    const n = Math.min(MiB, total - sent);
    const chunk = Buffer.from(pattern.subarray(0, n));
    chunk.writeUInt32BE(i, 0);
    hash.update(chunk);
    sent += n;
    if (!out.write(chunk)) await new Promise((r) => out.once('drain', r));
  }
  out.end();
  return hash.digest('hex');
}

function receive(input: Readable): Promise<{ bytes: number; hash: string }> {
  return new Promise((resolve, reject) => {
    const hash = createHash('sha256');
    let bytes = 0;
    input.on('data', (b: Buffer) => { bytes += b.length; hash.update(b); });
    input.once('end', () => resolve({ bytes, hash: hash.digest('hex') }));
    input.once('error', reject);
  });
}

function closed(ch: Channel): Promise<void> {
  return ch.released ? Promise.resolve() : new Promise((resolve) => ch.once('close', resolve));
}

async function helper(mode: string): Promise<void> {
  let ch: Channel;
  if (mode === 'out') {
    ch = await connectOutgoing(parseMigrationUri('fd:migfd', 'outgoing'), { lookupFd: (n) => (n === 'migfd' ? 3 : undefined) });
  } else {
    const l = await listenIncoming(parseMigrationUri('fd:3', 'incoming'), { lookupFd: () => undefined });
    ch = await l.accept();
  }
  const [sent, got] = await Promise.all([send(ch.output, mode === 'out' ? BIG : MiB), receive(ch.input)]);
  ch.close();
  process.stdout.write(JSON.stringify({ bidirectional: ch.bidirectional, sent, got, describe: ch.describe() }));
}

if (process.env[HELPER_ENV] !== undefined) {
  await helper(process.env[HELPER_ENV]);
} else {
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-chanfd-'));
  process.on('exit', () => fs.rmSync(tmp, { recursive: true, force: true }));
  const self = fileURLToPath(import.meta.url);

  /** Runs the helper with `sock` as its fd 3; the parent's own handle is closed once the child has it. */
  async function runHelper(mode: 'out' | 'in', sock: net.Socket): Promise<{ bidirectional: boolean; sent: string; got: { bytes: number; hash: string }; describe: string }> {
    const child = spawn(process.execPath, [self], {
      env: { ...process.env, [HELPER_ENV]: mode },
      stdio: ['ignore', 'pipe', 'inherit', sock],
    });
    await new Promise((r) => child.once('spawn', r));
    sock.destroy();
    let out = '';
    child.stdout!.setEncoding('utf8').on('data', (s: string) => (out += s));
    const code = await new Promise((r) => child.once('close', r));
    assert.equal(code, 0);
    return JSON.parse(out);
  }

  async function socketPair(): Promise<[Channel, net.Socket]> {
    const p = path.join(tmp, `pair-${Math.random().toString(36).slice(2)}.sock`);
    const l = await listenIncoming(parseMigrationUri(`unix:${p}`, 'incoming'), { lookupFd: () => undefined });
    const client = net.connect({ path: p, allowHalfOpen: true });
    const [ch] = await Promise.all([l.accept(), new Promise((r) => client.once('connect', r))]);
    l.close();
    return [ch, client];
  }

  test('fd:NAME outgoing on a socket (getfd name), 64 MiB + return path', async () => {
    const [dst, client] = await socketPair();
    const result = runHelper('out', client);
    const [got, back] = await Promise.all([receive(dst.input), send(dst.output, MiB)]);
    const r = await result;
    assert.equal(r.bidirectional, true);
    assert.match(r.describe, /^fd:migfd \(socket fd 3, outgoing\)$/);
    assert.equal(got.bytes, BIG);
    assert.equal(got.hash, r.sent);
    assert.deepEqual(r.got, { bytes: MiB, hash: back });
    dst.close();
    await closed(dst);
  });

  test('fd:N incoming on a socket (decimal fd number), 64 MiB + return path', async () => {
    const [src, client] = await socketPair();
    const result = runHelper('in', client);
    const [sent, back] = await Promise.all([send(src.output, BIG), receive(src.input)]);
    const r = await result;
    assert.equal(r.bidirectional, true);
    assert.deepEqual(r.got, { bytes: BIG, hash: sent });
    assert.equal(back.bytes, MiB);
    assert.equal(back.hash, r.sent);
    src.close();
    await closed(src);
  });

  test('fd: on a regular file (one-way), out then in', async () => {
    const file = path.join(tmp, 'fd-stream.bin');
    const wfd = fs.openSync(file, 'w');
    const src = await connectOutgoing(parseMigrationUri('fd:migfile', 'outgoing'), { lookupFd: (n) => (n === 'migfile' ? wfd : undefined) });
    assert.equal(src.bidirectional, false);
    const rp = await receive(src.input); // the missing return path reads as EOF
    assert.equal(rp.bytes, 0);
    const done = closed(src);
    const sent = await send(src.output, BIG);
    await done;
    assert.equal(fs.statSync(file).size, BIG);
    assert.throws(() => fs.fstatSync(wfd)); // the channel owned and closed it

    const rfd = fs.openSync(file, 'r');
    const l = await listenIncoming(parseMigrationUri(`fd:${rfd}`, 'incoming'), { lookupFd: () => undefined });
    const dst = await l.accept();
    assert.equal(dst.bidirectional, false);
    dst.output.write(Buffer.alloc(10)); // return path writes are discarded
    const got = await receive(dst.input);
    assert.deepEqual(got, { bytes: BIG, hash: sent });
    dst.close();
    await closed(dst);
    l.close();
  });

  const haveMkfifo = spawnSync('mkfifo', ['--version']).status === 0;
  test('fd: on a FIFO (incoming), closed mid-transfer', { skip: !haveMkfifo && 'no mkfifo' }, async () => {
    const fifo = path.join(tmp, 'fifo');
    assert.equal(spawnSync('mkfifo', [fifo]).status, 0);
    const rfd = fs.openSync(fifo, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK);
    // one open of the FIFO for the whole writer: two separate redirections
    // left a moment with no writer, and the reader saw EOF at 8 MiB
    const writer = spawn('/bin/sh', ['-c', `{ head -c ${8 * MiB} /dev/zero; cat /dev/zero; } > '${fifo}'`], { stdio: 'ignore' });
    const l = await listenIncoming(parseMigrationUri('fd:fifo', 'incoming'), { lookupFd: () => rfd });
    const dst = await l.accept();
    assert.match(dst.describe(), /pipe fd/);
    let n = 0;
    const gone = closed(dst);
    dst.input.on('data', (b: Buffer) => {
      n += b.length;
      if (n >= 16 * MiB) dst.close();
    });
    await gone;
    assert.ok(n >= 16 * MiB);
    writer.kill('SIGKILL');
    await new Promise((r) => writer.once('close', r));
    l.close();
  });
}
