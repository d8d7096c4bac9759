/**
 * Findings of the reliability suite, each kept as a small regression test.
 */
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { Pair } from '../helpers/pair.js';

const pairs: Pair[] = [];
after(async () => {
  for (const p of pairs) await p.close();
});

const guest = { ramSize: 4 << 20, smp: 1, fill: { kind: 'random' as const, seed: 9 }, workload: { kind: 'idle' as const } };

describe('reliability findings', () => {
  it('an exec: forwarder that exits non-zero after the last byte (cat > FILE on a full disk) fails the migration; the source runs on', async () => {
    // the matrix's completion × disk-full: the source said completed while `cat` had failed to write the tail
    const p = await Pair.create({ guest, noDestination: true, uri: () => 'exec:cat > /dev/null; exit 1' });
    pairs.push(p);
    const before = (await p.src.machine.digest()).digest;
    p.src.source.start(p.uri);
    await p.src.source.whenIdle();
    assert.equal(p.src.source.status, 'failed', JSON.stringify(p.src.source.info()));
    assert.match(p.src.source.info()['error-desc']!, /exited with status 1/);
    assert.equal(p.src.machine.runState, 'running');
    assert.equal((await p.src.machine.digest()).digest, before);
  });
});
