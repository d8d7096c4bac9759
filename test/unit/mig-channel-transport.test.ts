import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';
import type { Readable, Writable } from 'node:stream';
import {
  ChannelError,
  connectOutgoing,
  listenIncoming,
  parseMigrationUri,
  type Channel,
} from '../../src/migration/channel/index.js';

const MiB = 1 << 20;
const BIG = 64 * MiB;
const noFds = { lookupFd: () => undefined };
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-chan-'));
process.on('exit', () => fs.rmSync(tmp, { recursive: true, force: true }));

/** Writes `total` pseudo-random bytes (1 MiB pattern, varied per chunk), honouring backpressure. */
async function send(out: Writable, total: number, end = true): Promise<string> {
  const hash = createHash('sha256');
  const pattern = randomBytes(MiB);
  let sent = 0;
  let i = 0;
  while (sent < total) {
    const n = Math.min(MiB, total - sent);
    const chunk = Buffer.from(pattern.subarray(0, n));
    chunk.writeUInt32BE(i++, 0);
    hash.update(chunk);
    sent += n;
    if (!out.write(chunk)) {
      await new Promise<void>((resolve, reject) => {
        const onDrain = (): void => { out.off('error', onErr); resolve(); };
        const onErr = (e: Error): void => { out.off('drain', onDrain); reject(e); };
        out.once('drain', onDrain);
        out.once('error', onErr);
      });
    }
  }
  if (end) out.end();
  return hash.digest('hex');
}

/** Reads to EOF: { bytes, sha256 }. */
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

function rejectsWith(p: Promise<unknown>, message: string | RegExp): Promise<void> {
  return assert.rejects(p, (err: unknown) => {
    assert.ok(err instanceof ChannelError, `ChannelError, got ${String(err)}`);
    if (typeof message === 'string') assert.equal(err.message, message);
    else assert.match(err.message, message);
    return true;
  });
}

/** 64 MiB source → destination, 1 MiB return path, both checked by hash; then both channels close. */
async function roundTrip(src: Channel, dst: Channel): Promise<void> {
  assert.equal(src.bidirectional, true);
  assert.equal(dst.bidirectional, true);
  const [sentHash, got, backHash, back] = await Promise.all([
    send(src.output, BIG),
    receive(dst.input),
    send(dst.output, MiB),
    receive(src.input),
  ]);
  assert.equal(got.bytes, BIG);
  assert.equal(got.hash, sentHash);
  assert.equal(back.bytes, MiB);
  assert.equal(back.hash, backHash);
  const both = Promise.all([closed(src), closed(dst)]);
  src.close();
  dst.close();
  await both;
  assert.equal(src.error, undefined);
  assert.equal(dst.error, undefined);
}

function hasIPv6Loopback(): boolean {
  const r = spawnSync(process.execPath, ['-e', "const s=require('net').createServer().listen(0,'::1',()=>s.close()).on('error',()=>process.exit(1))"]);
  return r.status === 0;
}

async function freePort(): Promise<number> {
  const s = net.createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', r));
  const port = (s.address() as net.AddressInfo).port;
  await new Promise<void>((r) => s.close(() => r()));
  return port;
}

test('tcp IPv4: 64 MiB each way-checked, real port reported', async () => {
  const l = await listenIncoming(parseMigrationUri('tcp:127.0.0.1:0', 'incoming'), noFds);
  const a = l.address();
  assert.ok(a !== undefined && 'port' in a && a.port > 0 && a.host === '127.0.0.1');
  const [src, dst] = await Promise.all([
    connectOutgoing(parseMigrationUri(`tcp:127.0.0.1:${a.port}`, 'outgoing'), noFds),
    l.accept(),
  ]);
  assert.match(src.describe(), /^tcp:127\.0\.0\.1:\d+/);
  await rejectsWith(l.accept(), 'The incoming connection has already been accepted');
  // Only one connection: the listener is gone after the first.
  await rejectsWith(connectOutgoing(parseMigrationUri(`tcp:127.0.0.1:${a.port}`, 'outgoing'), noFds),
    `Failed to connect to '127.0.0.1:${a.port}': Connection refused`);
  await roundTrip(src, dst);
  l.close();
});

