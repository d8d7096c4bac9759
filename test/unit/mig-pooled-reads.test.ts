/**
 * StreamReader over a real socket with pooled reads (stream/pooled-reads.ts):
 * the reads land in a few reused buffers, a buffer is reused only after the
 * reader has read past it (the bytes stay exact through pauses at the high
 * water mark), and a reader without pooling reads the same bytes.
 */
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import * as net from 'node:net';
import * as tls from 'node:tls';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { StreamReader } from '../../src/migration/stream/reader.js';

/** A connected pair: the accepted side (as a destination gets it) and the connecting side. */
async function socketPair(kind: 'tcp' | 'unix'): Promise<{ accepted: net.Socket; client: net.Socket; done(): void }> {
  const dir = kind === 'unix' ? mkdtempSync(join(tmpdir(), 'ferry-pooled-')) : '';
  const server = net.createServer({ allowHalfOpen: true });
  await new Promise<void>((res) => (kind === 'tcp' ? server.listen(0, '127.0.0.1', res) : server.listen(join(dir, 's'), res)));
  const addr = server.address();
  const accepted = new Promise<net.Socket>((res) => server.once('connection', res));
  const client = typeof addr === 'string' ? net.connect(addr) : net.connect(addr!.port, '127.0.0.1');
  await new Promise<void>((res) => client.once('connect', res));
  const a = await accepted;
  server.close();
  return {
    accepted: a,
    client,
    done: () => {
      a.destroy();
      client.destroy();
      if (dir) rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** A TLS 1.2 PSK session over a TCP pair (no certificate files needed): the server's and the client's TLSSocket. */
async function tlsPair(): Promise<{ server: tls.TLSSocket; client: tls.TLSSocket; done(): void }> {
  const key = Buffer.alloc(32, 7);
  const common = { ciphers: 'PSK-AES256-GCM-SHA384', minVersion: 'TLSv1.2' as const, maxVersion: 'TLSv1.2' as const };
  const srv = tls.createServer({ ...common, pskCallback: () => key });
  await new Promise<void>((res) => srv.listen(0, '127.0.0.1', res));
  const secured = new Promise<tls.TLSSocket>((res) => srv.once('secureConnection', res));
  const port = (srv.address() as net.AddressInfo).port;
  const client = tls.connect({ ...common, port, host: '127.0.0.1', pskCallback: () => ({ identity: 'qemu', psk: key }), checkServerIdentity: () => undefined });
  await new Promise<void>((res) => client.once('secureConnect', res));
  const server = await secured;
  srv.close();
  return { server, client, done: () => { server.destroy(); client.destroy(); } };
}

/** Deterministic bytes: byte i of the stream. */
function streamByte(i: number): number {
  return (Math.imul(i, 2654435761) >>> 13) & 0xff;
}

function streamBytes(from: number, n: number): Buffer {
  const b = Buffer.allocUnsafe(n);
  for (let i = 0; i < n; i++) b[i] = streamByte(from + i);
  return b;
}

/** Writes `total` stream bytes in writes of varying sizes, honouring back-pressure, then ends. */
async function send(sock: net.Socket, total: number): Promise<void> {
  let at = 0;
  let step = 1;
  while (at < total) {
    step = (step * 7 + 12345) % 300000;
    const n = Math.min(total - at, 1 + step);
    if (!sock.write(streamBytes(at, n))) await new Promise((r) => sock.once('drain', r));
    at += n;
  }
  sock.end();
}

/**
 * Reads `total` bytes through every kind of read the loaders use, checking
 * each byte, sleeping now and then so that the reader fills up and pauses.
 * Returns the distinct buffers the reads landed in.
 */
async function readAll(r: StreamReader, total: number): Promise<Set<ArrayBufferLike>> {
  const seen = new Set<ArrayBufferLike>();
  const page = new Uint8Array(new SharedArrayBuffer(5008));
  let at = 0;
  let k = 0;
  while (at < total) {
    const want = Math.min(total - at, 1 + ((k * 977) % 4999));
    if (!r.has(want)) await r.ensure(want);
    if (r.chunk.length > 0) seen.add(r.chunk.buffer);
    switch (k % 4) {
      case 0: {
        const b = r.getBytes(want);
        assert.ok(b.equals(streamBytes(at, want)), `bytes at ${at}`);
        break;
      }
      case 1:
        r.copyTo(page, 3, want);
        assert.ok(Buffer.from(page.buffer, 3, want).equals(streamBytes(at, want)), `copy at ${at}`);
        break;
      case 2: {
        // the loaders' run path: read straight out of the current chunk
        const n = Math.min(want, r.chunk.length - r.chunkOffset);
        assert.ok(r.chunk.subarray(r.chunkOffset, r.chunkOffset + n).equals(streamBytes(at, n)), `chunk at ${at}`);
        r.consumeInChunk(n);
        r.skip(want - n);
        break;
      }
      default: {
        for (let i = 0; i < Math.min(want, 8); i++) assert.equal(r.get8(), streamByte(at + i));
        r.skip(Math.max(0, want - 8));
      }
    }
    at += want;
    if (k++ % 200 === 0) await new Promise((res) => setTimeout(res, 2));
  }
  await assert.rejects(r.ensure(1), { message: 'Unexpected end of migration stream' });
  return seen;
}

describe('StreamReader pooled reads', () => {
  const open: Array<() => void> = [];
  after(() => open.forEach((f) => f()));

  for (const kind of ['tcp', 'unix'] as const) {
    it(`reads an accepted ${kind} socket into a few reused buffers, byte-exact through pauses`, async () => {
      const p = await socketPair(kind);
      open.push(p.done);
      const r = new StreamReader(p.accepted, { highWater: 1 << 20 });
      assert.equal(r.pooled, true, 'Node 20 sockets take user buffers');
      const total = 48 << 20;
      const [seen] = await Promise.all([readAll(r, total), send(p.client, total)]);
      // 48 MiB through 256 KiB buffers: 192 reads at the very least; a new buffer per read would be
      // hundreds, the pool holds about highWater / size + a few
      assert.ok(seen.size <= 12, `${seen.size} distinct read buffers`);
    });
  }

  it('reads a TLS session into pooled buffers on both ends (one record per read, several reads per buffer)', async () => {
    const total = 16 << 20;
    for (const dir of ['to server', 'to client']) {
      const p = await tlsPair();
      open.push(p.done);
      const [from, to] = dir === 'to server' ? [p.client, p.server] : [p.server, p.client];
      const r = new StreamReader(to, { highWater: 1 << 20 });
      assert.equal(r.pooled, true);
      const [seen] = await Promise.all([readAll(r, total), send(from, total)]);
      // 16 MiB in records of at most 16 KiB: over a thousand reads, in a dozen buffers at most
      assert.ok(seen.size <= 12, `${seen.size} distinct read buffers`);
    }
  });

  it('reads the same bytes without pooling (pooledReads: false), a buffer per read', async () => {
    const p = await socketPair('tcp');
    open.push(p.done);
    const r = new StreamReader(p.accepted, { highWater: 1 << 20, pooledReads: false });
    assert.equal(r.pooled, false);
    const total = 16 << 20;
    const [seen] = await Promise.all([readAll(r, total), send(p.client, total)]);
    assert.ok(seen.size > 12, `${seen.size} distinct read buffers`);
  });

  it('is not used for a stream that is not a plain socket', () => {
    const r = StreamReader.fromBuffer(Buffer.alloc(4));
    assert.equal(r.pooled, false);
  });
});
