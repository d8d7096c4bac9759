/**
 * The multifd receiver against hand-made channels (docs/spec/multifd.md):
 * the order a page's copies land in, the walk that fills packets, and the
 * bytes a sending channel puts on the wire.
 */
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createConnection, createServer, type Socket } from 'node:net';
import { multifdNative } from '../../src/base/native.js';
import type { RamBlock } from '../../src/machine/types.js';
import { listenIncoming } from '../../src/migration/channel/index.js';
import { MultifdReceiver } from '../../src/migration/multifd/receiver.js';
import { MultifdSender } from '../../src/migration/multifd/sender.js';
import { NO_UUID } from '../../src/migration/multifd/setup.js';
import { HEADER_SIZE, INIT_SIZE, MULTIFD_FLAG_SYNC, OFFSETS_AT, PACKET_PAGES, decodeHeader, encodeInit, putHeader } from '../../src/migration/multifd/wire.js';
import { MultifdWorkers } from '../../src/migration/multifd/workers.js';

const skip = multifdNative === null ? 'native/pages is not built' : false;
const PAGE = 4096;
const workers = new MultifdWorkers();
after(() => workers.release());

function block(name: string, pages: number): RamBlock {
  const words = Math.ceil(pages / 32);
  return {
    name, size: pages * PAGE, pages,
    bytes: new Uint8Array(new SharedArrayBuffer(pages * PAGE)),
    dirty: new Int32Array(new SharedArrayBuffer(words * 4)),
    touched: new Uint32Array(new SharedArrayBuffer(words * 4)),
    present: new Int32Array(new SharedArrayBuffer(words * 4)).fill(-1),
  };
}

function connect(port: number): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const s = createConnection({ host: '127.0.0.1', port }, () => resolve(s));
    s.on('error', reject);
  });
}

/** A packet of one page of `ram` at `offset` filled with `fill`. */
function pagePacket(num: number, name: string, offset: number, fill: number): Buffer {
  const h = Buffer.alloc(HEADER_SIZE);
  putHeader(h, 0, 1, num, name);
  h.writeBigUInt64BE(BigInt(offset), OFFSETS_AT);
  return Buffer.concat([h, Buffer.alloc(PAGE, fill)]);
}

function syncPacket(num: number): Buffer {
  const h = Buffer.alloc(HEADER_SIZE);
  putHeader(h, MULTIFD_FLAG_SYNC, 0, num, '');
  return h;
}

describe('multifd receiver', { skip }, () => {
  it('a page sent again on another channel after a sync lands after its older copy, however late the older one arrives', async () => {
    const ram = block('pc.ram', 16);
    const listener = await listenIncoming({ kind: 'tcp', host: '127.0.0.1', port: 0 }, { lookupFd: () => undefined, extraConnections: () => 2 });
    const { port } = listener.address() as { port: number };
    const main = await connect(port);
    const a = await connect(port);
    const b = await connect(port);
    await listener.accept();
    const sockets = await listener.acceptExtra!();
    const rx = new MultifdReceiver(sockets, [ram], NO_UUID, workers);
    a.write(encodeInit(0, NO_UUID));
    b.write(encodeInit(1, NO_UUID));
    await rx.ready();
    // section 1: page 3 = 0xAA on channel a (late), nothing on b; section 2: page 3 = 0xBB on b
    b.write(Buffer.concat([syncPacket(1), pagePacket(2, 'pc.ram', 3 * PAGE, 0xbb), syncPacket(4)]));
    const first = rx.sync();
    await new Promise((r) => setTimeout(r, 300));
    a.write(Buffer.concat([pagePacket(0, 'pc.ram', 3 * PAGE, 0xaa), syncPacket(3)]));
    await first;
    a.write(syncPacket(5));
    await rx.sync();
    // both copies are in by now (a receiver that did not wait would still be placing the late one: wait for it)
    for (let i = 0; i < 100 && rx.pages < 2; i++) await new Promise((r) => setTimeout(r, 20));
    assert.equal(ram.bytes[3 * PAGE], 0xbb, 'the newer copy wins');
    assert.equal(ram.bytes[4 * PAGE - 1], 0xbb);
    assert.equal(rx.pages, 2);
    assert.equal((ram.touched[0]! >>> 3) & 1, 1, 'the page is marked written');
    await rx.close();
    listener.close();
    for (const s of [main, a, b]) s.destroy();
  });
});

