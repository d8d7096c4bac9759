/**
 * The return path's two ends (src/migration/return-path/): the writer's
 * messages as bytes, and the reader's verdicts — SHUT decides, it reads on
 * after SHUT (COLO talks on), the end of the input after SHUT is a normal
 * end, before SHUT it fails the migration with QEMU's wording, and page
 * requests go to the sink or are refused in precopy.
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { PassThrough } from 'node:stream';
import { EventEmitter } from 'node:events';
import type { Channel } from '../../src/migration/channel/channel.js';
import type { MigrationFailure } from '../../src/migration/errors.js';
import { ReturnPathReader } from '../../src/migration/return-path/reader.js';
import { ReturnPathWriter } from '../../src/migration/return-path/writer.js';
import { encodeRpPong, encodeRpReqPages, encodeRpReqPagesId, encodeRpShut } from '../../src/migration/wire/records.js';
import { Collector } from './mig-helpers.js';

/** A channel over two in-memory streams. */
function fakeChannel(input = new PassThrough(), output: NodeJS.WritableStream & import('node:stream').Writable = new Collector()): Channel {
  const ch = Object.assign(new EventEmitter(), {
    input,
    output,
    bidirectional: true,
    closed: false,
    released: false,
    error: undefined,
    close() {},
    describe: () => 'fake',
    limitSocketBuffers: () => false,
  });
  return ch as unknown as Channel;
}

const tick = () => new Promise((r) => setImmediate(r));

describe('ReturnPathReader', () => {
  it('SHUT 0 is the verdict; it reads on after SHUT and the end of the input is then normal', async () => {
    const input = new PassThrough();
    const errors: MigrationFailure[] = [];
    const rp = new ReturnPathReader(fakeChannel(input), (e) => errors.push(e));
    input.write(encodeRpPong(1));
    input.write(encodeRpShut(0));
    assert.equal(await rp.waitForShut(), 0);
    input.write(encodeRpPong(7)); // after SHUT: still read
    await tick();
    assert.deepEqual(rp.pongs, [1, 7]);
    input.end();
    await rp.settle(1000);
    assert.deepEqual(errors, [], 'no failure after the verdict');
    assert.equal(rp.shutValue, 0);
  });

  it('a failing SHUT before PONG 3 says the destination never ran; after PONG 3 it may have', async () => {
    for (const [pongs, before] of [[[1, 2], true], [[1, 2, 3], false]] as const) {
      const input = new PassThrough();
      const errors: MigrationFailure[] = [];
      const rp = new ReturnPathReader(fakeChannel(input), (e) => errors.push(e));
      for (const p of pongs) input.write(encodeRpPong(p));
      input.write(encodeRpShut(1));
      assert.equal(await rp.waitForShut(), 1);
      assert.equal(rp.failedBeforeRun(), before);
      assert.equal(errors.length, 1);
      assert.equal(errors[0]!.kind, 'peer');
      assert.equal(errors[0]!.message, 'Destination reported failure (SHUT 1)');
    }
  });

  it('the end of the input before SHUT fails the migration, in QEMU\'s words', async () => {
    const input = new PassThrough();
    const errors: MigrationFailure[] = [];
    const rp = new ReturnPathReader(fakeChannel(input), (e) => errors.push(e));
    const shut = rp.waitForShut();
    input.end(encodeRpPong(1).subarray(0, 6));
    await assert.rejects(shut, { message: 'Detected IO failure for postcopy. Migration fails: Unexpected end of migration stream' });
    assert.equal(errors[0]!.kind, 'stream');
  });

  it('page requests: refused in precopy, checked and queued by the sink in postcopy', async () => {
    const input = new PassThrough();
    const errors: MigrationFailure[] = [];
    const rp = new ReturnPathReader(fakeChannel(input), (e) => errors.push(e));
    input.write(encodeRpReqPages(0, 4096));
    await tick();
    assert.equal(errors[0]!.message, 'Detected IO failure for postcopy. Migration fails: Unexpected return path message REQ_PAGES in precopy');

    const input2 = new PassThrough();
    const got: Array<[string | null, number, number]> = [];
    const rp2 = new ReturnPathReader(fakeChannel(input2), () => undefined);
    rp2.setPageRequestSink({ request: (b, s, l) => void got.push([b, s, l]) });
    input2.write(encodeRpReqPagesId(8192, 4096, 'pc.ram'));
    input2.write(encodeRpReqPages(12288, 8192));
    await tick();
    assert.deepEqual(got, [['pc.ram', 8192, 4096], [null, 12288, 8192]]);
    void rp;
  });
});

describe('ReturnPathWriter', () => {
  it('writes nothing before OPEN_RETURN_PATH, then PONG, REQ_PAGES_ID on a new block, REQ_PAGES after, SHUT', () => {
    const out = new Collector();
    const w = new ReturnPathWriter();
    w.attach(fakeChannel(new PassThrough(), out));
    w.pong(1);
    assert.equal(w.isOpen, false);
    w.open();
    w.pong(2);
    w.requestPages(0, 'pc.ram', 4096, 4096);
    w.requestPages(0, 'pc.ram', 8192, 4096);
    w.requestPages(1, 'pc.ram.1', 0, 4096);
    w.shut(0);
    const want = Buffer.concat([
      encodeRpPong(2),
      encodeRpReqPagesId(4096, 4096, 'pc.ram'),
      encodeRpReqPages(8192, 4096),
      encodeRpReqPagesId(0, 4096, 'pc.ram.1'),
      encodeRpShut(0),
    ]);
    assert.deepEqual(out.data, want);
    assert.equal(w.requests, 3);
  });
});