test('tcp IPv6 [::1]', { skip: !hasIPv6Loopback() && 'no IPv6 loopback' }, async () => {
  const l = await listenIncoming(parseMigrationUri('tcp:[::1]:0', 'incoming'), noFds);
  const a = l.address();
  assert.ok(a !== undefined && 'port' in a);
  assert.equal(a.host, '::1');
  const [src, dst] = await Promise.all([
    connectOutgoing(parseMigrationUri(`tcp:[::1]:${a.port}`, 'outgoing'), noFds),
    l.accept(),
  ]);
  await roundTrip(src, dst);
  l.close();
});

test('tcp::PORT listens on all addresses (IPv4 and IPv6), hostname connect', async () => {
  const port = await freePort();
  const l = await listenIncoming(parseMigrationUri(`tcp::${port}`, 'incoming'), noFds);
  const a = l.address();
  assert.ok(a !== undefined && 'port' in a && a.port === port);
  assert.ok(a.host === '::' || a.host === '0.0.0.0', a.host);
  const [src, dst] = await Promise.all([
    connectOutgoing(parseMigrationUri(`tcp:localhost:${port}`, 'outgoing'), noFds),
    l.accept(),
  ]);
  src.output.end('hello');
  assert.equal((await receive(dst.input)).bytes, 5);
  src.close();
  dst.close();
  l.close();
  if (a.host === '::' && hasIPv6Loopback()) {
    const l4 = await listenIncoming(parseMigrationUri(`tcp:0:${port}`, 'incoming'), noFds);
    const [s4, d4] = await Promise.all([
      connectOutgoing(parseMigrationUri(`tcp:127.0.0.1:${port}`, 'outgoing'), noFds),
      l4.accept(),
    ]);
    s4.close(); d4.close(); l4.close();
    const l6 = await listenIncoming(parseMigrationUri(`tcp:0:${port}`, 'incoming'), noFds);
    const [s6, d6] = await Promise.all([
      connectOutgoing(parseMigrationUri(`tcp:[::1]:${port}`, 'outgoing'), noFds),
      l6.accept(),
    ]);
    s6.close(); d6.close(); l6.close();
  }
});

test('unix: stale socket removed, 64 MiB round trip, path unlinked after', async () => {
  const p = path.join(tmp, 'stale.sock');
  const py = spawnSync('python3', ['-c', `import socket;s=socket.socket(socket.AF_UNIX);s.bind(${JSON.stringify(p)})`]);
  if (py.status === 0) assert.ok(fs.lstatSync(p).isSocket());
  const l = await listenIncoming(parseMigrationUri(`unix:${p}`, 'incoming'), noFds);
  assert.deepEqual(l.address(), { path: p });
  // A live socket is in use.
  await rejectsWith(listenIncoming(parseMigrationUri(`unix:${p}`, 'incoming'), noFds),
    `Failed to bind socket to ${p}: Address already in use`);
  const [src, dst] = await Promise.all([
    connectOutgoing(parseMigrationUri(`unix:${p}`, 'outgoing'), noFds),
    l.accept(),
  ]);
  await roundTrip(src, dst);
  l.close();
  await new Promise((r) => setTimeout(r, 20));
  assert.equal(fs.existsSync(p), false);
});

test('exec: outgoing "cat > FILE" then incoming "cat FILE", 64 MiB', async () => {
  const file = path.join(tmp, 'stream.bin');
  const src = await connectOutgoing(parseMigrationUri(`exec:cat > '${file}'`, 'outgoing'), noFds);
  assert.match(src.describe(), /^exec:cat > .* \(pid \d+, outgoing\)$/);
  const done = closed(src);
  const sentHash = await send(src.output, BIG);
  await done; // child exited, pipes closed
  assert.equal(src.error, undefined);
  assert.equal(fs.statSync(file).size, BIG);

  const l = await listenIncoming(parseMigrationUri(`exec:cat '${file}'`, 'incoming'), noFds);
  assert.equal(l.address(), undefined);
  const dst = await l.accept();
  const got = await receive(dst.input);
  assert.equal(got.bytes, BIG);
  assert.equal(got.hash, sentHash);
  dst.close();
  await closed(dst);
  l.close();
});

