import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { PassThrough } from 'node:stream';
import { StreamReader } from '../../src/migration/stream/reader.js';
import { BufferSink } from '../../src/migration/stream/writer.js';
import { WIRE } from '../../src/migration/wire/constants.js';
import {
  decodeRpMessage,
  encodeRpPong,
  encodeRpReqPages,
  encodeRpReqPagesId,
  encodeRpShut,
  putCmdOpenReturnPath,
  putCmdPackaged,
  putCmdPing,
  putCmdPostcopyAdvise,
  putCmdPostcopyListen,
  putCmdPostcopyRun,
  putCmdRamDiscard,
  putConfiguration,
  putSectionStartFull,
  readCommand,
  readConfiguration,
  readFooter,
  readRpMessage,
  readSectionPartEnd,
  readVmdesc,
} from '../../src/migration/wire/records.js';

const hex = (b: Uint8Array) => Buffer.from(b).toString('hex').replace(/(..)/g, '$1 ').trim();
const bytes = (h: string) => Buffer.from(h.replace(/\s+/g, ''), 'hex');
function sink(f: (s: BufferSink) => void): Buffer {
  const s = new BufferSink();
  f(s);
  return s.toBuffer();
}
async function cmd(h: string) {
  const r = StreamReader.fromBuffer(bytes(h));
  assert.equal(r.get8(), 0x08);
  return readCommand(r);
}

describe('constants', () => {
  it('has the wire numbers', () => {
    assert.equal(WIRE.MAGIC, 0x5145564d);
    assert.equal(WIRE.SECTION.FOOTER, 0x7e);
    assert.equal(WIRE.LIMITS.RP_MAX_LEN, 512);
    assert.equal(WIRE.LIMITS.PACKAGED_MAX, 16 * 1024 * 1024);
  });
});

describe('commands (docs/spec/stream-format.md §10 examples)', () => {
  it('encodes', () => {
    assert.equal(hex(sink(putCmdOpenReturnPath)), '08 00 01 00 00');
    assert.equal(hex(sink((s) => putCmdPing(s, 1))), '08 00 02 00 04 00 00 00 01');
    assert.equal(
      hex(sink((s) => putCmdPostcopyAdvise(s, 0x1000, 0x1000))),
      '08 00 03 00 10 00 00 00 00 00 00 10 00 00 00 00 00 00 00 10 00',
    );
    assert.equal(hex(sink((s) => putCmdPackaged(s, 0x346b))), '08 00 07 00 04 00 00 34 6b');
    assert.equal(hex(sink(putCmdPostcopyListen)), '08 00 04 00 00');
    assert.equal(hex(sink(putCmdPostcopyRun)), '08 00 05 00 00');
    assert.equal(
      hex(sink((s) => putCmdRamDiscard(s, 'pc.ram', [[0x10000, 0x3ff0000]]))),
      '08 00 06 00 19 00 06 70 63 2e 72 61 6d 00 00 00 00 00 00 01 00 00 00 00 00 00 03 ff 00 00',
    );
  });
  it('decodes and validates', async () => {
    assert.deepEqual(await cmd('08 00 02 00 04 00 00 00 01'), { cmd: 'PING', value: 1 });
    assert.deepEqual(await cmd('08 00 03 00 10 00 00 00 00 00 00 10 00 00 00 00 00 00 00 10 00'), {
      cmd: 'POSTCOPY_ADVISE',
      pageSizeSummary: 0x1000,
      targetPageSize: 0x1000,
    });
    assert.deepEqual(await cmd('08 00 06 00 19 00 06 70 63 2e 72 61 6d 00 00 00 00 00 00 01 00 00 00 00 00 00 03 ff 00 00'), {
      cmd: 'POSTCOPY_RAM_DISCARD',
      blockName: 'pc.ram',
      ranges: [[0x10000, 0x3ff0000]],
    });
    assert.deepEqual(await cmd('08 00 07 00 04 00 00 00 02 aa bb'), { cmd: 'PACKAGED', length: 2, blob: Buffer.from([0xaa, 0xbb]) });
    await assert.rejects(cmd('08 00 09 00 03'), { message: 'MIG_CMD 0x9 unknown (len 0x3)' });
    await assert.rejects(cmd('08 00 00 00 00'), { message: 'MIG_CMD 0x0 unknown (len 0x0)' });
    await assert.rejects(cmd('08 00 02 00 05 00 00 00 00 01'), { message: 'PING received with bad length - expecting 4, got 5' });
    await assert.rejects(cmd('08 00 07 00 04 01 00 00 01'), { message: 'Unreasonably large packaged state: 16777217' });
    await assert.rejects(cmd('08 00 06 00 14 01 01 61 00 00000000000000000000000000000000'), {
      message: 'CMD_POSTCOPY_RAM_DISCARD invalid version (1)',
    });
    await assert.rejects(cmd('08 00 06 00 14 00 01 61 05 00000000000000000000000000000000'), {
      message: 'CMD_POSTCOPY_RAM_DISCARD missing nil (5)',
    });
    await assert.rejects(cmd('08 00 06 00 13 00 00 00 00000000000000000000000000000000'), {
      message: 'CMD_POSTCOPY_RAM_DISCARD invalid length (19)',
    });
    await assert.rejects(cmd('08 00 02 00 04 00 00'), { message: 'Unexpected end of migration stream' });
  });
});

