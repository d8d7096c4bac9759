/**
 * The NBD server byte by byte, with a raw socket as the client: the fixed
 * newstyle handshake, every option Ferry answers and the errors it gives,
 * then transmission with simple and structured replies. Every malformed
 * request (bad magic, oversized length, offset past the end, unknown
 * command or flag, a write to a read-only export) gets its NBD error (and a
 * disconnect where the stream cannot be followed), changes nothing on the
 * image, and leaves the server serving the next client.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import * as net from 'node:net';
import { join } from 'node:path';
import { createImage, openImage, type BlockImage } from '../../src/block/index.js';
import { imageTarget, NbdServer } from '../../src/nbd/index.js';
import * as P from '../../src/nbd/protocol.js';
import { SocketReader } from '../../src/nbd/reader.js';
import { tmpDir } from './block-helpers.js';

const SIZE = 1 << 20;

/** A raw client: bytes in, bytes out. */
class Raw {
  readonly r: SocketReader;
  private closedFlag = false;
  readonly closed: Promise<void>;
  private constructor(readonly s: net.Socket) {
    this.r = new SocketReader(s);
    s.on('error', () => undefined);
    this.closed = new Promise((res) => s.once('close', () => ((this.closedFlag = true), res())));
  }
  static async open(path: string, cflags = 3): Promise<{ raw: Raw; hello: Buffer }> {
    const s = net.createConnection({ path });
    await new Promise((res, rej) => s.once('connect', res).once('error', rej));
    const raw = new Raw(s);
    const hello = await raw.r.read(18);
    const c = Buffer.alloc(4);
    c.writeUInt32BE(cflags, 0);
    s.write(c);
    return { raw, hello };
  }
  get isClosed(): boolean {
    return this.closedFlag;
  }
  option(option: number, data: Buffer = Buffer.alloc(0)): void {
    this.s.write(P.encodeOption(option, data));
  }
  async reply(): Promise<{ option: number; type: number; data: Buffer }> {
    const h = await this.r.read(20);
    assert.equal(h.readBigUInt64BE(0), P.NBD_REP_MAGIC);
    return { option: h.readUInt32BE(8), type: h.readUInt32BE(12), data: await this.r.read(h.readUInt32BE(16)) };
  }
  async replies(): Promise<{ option: number; type: number; data: Buffer }[]> {
    const out = [];
    for (;;) {
      const r = await this.reply();
      out.push(r);
      if (r.type === P.NBD_REP_ACK || P.isRepError(r.type)) return out;
    }
  }
  /** NBD_OPT_GO on `name` (after NBD_OPT_STRUCTURED_REPLY when asked). */
  static async go(path: string, name: string, structured = false): Promise<Raw> {
    const { raw } = await Raw.open(path);
    if (structured) {
      raw.option(P.NBD_OPT_STRUCTURED_REPLY);
      assert.equal((await raw.reply()).type, P.NBD_REP_ACK);
    }
    raw.option(P.NBD_OPT_GO, goData(name));
    const rs = await raw.replies();
    assert.equal(rs.at(-1)!.type, P.NBD_REP_ACK, 'GO acknowledged');
    return raw;
  }
  request(type: number, offset: number | bigint, length: number, opts: { flags?: number; handle?: bigint; data?: Buffer; magic?: number } = {}): void {
    const b = P.encodeRequest({ flags: opts.flags ?? 0, type, handle: opts.handle ?? 7n, offset: BigInt(offset), length });
    if (opts.magic !== undefined) b.writeUInt32BE(opts.magic, 0);
    this.s.write(opts.data !== undefined ? Buffer.concat([b, opts.data]) : b);
  }
  async simple(readLength = 0): Promise<{ error: number; handle: bigint; data: Buffer }> {
    const h = await this.r.read(16);
    assert.equal(h.readUInt32BE(0), P.NBD_SIMPLE_REPLY_MAGIC);
    const error = h.readUInt32BE(4);
    return { error, handle: h.readBigUInt64BE(8), data: error === 0 && readLength > 0 ? await this.r.read(readLength) : Buffer.alloc(0) };
  }
  async chunk(): Promise<{ flags: number; type: number; handle: bigint; payload: Buffer }> {
    const h = await this.r.read(20);
    assert.equal(h.readUInt32BE(0), P.NBD_STRUCTURED_REPLY_MAGIC);
    return { flags: h.readUInt16BE(4), type: h.readUInt16BE(6), handle: h.readBigUInt64BE(8), payload: await this.r.read(h.readUInt32BE(16)) };
  }
  end(): void {
    this.s.destroy();
  }
}

