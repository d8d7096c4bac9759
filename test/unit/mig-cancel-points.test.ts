/**
 * migrate_cancel at every point of an outgoing migration (the session's
 * trace points), on an in-process pair. Each cancel ends in a known state:
 *
 *  - the source status goes ... cancelling -> cancelled, and its session is
 *    disposed exactly once;
 *  - before the switch to postcopy the source runs on with its memory
 *    intact (QEMU restarts a source that was running, even when every byte
 *    was already out: the known bug this fixes left it in `cancelling`);
 *    after the switch it stays stopped in postmigrate (its copy is stale);
 *  - the destination never runs a half-loaded guest: it runs only when it
 *    completed, with the source's memory;
 *  - a new migration afterwards completes with equal memory.
 */
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import type { SourceTracePoint } from '../../src/migration/core/outgoing.js';
import type { MigrationCapability } from '../../src/generated/qapi-types.js';
import { Pair } from '../helpers/pair.js';

const pairs: Pair[] = [];
after(async () => {
  for (const p of pairs) await p.close();
});

const guest = { ramSize: 8 << 20, smp: 1, fill: { kind: 'random' as const, seed: 11 }, workload: { kind: 'idle' as const } };

interface Case {
  point: SourceTracePoint;
  caps?: MigrationCapability[];
  postcopy?: boolean;
  /** the source runs on afterwards (false: stays in postmigrate) */
  runsOn: boolean;
  /**
   * the cancel came after the last byte while the return path's verdict was
   * pending: it waits for the SHUT, which is 0, so the migration completes
   * (resuming the source could leave two running copies)
   */
  tooLate?: boolean;
  params?: Record<string, number>;
}

const CASES: Case[] = [
  { point: 'connected', runsOn: true },
  { point: 'setup-sent', runsOn: true },
  { point: 'slice', runsOn: true, params: { 'max-bandwidth': 4 << 20 } },
  { point: 'stopped', runsOn: true },
  { point: 'sent', runsOn: true },
  { point: 'lingering', runsOn: true },
  { point: 'sent', caps: ['return-path'], runsOn: false, tooLate: true },
  { point: 'postcopy-stopped', postcopy: true, runsOn: false },
  { point: 'package-sent', postcopy: true, runsOn: false },
  { point: 'postcopy-slice', postcopy: true, runsOn: false },
  { point: 'postcopy-sent', postcopy: true, runsOn: false },
];

describe('migrate_cancel at every point', () => {
  for (const c of CASES) {
    const name = `${c.point}${c.caps ? ` (${c.caps.join(',')})` : ''}`;
    const what = c.tooLate ? 'too late: completed after the SHUT 0' : `cancelled, ${c.runsOn ? 'the source runs on with its memory' : 'the source stays in postmigrate'}`;
    it(`at ${name}: ${what}`, async () => {
      let hit = 0;
      let requested = false;
      const p = await Pair.create({
        guest,
        caps: c.postcopy ? ['postcopy-ram'] : c.caps,
        params: { 'max-bandwidth': c.postcopy ? 2 << 20 : 0, ...c.params },
        paused: true,
        onSourceTrace: (pt, pr) => {
          if (c.postcopy && pt === 'slice' && !requested) {
            requested = true;
            pr.src.source.requestPostcopy();
          }
          if (pt === c.point && hit++ === 0) pr.src.source.cancel();
        },
      });
      pairs.push(p);
      const before = (await p.src.machine.digest()).digest;
      await p.migrate();
      assert.equal(hit >= 1, true, `the migration reached '${c.point}' (${p.src.traces.join(' ')})`);
      const src = p.src;
      if (c.tooLate) {
        assert.equal(src.source.status, 'completed', JSON.stringify(src.source.info()));
        assert.ok(!src.statuses.includes('cancelling'), src.statuses.join(' '));
        assert.equal(src.machine.runState, 'postmigrate');
        await p.dst!.destination.whenDone();
        assert.equal(p.dst!.destination.status, 'completed');
        assert.equal((await p.dst!.machine.digest()).digest, before);
        return;
      }
      assert.equal(src.source.status, 'cancelled', JSON.stringify(src.source.info()));
      assert.deepEqual(src.source.info(), { status: 'cancelled' });
      assert.deepEqual(src.statuses.slice(-2), ['cancelling', 'cancelled']);
      assert.equal(src.traces.filter((t) => t === 'disposed').length, 1, 'the session was disposed once');
      if (c.runsOn) {
        assert.equal(src.machine.runState, 'running');
        assert.equal((await src.machine.digest()).digest, before, 'the source memory is intact');
      } else {
        assert.equal(src.machine.runState, 'postmigrate');
      }
      // the destination never runs a half-loaded guest
      const dst = p.dst!;
      await dst.destination.whenDone();
      assert.equal(dst.traces.filter((t) => t === 'disposed').length, 1, 'the incoming session was disposed once');
      if (dst.destination.status === 'completed') {
        if (dst.machine.runState !== 'running') assert.equal((await dst.machine.digest()).digest, before);
      } else {
        assert.equal(dst.destination.status, 'failed', dst.statuses.join(' '));
        assert.ok(['inmigrate', 'internal-error'].includes(dst.machine.runState), dst.machine.runState);
      }
      // and a new migration works
      await p.newDestination();
      hit = 1;
      await p.migrate();
      assert.equal(src.source.status, 'completed', JSON.stringify(src.source.info()));
      assert.equal(p.dst!.destination.status, 'completed');
      assert.equal((await p.dst!.machine.digest()).digest, (await src.machine.digest()).digest);
      assert.equal(src.traces.filter((t) => t === 'disposed').length, 2);
    });
  }
});