describe('return path (§12)', () => {
  it('encodes the captured messages', () => {
    assert.equal(hex(encodeRpPong(1)), '00 02 00 04 00 00 00 01');
    assert.equal(hex(encodeRpShut(0)), '00 01 00 04 00 00 00 00');
    assert.equal(
      hex(encodeRpReqPagesId(0xc0000, 0x1000, 'pc.ram')),
      '00 03 00 13 00 00 00 00 00 0c 00 00 00 00 10 00 06 70 63 2e 72 61 6d',
    );
    assert.equal(hex(encodeRpReqPages(0x90000, 0x1000)), '00 04 00 0c 00 00 00 00 00 09 00 00 00 00 10 00');
  });
  it('decodes and validates', async () => {
    const all = Buffer.concat([encodeRpPong(1), encodeRpReqPagesId(0xc0000, 0x1000, 'pc.ram'), encodeRpReqPages(0x90000, 0x1000), encodeRpShut(0)]);
    const r = StreamReader.fromBuffer(all);
    assert.deepEqual(await readRpMessage(r), { type: 'PONG', value: 1 });
    assert.deepEqual(await readRpMessage(r), { type: 'REQ_PAGES_ID', start: 0xc0000, length: 0x1000, blockName: 'pc.ram' });
    assert.deepEqual(await readRpMessage(r), { type: 'REQ_PAGES', start: 0x90000, length: 0x1000 });
    assert.deepEqual(await readRpMessage(r), { type: 'SHUT', value: 0 });
    assert.equal(decodeRpMessage(all.subarray(0, 7)), null);
    assert.deepEqual(decodeRpMessage(all, 0)!.size, 8);
    assert.throws(() => decodeRpMessage(bytes('00 09 00 00')), { message: 'RP: Received invalid message 0x0009 length 0x0000' });
    assert.throws(() => decodeRpMessage(bytes('00 02 00 05')), { message: "RP: Received 'PONG' message (0x0002) withincorrect length 5 expecting 4" });
    assert.throws(() => decodeRpMessage(bytes('00 03 02 01')), /withincorrect length 513/);
  });
});

