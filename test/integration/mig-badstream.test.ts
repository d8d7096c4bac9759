/**
 * Bad incoming streams fed through `-incoming "exec:cat FILE"`: every one must
 * end in `failed` with a precise error-desc, the guest must never run, and the
 * process must stay up answering QMP.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { WIRE } from '../../src/migration/wire/constants.js';
import { loadStreamFile } from '../helpers/migration.js';
import { buildStream, captureStream, findPageRecord, parseLayout, unknownSectionStream, writeStream, type Capture, type StreamLayout } from '../helpers/streams.js';
import { cleanupAll, tempDir, type VmHandle } from '../helpers/vm.js';

after(cleanupAll);

const VM = ['-m', '32M', '-fill', 'random,seed=11'];
let dir: string;
let cap: Capture;
let lay: StreamLayout;

before(async () => {
  dir = tempDir('ferry-badstream-');
  cap = await captureStream(dir, VM);
  lay = parseLayout(cap.bytes);
});

let n = 0;
/** Load `bytes` on a fresh -S destination; returns query-migrate and the run state. */
async function load(bytes: Buffer, args: string[] = VM): Promise<{ info: Record<string, any>; status: string; vm: VmHandle }> {
  const f = writeStream(dir, `bad-${n++}.mig`, bytes);
  const { vm, info } = await loadStreamFile(f, { dir, name: `dst${n}`, args: [...args, '-S'] });
  const status = await vm.status();
  return { info, status, vm };
}

async function expectFailure(bytes: Buffer, desc: string | RegExp, args?: string[]): Promise<void> {
  const { info, status, vm } = await load(bytes, args);
  assert.equal(info.status, 'failed', JSON.stringify(info));
  if (typeof desc === 'string') assert.equal(info['error-desc'], desc);
  else assert.match(info['error-desc'], desc);
  assert.equal(status, 'inmigrate', 'a failed load never runs the guest');
  // still alive and answering; cont does not start a half-loaded guest
  assert.equal(vm.exitCode, null);
  assert.deepEqual(await vm.execute('query-status'), { status: 'inmigrate', running: false, singlestep: false });
  await vm.quit();
}

const TRUNC = 'load of migration failed: Unexpected end of migration stream';