const RELAY = `
const net = require('net');
const s = net.connect({ path: process.argv[2], allowHalfOpen: true });
s.on('error', (e) => { console.error('relay: ' + e.message); process.exit(1); });
process.stdin.pipe(s);
s.pipe(process.stdout);
`;

test('exec: bidirectional pair through a relay (both directions)', async () => {
  const relay = path.join(tmp, 'relay.cjs');
  fs.writeFileSync(relay, RELAY);
  // outgoing exec relay → unix listener
  const p1 = path.join(tmp, 'relay1.sock');
  const l1 = await listenIncoming(parseMigrationUri(`unix:${p1}`, 'incoming'), noFds);
  const [src1, dst1] = await Promise.all([
    connectOutgoing(parseMigrationUri(`exec:'${process.execPath}' '${relay}' '${p1}'`, 'outgoing'), noFds),
    l1.accept(),
  ]);
  await roundTrip(src1, dst1);
  l1.close();
  // incoming exec relay → connects to a plain server playing the source
  const p2 = path.join(tmp, 'relay2.sock');
  const server = net.createServer({ allowHalfOpen: true });
  await new Promise<void>((r) => server.listen(p2, r));
  const accepted = new Promise<net.Socket>((r) => server.once('connection', r));
  const l2 = await listenIncoming(parseMigrationUri(`exec:'${process.execPath}' '${relay}' '${p2}'`, 'incoming'), noFds);
  const dst2 = await l2.accept();
  const sock = await accepted;
  server.close();
  const [sentHash, got, backHash, back] = await Promise.all([send(sock, BIG), receive(dst2.input), send(dst2.output, MiB), receive(sock)]);
  assert.equal(got.hash, sentHash);
  assert.equal(back.hash, backHash);
  assert.equal(back.bytes, MiB);
  sock.destroy();
  dst2.close();
  await closed(dst2);
  l2.close();
});

test('exec: a failing command surfaces through the channel error event', async () => {
  const ch = await connectOutgoing(parseMigrationUri('exec:exit 3', 'outgoing'), noFds);
  const err = await new Promise<ChannelError>((r) => ch.once('error', r));
  assert.equal(err.message, 'Command exited with status 3');
  await closed(ch);
  ch.close();
});

test('connection refused and missing unix socket (QEMU 7.2 texts)', async () => {
  const port = await freePort();
  await rejectsWith(connectOutgoing(parseMigrationUri(`tcp:127.0.0.1:${port}`, 'outgoing'), noFds),
    `Failed to connect to '127.0.0.1:${port}': Connection refused`);
  const p = path.join(tmp, 'nosuch.sock');
  await rejectsWith(connectOutgoing(parseMigrationUri(`unix:${p}`, 'outgoing'), noFds),
    `Failed to connect to '${p}': No such file or directory`);
  await rejectsWith(connectOutgoing(parseMigrationUri('tcp:no-such-host.invalid:4444', 'outgoing'), noFds),
    /^address resolution failed for no-such-host\.invalid:4444: /);
  await rejectsWith(connectOutgoing(parseMigrationUri('fd:nosuch', 'outgoing'), noFds),
    "File descriptor named 'nosuch' has not been found");
  await rejectsWith(listenIncoming(parseMigrationUri('fd:nosuch', 'incoming'), noFds),
    "File descriptor named 'nosuch' has not been found");
  await rejectsWith(connectOutgoing(parseMigrationUri('fd:12x', 'outgoing'), noFds),
    "Invalid file descriptor number '12x'");
  await rejectsWith(connectOutgoing(parseMigrationUri('fd:1000000', 'outgoing'), noFds),
    "Unable to use file descriptor 1000000 ('1000000'): Bad file descriptor");
});