describe('configuration record', () => {
  it('prefix comparison like strncmp over the received length', async () => {
    const cfg = (name: string) => StreamReader.fromBuffer(sink((s) => putConfiguration(s, name)));
    assert.equal((await readConfiguration(cfg('none'), 'none')).machine, 'none');
    assert.equal((await readConfiguration(cfg('no'), 'none')).machine, 'no'); // QEMU quirk
    await assert.rejects(readConfiguration(cfg('pc'), 'none'), { message: "Machine type received is 'pc' and local is 'none'" });
    await assert.rejects(readConfiguration(cfg('none-x'), 'none'), { message: "Machine type received is 'none-x' and local is 'none'" });
    await assert.rejects(readConfiguration(StreamReader.fromBuffer(bytes('01')), 'none'), { message: 'Configuration section missing' });
  });
  it('reads subsections', async () => {
    const b = sink((s) => {
      putConfiguration(s, 'none');
      s.put8(0x05);
      s.putCountedString('configuration/target-page-bits');
      s.put32(1);
      s.put32(12);
      s.put8(0x05);
      s.putCountedString('configuration/capabilities');
      s.put32(1);
      s.put32(1);
      s.putCountedString('x-ignore-shared');
      s.put8(0x00);
    });
    const c = await readConfiguration(StreamReader.fromBuffer(b), 'none');
    assert.deepEqual(c, { machine: 'none', targetPageBits: 12, capabilities: ['x-ignore-shared'] });
    const bad = sink((s) => {
      putConfiguration(s, 'none');
      s.put8(0x05);
      s.putCountedString('configuration/target-page-bits');
      s.put32(1);
      s.put32(13);
    });
    await assert.rejects(readConfiguration(StreamReader.fromBuffer(bad), 'none'), { message: 'Received TARGET_PAGE_BITS is 13 but local is 12' });
  });
  it('section headers encode as in the none-16M example', () => {
    assert.equal(hex(sink((s) => putSectionStartFull(s, 1, 2, 'ram', 0, 4))), '01 00 00 00 02 03 72 61 6d 00 00 00 00 00 00 00 04');
  });
  it('vmdesc trailer: present, absent, other byte', async () => {
    assert.deepEqual(await readVmdesc(StreamReader.fromBuffer(bytes('06 00 00 00 02 7b 7d'))), { json: '{}' });
    assert.deepEqual(await readVmdesc(StreamReader.fromBuffer(Buffer.alloc(0))), { json: null, notice: 'Expected vmdescription section, but got -1' });
    assert.deepEqual(await readVmdesc(StreamReader.fromBuffer(bytes('00'))), { json: null, notice: 'Expected vmdescription section, but got 0' });
  });
});

describe('section PART/END id and footer', () => {
  it('answer at once when buffered, and the same once the bytes arrive', async () => {
    const buffered = StreamReader.fromBuffer(bytes('00 00 00 03  7e 00 00 00 03'));
    const id = readSectionPartEnd(buffered);
    assert.ok(!(id instanceof Promise), 'no promise for buffered bytes');
    assert.deepEqual(id, { sectionId: 3 });
    assert.equal(readFooter(buffered, 'ram', 3), undefined);

    const src = new PassThrough();
    const later = new StreamReader(src);
    const p = readSectionPartEnd(later);
    assert.ok(p instanceof Promise);
    src.write(bytes('00 00'));
    src.write(bytes('00 03 7e 00'));
    assert.deepEqual(await p, { sectionId: 3 });
    const f = readFooter(later, 'ram', 3);
    assert.ok(f instanceof Promise);
    src.write(bytes('00 00 03'));
    await f;
    assert.equal(later.bytesRead, 9);
  });

  it('wrong, mismatched and truncated footers, buffered or not', async () => {
    const sync = (h: string) => () => readFooter(StreamReader.fromBuffer(bytes(h)), 'ram', 3);
    assert.throws(sync('7d 00 00 00 03'), { message: 'Missing section footer for ram' });
    assert.throws(sync('7e 00 00 00 04'), { message: 'Mismatched section id in footer for ram - read 0x4 expected 0x3' });
    // the stream ends inside the footer: a wrong first byte is still named
    await assert.rejects(async () => readFooter(StreamReader.fromBuffer(bytes('7d 00')), 'ram', 3), { message: 'Missing section footer for ram' });
    await assert.rejects(async () => readFooter(StreamReader.fromBuffer(bytes('7e 00')), 'ram', 3), { message: /end of migration stream/ });
    await assert.rejects(async () => readSectionPartEnd(StreamReader.fromBuffer(bytes('00 00'))), { message: /end of migration stream/ });
  });
});
