/**
 * Ferry's NBD client against Ferry's server, in one process: negotiation
 * with and without structured replies, every request kind, errors carried
 * back with the server's text, the export list, and a connection that
 * dies under requests in flight (they reject, 'lost' is emitted once, later
 * requests reject at once). The client against qemu-nbd is in
 * test/integration/nbd-interop.test.ts.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import * as net from 'node:net';
import { join } from 'node:path';
import { createImage, openImage, type BlockImage } from '../../src/block/index.js';
import { imageTarget, NbdClient, NbdConnectionError, NbdError, NbdServer, parseNbdUri, formatNbdUri } from '../../src/nbd/index.js';
import * as P from '../../src/nbd/protocol.js';
import { tmpDir } from './block-helpers.js';

const SIZE = 4 << 20;

describe('NBD client', { timeout: 30000 }, () => {
  let dir: string;
  let img: BlockImage;
  let server: NbdServer;
  let addr: { kind: 'unix'; path: string };

  before(async () => {
    dir = tmpDir();
    await createImage(join(dir, 'd.qcow2'), { format: 'qcow2', size: SIZE });
    img = await openImage(join(dir, 'd.qcow2'));
    addr = { kind: 'unix', path: join(dir, 'nbd.sock') };
    server = await NbdServer.listen(addr);
    server.addExport('disk', imageTarget(img), { writable: true, description: 'a qcow2' });
  });
  after(async () => {
    await server.close();
    await img.close();
  });

  for (const structuredReplies of [true, false]) {
    it(`reads and writes what the image holds (structured replies ${structuredReplies ? 'on' : 'off'})`, async () => {
      const c = await NbdClient.connect(addr, 'disk', { structuredReplies });
      assert.equal(c.size, SIZE);
      assert.equal(c.structured, structuredReplies);
      assert.equal(c.readOnly, false);
      assert.equal(c.description, 'a qcow2');
      assert.equal(c.maxBlock, P.NBD_MAX_BUFFER_SIZE);
      const data = Buffer.alloc(70000);
      for (let i = 0; i < data.length; i++) data[i] = (i * 7 + (structuredReplies ? 1 : 2)) & 0xff;
      // several requests in flight at once
      await Promise.all([c.write(1000, data), c.write(200000, data, true), c.writeZeroes(300000, 5000)]);
      await c.flush();
      const back = Buffer.alloc(data.length);
      await c.read(1000, back);
      assert.deepEqual(back, data);
      const direct = Buffer.alloc(data.length);
      await img.read(200000, direct);
      assert.deepEqual(direct, data);
      await img.read(300000, direct.subarray(0, 5000));
      assert.ok(direct.subarray(0, 5000).every((b) => b === 0));
      await c.trim(0, 4096);
      await assert.rejects(c.read(SIZE - 10, Buffer.alloc(20)), (e: unknown) => {
        assert.ok(e instanceof NbdError);
        assert.equal(e.errno, P.NBD_EINVAL);
        if (structuredReplies) assert.match(e.message, /^operation past EOF; From: 4194294, Len: 20, Size: 4194304 \(Invalid argument\)$/);
        else assert.equal(e.message, 'Invalid argument');
        return true;
      });
      // the error did not end the connection
      await c.read(0, Buffer.alloc(1));
      await c.close();
      await assert.rejects(c.read(0, Buffer.alloc(1)), NbdConnectionError);
    });
  }

  it('lists the exports, and says which export is missing', async () => {
    assert.deepEqual(await NbdClient.list(addr), [{ name: 'disk', description: 'a qcow2' }]);
    await assert.rejects(NbdClient.connect(addr, 'nope'), /Requested export not available: export 'nope' not present/);
    await assert.rejects(NbdClient.connect({ kind: 'unix', path: join(dir, 'none.sock') }, 'disk'), /Failed to connect to '.*none.sock': No such file or directory/);
  });

  it('fails every request in flight and every later one when the connection dies', async () => {
    // a server that negotiates, then swallows requests and hangs up after the third
    const path = join(dir, 'dying.sock');
    const dying = net.createServer((s) => {
      const hello = Buffer.alloc(18);
      hello.writeBigUInt64BE(P.NBD_INIT_MAGIC, 0);
      hello.writeBigUInt64BE(P.NBD_OPTS_MAGIC, 8);
      hello.writeUInt16BE(3, 16);
      s.write(hello);
      let seen = Buffer.alloc(0);
      let phase = 0;
      s.on('data', (d) => {
        seen = Buffer.concat([seen, d]);
        if (phase === 0 && seen.length >= 4 + 16) {
          const len = seen.readUInt32BE(4 + 12);
          if (seen.length < 20 + len) return;
          const opt = seen.readUInt32BE(4 + 8);
          seen = seen.subarray(20 + len);
          if (opt === P.NBD_OPT_STRUCTURED_REPLY) {
            s.write(P.encodeOptionReply(opt, P.NBD_REP_ERR_UNSUP));
            seen = Buffer.concat([Buffer.alloc(4), seen]);
            return;
          }
          const info = Buffer.alloc(12);
          info.writeUInt16BE(P.NBD_INFO_EXPORT, 0);
          info.writeBigUInt64BE(BigInt(SIZE), 2);
          info.writeUInt16BE(P.NBD_FLAG_HAS_FLAGS | P.NBD_FLAG_SEND_FLUSH, 10);
          s.write(Buffer.concat([P.encodeOptionReply(opt, P.NBD_REP_INFO, info), P.encodeOptionReply(opt, P.NBD_REP_ACK)]));
          phase = 1;
          seen = Buffer.alloc(0);
          return;
        }
        if (phase === 1 && seen.length >= 3 * P.REQUEST_SIZE) s.destroy();
      });
    });
    await new Promise<void>((r) => dying.listen(path, r));
    try {
      const c = await NbdClient.connect({ kind: 'unix', path }, 'x');
      assert.equal(c.structured, false);
      let lost = 0;
      c.on('lost', () => lost++);
      const reqs = [c.read(0, Buffer.alloc(10)), c.write(0, Buffer.alloc(0)), c.flush()];
      for (const r of reqs) await assert.rejects(r, (e: unknown) => e instanceof NbdConnectionError && /lost/.test(e.message));
      await assert.rejects(c.flush(), NbdConnectionError);
      assert.equal(lost, 1);
      assert.ok(c.error instanceof NbdConnectionError);
      await c.close();
    } finally {
      dying.close();
    }
  });

  it('parses and formats QEMU\'s NBD URIs', () => {
    assert.deepEqual(parseNbdUri('nbd://127.0.0.1:1234/colo1'), { address: { kind: 'inet', host: '127.0.0.1', port: 1234 }, exportName: 'colo1' });
    assert.deepEqual(parseNbdUri('nbd://h/'), { address: { kind: 'inet', host: 'h', port: 10809 }, exportName: '' });
    assert.deepEqual(parseNbdUri('nbd+unix:///d?socket=/run/s.sock'), { address: { kind: 'unix', path: '/run/s.sock' }, exportName: 'd' });
    assert.deepEqual(parseNbdUri('nbd:unix:/run/s.sock:exportname=d'), { address: { kind: 'unix', path: '/run/s.sock' }, exportName: 'd' });
    assert.deepEqual(parseNbdUri('nbd:localhost:10810'), { address: { kind: 'inet', host: 'localhost', port: 10810 }, exportName: '' });
    assert.throws(() => parseNbdUri('nbd+unix:///d'), /needs \?socket=PATH/);
    assert.throws(() => parseNbdUri('http://x/'), /not an NBD URI/);
    assert.equal(formatNbdUri({ address: { kind: 'unix', path: '/s' }, exportName: 'a b' }), 'nbd+unix:///a%20b?socket=/s');
  });
});