describe('bad incoming streams (exec:cat FILE)', () => {
  it('the unmodified captured stream loads (control)', async () => {
    const { info, status, vm } = await load(cap.bytes);
    assert.equal(info.status, 'completed', JSON.stringify(info));
    assert.equal(status, 'paused');
    assert.equal(await vm.digest(), cap.digest);
    await vm.quit();
  });

  it('empty stream', async () => {
    await expectFailure(Buffer.alloc(0), TRUNC);
  });

  it('truncated inside the header / configuration / ram setup', async () => {
    await Promise.all([2, 6, lay.config + 3, lay.machineName + 1, lay.ramIdstr + 2, lay.memSize + 4].map((at) => expectFailure(cap.bytes.subarray(0, at), TRUNC)));
  });

  it('truncated in the middle of a RAM page and just before EOF', async () => {
    const page = findPageRecord(cap.bytes, lay.firstBlockLength + 8);
    assert.ok(page > 0, 'captured stream has a PAGE record');
    await expectFailure(cap.bytes.subarray(0, page + 8 + 100), TRUNC);
    await expectFailure(cap.bytes.subarray(0, Math.floor(cap.bytes.length / 2)), TRUNC);
    // find the EOF byte: the vmdesc (0x06 ...) follows it; cut right before EOF
    const vmdesc = cap.bytes.lastIndexOf(Buffer.from([WIRE.SECTION.VMDESCRIPTION]), cap.bytes.length - 1);
    const json = cap.bytes.indexOf(Buffer.from('{"page_size"'), 0);
    const eof = json > 0 ? json - 5 - 1 : vmdesc - 1; // 0x06 be32(len) json...; EOF precedes 0x06
    assert.equal(cap.bytes[eof], WIRE.SECTION.EOF);
    assert.equal(cap.bytes[eof + 1], WIRE.SECTION.VMDESCRIPTION);
    await expectFailure(cap.bytes.subarray(0, eof), TRUNC);
  });

  it('wrong magic: "Not a migration stream"', async () => {
    const b = Buffer.from(cap.bytes);
    b.write('QEVX', 0, 'latin1');
    await expectFailure(b, 'load of migration failed: Not a migration stream');
    await expectFailure(Buffer.from('hello, this is not a migration stream at all\n'), 'load of migration failed: Not a migration stream');
  });

  it('wrong version: v2 obsolete, v4 unsupported', async () => {
    await expectFailure(buildStream({ version: 2 }), "load of migration failed: SaveVM v2 format is obsolete and don't work anymore");
    await expectFailure(buildStream({ version: 4 }), 'load of migration failed: Unsupported migration stream version');
    const b = Buffer.from(cap.bytes);
    b.writeUInt32BE(1, 4);
    await expectFailure(b, 'load of migration failed: Unsupported migration stream version');
  });

  it('unknown section, unknown section type, section id without START', async () => {
    await expectFailure(unknownSectionStream('bogus-dev'), "load of migration failed: Unknown savevm section or instance 'bogus-dev' 0");
    await expectFailure(buildStream({ body: (w) => w.put8(0x42) }), 'load of migration failed: Unknown savevm section type 66');
    await expectFailure(
      buildStream({ body: (w) => { w.put8(WIRE.SECTION.PART); w.put32(9); } }),
      'load of migration failed: Unknown savevm section 9',
    );
  });

  it('wrong machine type', async () => {
    await expectFailure(buildStream({ machine: 'pc-i440fx-2.10' }), "load of migration failed: Machine type received is 'pc-i440fx-2.10' and local is 'none'");
  });

  it('wrong ram section version', async () => {
    const b = Buffer.from(cap.bytes);
    b.writeUInt32BE(5, lay.ramVersion);
    await expectFailure(b, "load of migration failed: savevm: unsupported version 5 for 'ram' v4");
  });

  it('wrong block size: mutated stream and a destination with different -m', async () => {
    const b = Buffer.from(cap.bytes);
    const len = Number(b.readBigUInt64BE(lay.firstBlockLength));
    assert.equal(len, 32 << 20);
    b.writeBigUInt64BE(BigInt(16 << 20), lay.firstBlockLength);
    // the MEM_SIZE total still says 32M: the block length is checked against the local block first
    await expectFailure(b, `load of migration failed: Size mismatch: ${lay.firstBlockName}: 0x1000000 != 0x2000000: Invalid argument`);
    await expectFailure(cap.bytes, `load of migration failed: Size mismatch: ${lay.firstBlockName}: 0x2000000 != 0x4000000: Invalid argument`, ['-m', '64M']);
  });

  it('unknown ram block name', async () => {
    const b = Buffer.from(cap.bytes);
    const nameAt = lay.firstBlockLength - lay.firstBlockName.length;
    b[nameAt] = 'X'.charCodeAt(0);
    const bad = 'X' + lay.firstBlockName.slice(1);
    await expectFailure(b, `load of migration failed: Unknown ramblock "${bad}", cannot accept migration`);
  });

  it('random bit flips in section headers never crash the process nor run the guest', async () => {
    // deterministic PRNG so failures reproduce
    let s = 0x1234567;
    const rnd = () => ((s = (s * 1103515245 + 12345) >>> 0) >>> 8);
    const headerBytes = [
      ...Array.from({ length: lay.memSize + 8 - lay.ramStart }, (_, i) => lay.ramStart + i),
      lay.config, lay.config + 1, lay.config + 4,
    ];
    const cases = Array.from({ length: 8 }, () => {
      const b = Buffer.from(cap.bytes);
      const at = headerBytes[rnd() % headerBytes.length]!;
      b[at] ^= 1 << (rnd() % 8);
      return { b, at };
    });
    await Promise.all(cases.map(async ({ b, at }) => {
      const { info, status, vm } = await load(b);
      if (at === lay.ramStart && b[at] === WIRE.SECTION.EOF) {
        // START (0x01) flipped into EOF (0x00): header + config + EOF is a valid, empty
        // stream, QEMU completes it too; the guest must simply not equal the source
        assert.equal(info.status, 'completed');
        assert.notEqual(await vm.digest(), cap.digest);
        await vm.quit();
        return;
      }
      // a flip in a length or id field must be detected; whatever the error, never running
      assert.equal(info.status, 'failed', `flip at ${at}: ${JSON.stringify(info)}`);
      assert.match(info['error-desc'], /^load of migration failed: \S/);
      assert.equal(status, 'inmigrate');
      assert.equal(vm.exitCode, null);
      await vm.quit();
    }));
  });

  it('garbage of many sizes does not crash the process', async () => {
    let s = 99;
    const rnd = () => ((s = (s * 1103515245 + 12345) >>> 0) >>> 8) & 0xff;
    for (const size of [1, 9, 100, 5000]) {
      const g = Buffer.alloc(size, 0).map(() => rnd());
      const { info, status, vm } = await load(Buffer.from(g));
      assert.equal(info.status, 'failed');
      assert.equal(status, 'inmigrate');
      assert.equal(vm.exitCode, null);
      await vm.quit();
    }
    // valid header followed by garbage sections
    const junk = Buffer.alloc(3000, 0).map(() => rnd());
    junk[0] = 0x80 | junk[0]!; // not EOF (0x00), which would make a valid empty stream
    const g2 = Buffer.concat([buildStream(), junk]);
    const { info, status, vm } = await load(g2);
    assert.equal(info.status, 'failed');
    assert.equal(status, 'inmigrate');
    await vm.quit();
  });
});
