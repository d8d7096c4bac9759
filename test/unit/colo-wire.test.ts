/**
 * COLO's framing (src/migration/colo/wire.ts) on bytes in memory: QEMU's
 * texts for each way a message can be wrong or missing, and Ferry's own
 * messages only where the peer said it knows them.
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { StreamReader } from '../../src/migration/stream/reader.js';
import { ColoReader, FERRY_CONSOLE, FERRY_HEARTBEAT, MSG } from '../../src/migration/colo/wire.js';

function be32(...v: number[]): Buffer {
  const b = Buffer.alloc(4 * v.length);
  v.forEach((x, i) => b.writeUInt32BE(x >>> 0, 4 * i));
  return b;
}

const reader = (b: Buffer, ext = false): ColoReader => {
  const r = new ColoReader(StreamReader.fromBuffer(b));
  r.extensions = ext;
  return r;
};

describe('COLO messages', () => {
  it('an unexpected message: "Unexpected COLO message %d, expected %d"', async () => {
    await assert.rejects(reader(be32(MSG.VMSTATE_RECEIVED)).expect(MSG.CHECKPOINT_REPLY), { message: 'Unexpected COLO message 5, expected 2' });
  });

  it('beyond COLOMessage: "Invalid message"; Ferry\'s own only with extensions', async () => {
    await assert.rejects(reader(be32(7)).next(), { message: 'colo_receive_message: Invalid message' });
    await assert.rejects(reader(be32(FERRY_HEARTBEAT, MSG.CHECKPOINT_READY)).next(), { message: 'colo_receive_message: Invalid message' });
    const lines: string[] = [];
    const r = reader(Buffer.concat([be32(FERRY_HEARTBEAT, FERRY_CONSOLE, 3), Buffer.from('hi\n'), be32(MSG.CHECKPOINT_READY)]), true);
    assert.equal(await r.nextColo((l) => lines.push(l)), MSG.CHECKPOINT_READY);
    assert.deepEqual(lines, ['hi\n']);
    await assert.rejects(reader(be32(FERRY_CONSOLE, 1 << 20), true).next(), /exceeds the limit/);
  });

  it('the peer gone: "Can\'t receive COLO message", a short value, a short checkpoint', async () => {
    await assert.rejects(reader(Buffer.of(0, 0)).next(), { message: "Can't receive COLO message: Input/output error" });
    await assert.rejects(reader(Buffer.concat([be32(MSG.VMSTATE_SIZE), Buffer.of(0, 0, 0)])).expectValue(MSG.VMSTATE_SIZE), {
      message: 'Failed to get value for COLO message: vmstate-size: Input/output error',
    });
    const r = reader(Buffer.concat([be32(MSG.VMSTATE_SIZE, 0, 10), Buffer.from('abc')]));
    assert.equal(await r.expectValue(MSG.VMSTATE_SIZE), 10);
    await assert.rejects(r.readBlob(Buffer.alloc(0), 10), { message: 'Got 3 VMState data, less than expected 10' });
  });
});