test('address in use', async () => {
  const l = await listenIncoming(parseMigrationUri('tcp:127.0.0.1:0', 'incoming'), noFds);
  const a = l.address() as { host: string; port: number };
  await rejectsWith(listenIncoming(parseMigrationUri(`tcp:127.0.0.1:${a.port}`, 'incoming'), noFds),
    'Failed to bind socket: Address already in use');
  await rejectsWith(listenIncoming(parseMigrationUri(`tcp::${a.port}`, 'incoming'), noFds),
    'Failed to bind socket: Address already in use');
  l.close();
  // A listener closed before any connection rejects accept().
  await rejectsWith(l.accept(), 'Incoming migration listener closed');
  const l2 = await listenIncoming(parseMigrationUri('tcp:127.0.0.1:0', 'incoming'), noFds);
  const pending = l2.accept();
  l2.close();
  await rejectsWith(pending, 'Incoming migration listener closed');
});

test('abort during connect', async () => {
  const l = await listenIncoming(parseMigrationUri('tcp:127.0.0.1:0', 'incoming'), noFds);
  const port = (l.address() as { port: number }).port;
  const pre = new AbortController();
  pre.abort();
  await rejectsWith(connectOutgoing(parseMigrationUri(`tcp:127.0.0.1:${port}`, 'outgoing'), { ...noFds, signal: pre.signal }),
    'Migration connection cancelled');
  const ac = new AbortController();
  const p = connectOutgoing(parseMigrationUri(`tcp:localhost:${port}`, 'outgoing'), { ...noFds, signal: ac.signal });
  ac.abort();
  await assert.rejects(p, (e: unknown) => e instanceof ChannelError && e.code === 'ABORT_ERR');
  const ac2 = new AbortController();
  const p2 = connectOutgoing(parseMigrationUri('exec:sleep 30', 'outgoing'), { ...noFds, signal: ac2.signal });
  ac2.abort();
  await assert.rejects(p2, (e: unknown) => e instanceof ChannelError && e.code === 'ABORT_ERR');
  // A connect that would hang (TEST-NET-1 black hole) ends promptly on abort.
  const ac3 = new AbortController();
  const t0 = Date.now();
  const p3 = connectOutgoing(parseMigrationUri('tcp:192.0.2.1:4444', 'outgoing'), { ...noFds, signal: ac3.signal });
  setTimeout(() => ac3.abort(), 100);
  await assert.rejects(p3, (e: unknown) => e instanceof ChannelError);
  assert.ok(Date.now() - t0 < 2000);
  l.close();
});

test('close() mid-transfer ends pending reads and writes (tcp and exec)', async () => {
  const l = await listenIncoming(parseMigrationUri('tcp:127.0.0.1:0', 'incoming'), noFds);
  const port = (l.address() as { port: number }).port;
  const [src, dst] = await Promise.all([
    connectOutgoing(parseMigrationUri(`tcp:127.0.0.1:${port}`, 'outgoing'), noFds),
    l.accept(),
  ]);
  const errors: Error[] = [];
  src.on('error', (e) => errors.push(e));
  let seen = 0;
  dst.input.on('data', (b: Buffer) => {
    seen += b.length;
    if (seen > 8 * MiB) dst.close();
  });
  const sending = send(src.output, 1024 * MiB).then(() => 'finished', (e: Error) => e.message);
  const outcome = await Promise.race([sending, new Promise((r) => src.once('error', () => r('error')))]);
  assert.notEqual(outcome, 'finished');
  src.close();
  src.close();
  await closed(src);
  assert.ok(errors.length <= 1);
  assert.equal(dst.closed, true);
  l.close();

  // exec: incoming reader of an endless stream; close kills the child.
  const el = await listenIncoming(parseMigrationUri('exec:cat /dev/zero', 'incoming'), noFds);
  const ech = await el.accept();
  const gone = closed(ech);
  let n = 0;
  ech.input.on('data', (b: Buffer) => {
    n += b.length;
    if (n > 4 * MiB) ech.close();
  });
  await gone;
  assert.equal(ech.error, undefined);
  // outgoing writer into a child that never reads
  const och = await connectOutgoing(parseMigrationUri('exec:sleep 30', 'outgoing'), noFds);
  const ogone = closed(och);
  void send(och.output, 64 * MiB).catch(() => {});
  setTimeout(() => och.close(), 50);
  await ogone;
  el.close();
});