function goData(name: string, infos: number[] = []): Buffer {
  const n = Buffer.from(name);
  const b = Buffer.alloc(4 + n.length + 2 + infos.length * 2);
  b.writeUInt32BE(n.length, 0);
  n.copy(b, 4);
  b.writeUInt16BE(infos.length, 4 + n.length);
  infos.forEach((t, i) => b.writeUInt16BE(t, 6 + n.length + i * 2));
  return b;
}

function errorChunk(c: { type: number; payload: Buffer }): { errno: number; message: string } {
  assert.equal(c.type, P.NBD_REPLY_TYPE_ERROR);
  const len = c.payload.readUInt16BE(4);
  return { errno: c.payload.readUInt32BE(0), message: c.payload.subarray(6, 6 + len).toString() };
}

describe('NBD server', { timeout: 30000 }, () => {
  let dir: string;
  let sock: string;
  let img: BlockImage;
  let ro: BlockImage;
  let server: NbdServer;
  const closedClean: boolean[] = [];

  const digest = async (): Promise<string> => {
    const b = Buffer.alloc(SIZE);
    await img.read(0, b);
    return createHash('sha256').update(b).digest('hex');
  };

  before(async () => {
    dir = tmpDir();
    sock = join(dir, 'nbd.sock');
    await createImage(join(dir, 'd.raw'), { format: 'raw', size: SIZE });
    await createImage(join(dir, 'ro.raw'), { format: 'raw', size: SIZE });
    img = await openImage(join(dir, 'd.raw'), { format: 'raw' });
    ro = await openImage(join(dir, 'ro.raw'), { format: 'raw', readOnly: true });
    await img.write(0, Buffer.alloc(SIZE, 0x5a));
    server = await NbdServer.listen({ kind: 'unix', path: sock });
    server.on('client-closed', (_name: string | null, clean: boolean) => closedClean.push(clean));
    server.addExport('d', imageTarget(img), { writable: true, description: 'the disk' });
    server.addExport('ro', imageTarget(ro), { writable: false });
  });
  after(async () => {
    await server.close();
    await img.close();
    await ro.close();
  });

  it('sends the fixed newstyle greeting: NBDMAGIC, IHAVEOPT, FIXED_NEWSTYLE|NO_ZEROES', async () => {
    const { raw, hello } = await Raw.open(sock);
    assert.equal(hello.toString('hex'), '4e42444d41474943' + '49484156454f5054' + '0003');
    raw.end();
  });

  it('drops a client that sets an unknown client flag', async () => {
    const { raw } = await Raw.open(sock, 0x7);
    await raw.closed;
    assert.equal(raw.r.available, 0);
  });

  it('answers options with QEMU\'s replies and texts', async () => {
    const { raw } = await Raw.open(sock);
    raw.option(P.NBD_OPT_LIST);
    const list = await raw.replies();
    assert.deepEqual(
      list.map((r) => [r.type, r.data.toString('hex')]),
      [
        [P.NBD_REP_SERVER, Buffer.concat([Buffer.from([0, 0, 0, 1]), Buffer.from('dthe disk')]).toString('hex')],
        [P.NBD_REP_SERVER, Buffer.concat([Buffer.from([0, 0, 0, 2]), Buffer.from('ro')]).toString('hex')],
        [P.NBD_REP_ACK, ''],
      ],
    );
    raw.option(P.NBD_OPT_LIST, Buffer.from('x'));
    assert.deepEqual(await raw.reply(), { option: 3, type: P.NBD_REP_ERR_INVALID, data: Buffer.from("option 'list' has unexpected length") });
    raw.option(99);
    assert.deepEqual(await raw.reply(), { option: 99, type: P.NBD_REP_ERR_UNSUP, data: Buffer.from('Unsupported option 99 (<unknown>)') });
    raw.option(P.NBD_OPT_STARTTLS);
    assert.equal((await raw.reply()).type, P.NBD_REP_ERR_POLICY);
    raw.option(P.NBD_OPT_INFO, goData('nope'));
    assert.deepEqual(await raw.reply(), { option: 6, type: P.NBD_REP_ERR_UNKNOWN, data: Buffer.from("export 'nope' not present") });
    const bad = goData('d');
    bad.writeUInt32BE(30, 0);
    raw.option(P.NBD_OPT_INFO, bad);
    assert.deepEqual(await raw.reply(), { option: 6, type: P.NBD_REP_ERR_INVALID, data: Buffer.from('Inconsistent lengths in option info') });
    raw.option(P.NBD_OPT_SET_META_CONTEXT, Buffer.alloc(8));
    assert.equal((await raw.reply()).type, P.NBD_REP_ERR_INVALID, 'meta contexts need structured replies');
    // INFO with every info type: NAME, DESCRIPTION, BLOCK_SIZE, EXPORT, ACK, in QEMU's order
    raw.option(P.NBD_OPT_INFO, goData('d', [0, 1, 2, 3]));
    const info = await raw.replies();
    assert.deepEqual(
      info.map((r) => r.data.toString('hex')),
      [
        '0001' + Buffer.from('d').toString('hex'),
        '0002' + Buffer.from('the disk').toString('hex'),
        '0003' + '00000001' + '00001000' + '02000000',
        '0000' + '0000000000100000' + (P.NBD_FLAG_HAS_FLAGS | P.NBD_FLAG_SEND_FLUSH | P.NBD_FLAG_SEND_FUA | P.NBD_FLAG_SEND_TRIM | P.NBD_FLAG_SEND_WRITE_ZEROES | P.NBD_FLAG_CAN_MULTI_CONN | P.NBD_FLAG_SEND_CACHE).toString(16).padStart(4, '0'),
        '',
      ],
    );
    raw.option(P.NBD_OPT_ABORT);
    assert.equal((await raw.reply()).type, P.NBD_REP_ACK);
    await raw.closed;
    assert.equal(closedClean.at(-1), true, 'an abort is a clean end');
  });

  it('ends the session for NBD_OPT_EXPORT_NAME of an unknown export (it cannot answer an error)', async () => {
    const { raw } = await Raw.open(sock);
    raw.option(P.NBD_OPT_EXPORT_NAME, Buffer.from('nope'));
    await raw.closed;
    assert.equal(raw.r.available, 0);
  });

  it('enters transmission with NBD_OPT_EXPORT_NAME: size, flags, no padding with NO_ZEROES', async () => {
    const { raw } = await Raw.open(sock);
    raw.option(P.NBD_OPT_EXPORT_NAME, Buffer.from('ro'));
    const a = await raw.r.read(10);
    assert.equal(a.readBigUInt64BE(0), BigInt(SIZE));
    assert.equal(a.readUInt16BE(8) & P.NBD_FLAG_READ_ONLY, P.NBD_FLAG_READ_ONLY);
    raw.request(P.NBD_CMD_READ, 0, 8);
    const r = await raw.simple(8);
    assert.equal(r.error, 0);
    raw.end();
  });

  it('serves reads, writes, zeroes, trim and flush with simple replies; FUA is accepted', async () => {
    const raw = await Raw.go(sock, 'd');
    raw.request(P.NBD_CMD_WRITE, 4096, 512, { data: Buffer.alloc(512, 0xab), flags: P.NBD_CMD_FLAG_FUA, handle: 1n });
    assert.deepEqual(await raw.simple(), { error: 0, handle: 1n, data: Buffer.alloc(0) });
    raw.request(P.NBD_CMD_WRITE_ZEROES, 8192, 100, { handle: 2n });
    assert.equal((await raw.simple()).error, 0);
    raw.request(P.NBD_CMD_TRIM, 65536, 4096, { handle: 3n });
    assert.equal((await raw.simple()).error, 0);
    raw.request(P.NBD_CMD_FLUSH, 0, 0, { handle: 4n });
    assert.equal((await raw.simple()).error, 0);
    raw.request(P.NBD_CMD_READ, 4095, 8194, { handle: 5n });
    const r = await raw.simple(8194);
    assert.equal(r.handle, 5n);
    assert.equal(r.data[0], 0x5a);
    assert.ok(r.data.subarray(1, 513).every((b) => b === 0xab));
    assert.ok(r.data.subarray(4097, 4197).every((b) => b === 0));
    assert.equal(r.data[4197], 0x5a);
    raw.request(P.NBD_CMD_DISC, 0, 0);
    await raw.closed;
    assert.equal(closedClean.at(-1), true, 'NBD_CMD_DISC is a clean end');
    // restore
    await img.write(0, Buffer.alloc(SIZE, 0x5a));
  });

  it('answers each malformed request with its NBD error (simple replies) and changes nothing', async () => {
    const before = await digest();
    const raw = await Raw.go(sock, 'd');
    const cases: [string, () => void, number][] = [
      ['read past the end', () => raw.request(P.NBD_CMD_READ, SIZE, 512), P.NBD_EINVAL],
      ['read across the end', () => raw.request(P.NBD_CMD_READ, SIZE - 256, 512), P.NBD_EINVAL],
      ['write past the end', () => raw.request(P.NBD_CMD_WRITE, SIZE, 512, { data: Buffer.alloc(512, 1) }), P.NBD_ENOSPC],
      ['write across the end', () => raw.request(P.NBD_CMD_WRITE, SIZE - 256, 512, { data: Buffer.alloc(512, 1) }), P.NBD_ENOSPC],
      ['write-zeroes far away', () => raw.request(P.NBD_CMD_WRITE_ZEROES, 1n << 40n, 512), P.NBD_ENOSPC],
      ['trim far away', () => raw.request(P.NBD_CMD_TRIM, 1n << 40n, 512), P.NBD_EINVAL],
      ['offset + length overflows 64 bits', () => raw.request(P.NBD_CMD_READ, 0xffffffffffffff00n, 512), P.NBD_EINVAL],
      ['an oversized read', () => raw.request(P.NBD_CMD_READ, 0, P.NBD_MAX_BUFFER_SIZE + 1), P.NBD_EINVAL],
      ['an unknown command', () => raw.request(9, 0, 512), P.NBD_EINVAL],
      ['an unknown flag', () => raw.request(P.NBD_CMD_READ, 0, 512, { flags: 0x80 }), P.NBD_EINVAL],
      ['DF without structured replies', () => raw.request(P.NBD_CMD_READ, 0, 512, { flags: P.NBD_CMD_FLAG_DF }), P.NBD_EINVAL],
      ['block status without a context', () => raw.request(P.NBD_CMD_BLOCK_STATUS, 0, 512), P.NBD_EINVAL],
    ];
    for (const [what, send, errno] of cases) {
      send();
      const r = await raw.simple();
      assert.equal(r.error, errno, what);
      assert.equal(r.handle, 7n, what);
    }
    // the connection still works
    raw.request(P.NBD_CMD_READ, 0, 16);
    assert.equal((await raw.simple(16)).data.toString('hex'), '5a'.repeat(16));
    raw.end();
    assert.equal(await digest(), before);
  });

  it('answers a write to a read-only export with EPERM', async () => {
    const raw = await Raw.go(sock, 'ro');
    for (const t of [P.NBD_CMD_WRITE, P.NBD_CMD_WRITE_ZEROES, P.NBD_CMD_TRIM]) {
      raw.request(t, 0, 512, t === P.NBD_CMD_WRITE ? { data: Buffer.alloc(512, 1) } : {});
      assert.equal((await raw.simple()).error, P.NBD_EPERM);
    }
    raw.end();
    const b = Buffer.alloc(512);
    await ro.read(0, b);
    assert.ok(b.every((x) => x === 0));
  });

  it('gives QEMU\'s error texts in structured error chunks', async () => {
    const raw = await Raw.go(sock, 'd', true);
    const expect: [() => void, number, string][] = [
      [() => raw.request(P.NBD_CMD_READ, SIZE, 512), P.NBD_EINVAL, `operation past EOF; From: ${SIZE}, Len: 512, Size: ${SIZE}`],
      [() => raw.request(P.NBD_CMD_READ, 0, 33 << 20), P.NBD_EINVAL, `len (${33 << 20} ) is larger than max len (33554432)`],
      [() => raw.request(9, 0, 0), P.NBD_EINVAL, 'invalid request type (9) received'],
      [() => raw.request(P.NBD_CMD_READ, 0, 512, { flags: 0x80 }), P.NBD_EINVAL, 'unsupported flags for command read (got 0x80)'],
    ];
    for (const [send, errno, message] of expect) {
      send();
      const c = await raw.chunk();
      assert.equal(c.flags, P.NBD_REPLY_FLAG_DONE);
      assert.deepEqual(errorChunk(c), { errno, message });
    }
    // a structured read is one OFFSET_DATA chunk, final
    raw.request(P.NBD_CMD_READ, 100, 4, { handle: 9n });
    const c = await raw.chunk();
    assert.deepEqual([c.flags, c.type, c.handle], [P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_OFFSET_DATA, 9n]);
    assert.equal(c.payload.toString('hex'), '0000000000000064' + '5a5a5a5a');
    raw.end();
  });

  it('reports base:allocation once the context is set', async () => {
    const { raw } = await Raw.open(sock);
    raw.option(P.NBD_OPT_STRUCTURED_REPLY);
    await raw.reply();
    const name = Buffer.from('d');
    const q = Buffer.from(P.BASE_ALLOCATION);
    const data = Buffer.alloc(4 + name.length + 4 + 4 + q.length);
    data.writeUInt32BE(name.length, 0);
    name.copy(data, 4);
    data.writeUInt32BE(1, 4 + name.length);
    data.writeUInt32BE(q.length, 8 + name.length);
    q.copy(data, 12 + name.length);
    raw.option(P.NBD_OPT_SET_META_CONTEXT, data);
    const rs = await raw.replies();
    assert.deepEqual(rs.map((r) => r.type), [P.NBD_REP_META_CONTEXT, P.NBD_REP_ACK]);
    assert.equal(rs[0]!.data.subarray(4).toString(), P.BASE_ALLOCATION);
    raw.option(P.NBD_OPT_GO, goData('d'));
    await raw.replies();
    raw.request(P.NBD_CMD_BLOCK_STATUS, 0, SIZE);
    const c = await raw.chunk();
    assert.equal(c.type, P.NBD_REPLY_TYPE_BLOCK_STATUS);
    // a raw image: all data, one extent
    assert.equal(c.payload.toString('hex'), '00000000' + SIZE.toString(16).padStart(8, '0') + '00000000');
    raw.end();
  });

  it('answers a bad request magic with EINVAL and then drops the connection', async () => {
    const before = await digest();
    const raw = await Raw.go(sock, 'd');
    raw.request(P.NBD_CMD_WRITE, 0, 512, { magic: 0x12345678, data: Buffer.alloc(512, 1) });
    const r = await raw.simple();
    assert.equal(r.error, P.NBD_EINVAL);
    await raw.closed;
    assert.equal(closedClean.at(-1), false);
    assert.equal(await digest(), before);
  });

  it('answers an oversized write with EINVAL, drops the connection and writes nothing', async () => {
    const before = await digest();
    const raw = await Raw.go(sock, 'd');
    raw.request(P.NBD_CMD_WRITE, 0, P.NBD_MAX_BUFFER_SIZE + 512, { data: Buffer.alloc(4096, 1) });
    assert.equal((await raw.simple()).error, P.NBD_EINVAL);
    await raw.closed;
    assert.equal(await digest(), before);
  });

  it('keeps serving new clients after all of that', async () => {
    const raw = await Raw.go(sock, 'd');
    raw.request(P.NBD_CMD_READ, 0, 4);
    assert.equal((await raw.simple(4)).data.toString('hex'), '5a5a5a5a');
    raw.end();
  });

  it('refuses to remove an export in use in safe mode, drops its clients in hard mode', async () => {
    const raw = await Raw.go(sock, 'ro');
    await assert.rejects(server.removeExport('ro', 'safe'), /export 'ro' still in use/);
    await server.removeExport('ro', 'hard');
    await raw.closed;
    await assert.rejects(server.removeExport('ro', 'hard'), /Export 'ro' is not found/);
    assert.throws(() => server.addExport('d', imageTarget(img), { writable: true }), /NBD server already has export named 'd'/);
  });
});