describe('multifd sender', { skip }, () => {
  it('puts the initial packet, page packets of one block with their offsets and pages, and SYNC packets on the wire', async () => {
    const ram = block('pc.ram', 200);
    for (let p = 0; p < 200; p++) ram.bytes.fill(p & 0xff || 1, p * PAGE, (p + 1) * PAGE);
    const got: Buffer[] = [];
    const server = createServer((s) => s.on('data', (d: Buffer) => got.push(d)));
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    const { port } = server.address() as { port: number };
    const sock = await connect(port);
    let failed: Error | null = null;
    const tx = new MultifdSender([sock], [ram], NO_UUID, workers, (e) => (failed = e));
    // every page dirty and written: the walk takes 128, then the rest
    const bitmap = new Uint32Array(Math.ceil(200 / 32)).fill(0xffffffff);
    ram.touched.fill(0xffffffff);
    const counts = new Float64Array(4);
    const out = new Uint8Array(1024);
    tx.fillFor(0);
    let next = multifdNative!.walk(bitmap, ram.touched, ram.bytes, 0, 200, 1e9, out, 0, out.length, true, tx.packet, counts);
    assert.equal(next, PACKET_PAGES);
    assert.equal(counts[0], PACKET_PAGES);
    tx.packetPages = counts[0]!;
    assert.equal(tx.dispatch(), HEADER_SIZE + PACKET_PAGES * PAGE);
    counts.fill(0);
    next = multifdNative!.walk(bitmap, ram.touched, ram.bytes, next, 200, 1e9, out, 0, out.length, true, tx.packet, counts);
    assert.equal(next, 200);
    tx.packetPages = counts[0]!;
    await tx.sync();
    await tx.drain();
    await tx.close();
    await new Promise((r) => setTimeout(r, 100));
    server.close();
    assert.equal(failed, null);
    const wire = Buffer.concat(got);
    assert.deepEqual(wire.subarray(0, INIT_SIZE), encodeInit(0, NO_UUID));
    let at = INIT_SIZE;
    const seen: Array<{ flags: number; pages: number; num: number }> = [];
    while (at < wire.length) {
      const h = decodeHeader(wire.subarray(at, at + HEADER_SIZE));
      assert.equal(h.magic, 0x11223344);
      assert.equal(h.pagesAlloc, PACKET_PAGES);
      seen.push({ flags: h.flags, pages: h.normalPages, num: h.packetNum });
      const first = seen.length === 1 ? 0 : PACKET_PAGES;
      for (let i = 0; i < h.normalPages; i++) {
        const off = Number(wire.readBigUInt64BE(at + OFFSETS_AT + 8 * i));
        assert.equal(off, (first + i) * PAGE);
        const data = wire.subarray(at + HEADER_SIZE + i * PAGE, at + HEADER_SIZE + (i + 1) * PAGE);
        assert.ok(data.equals(Buffer.from(ram.bytes.subarray(off, off + PAGE))), `page ${first + i}`);
      }
      if (h.normalPages > 0) assert.equal(h.block, 'pc.ram');
      at += HEADER_SIZE + h.normalPages * PAGE;
    }
    assert.equal(at, wire.length);
    assert.deepEqual(seen, [{ flags: 0, pages: 128, num: 0 }, { flags: 0, pages: 72, num: 1 }, { flags: 1, pages: 0, num: 2 }]);
    assert.equal(tx.bytes, 2 * HEADER_SIZE + 200 * PAGE + HEADER_SIZE);
  });
});
