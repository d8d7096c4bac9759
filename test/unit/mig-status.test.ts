/**
 * The MigrationStatus tables (src/migration/core/status.ts): every listed
 * move is taken, every move not listed throws, on both sides; and the
 * tables say what QEMU's states allow (the moves tests and users rely on).
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { MigrationStatus_VALUES, type MigrationStatus } from '../../src/generated/qapi-types.js';
import {
  DESTINATION_TRANSITIONS,
  IllegalTransition,
  SOURCE_TRANSITIONS,
  StatusMachine,
  type TransitionTable,
} from '../../src/migration/core/status.js';

/** A machine in state `at`, reached through the table itself (breadth-first from none). */
function machineAt(side: 'source' | 'destination', table: TransitionTable, at: MigrationStatus, seen: MigrationStatus[]): StatusMachine {
  const path = new Map<MigrationStatus, MigrationStatus[]>([['none', []]]);
  const queue: MigrationStatus[] = ['none'];
  while (queue.length) {
    const s = queue.shift()!;
    for (const n of table[s]) {
      if (!path.has(n)) {
        path.set(n, [...path.get(s)!, n]);
        queue.push(n);
      }
    }
  }
  const route = path.get(at);
  assert.ok(route, `${side}: '${at}' cannot be reached from 'none'`);
  const m = new StatusMachine(side, table, (s) => seen.push(s));
  for (const s of route) m.to(s);
  assert.equal(m.status, at);
  return m;
}

for (const [side, table] of [['source', SOURCE_TRANSITIONS], ['destination', DESTINATION_TRANSITIONS]] as const) {
  describe(`${side} status table`, () => {
    it('lists every MigrationStatus', () => {
      assert.deepEqual(Object.keys(table).sort(), [...MigrationStatus_VALUES].sort());
    });

    it('takes every listed move and announces it', () => {
      let moves = 0;
      for (const from of MigrationStatus_VALUES) {
        if (from !== 'none' && ![...Object.values(table)].some((l) => l.includes(from))) continue; // unreachable here
        for (const to of table[from]) {
          const seen: MigrationStatus[] = [];
          const m = machineAt(side, table, from, seen);
          seen.length = 0;
          m.to(to);
          assert.equal(m.status, to);
          assert.deepEqual(seen, [to]);
          moves++;
        }
      }
      assert.ok(moves >= (side === 'source' ? 18 : 9), `${moves} moves`);
    });

    it('throws IllegalTransition for every move it does not list, and stays put', () => {
      for (const from of MigrationStatus_VALUES) {
        if (from !== 'none' && ![...Object.values(table)].some((l) => l.includes(from))) continue;
        for (const to of MigrationStatus_VALUES) {
          if (table[from].includes(to)) continue;
          const seen: MigrationStatus[] = [];
          const m = machineAt(side, table, from, seen);
          seen.length = 0;
          assert.throws(() => m.to(to), (e: unknown) => e instanceof IllegalTransition &&
            e.message === `bug: ${side} migration status cannot go from '${from}' to '${to}'`);
          assert.equal(m.status, from);
          assert.deepEqual(seen, []);
          assert.equal(m.can(to), false);
        }
      }
    });
  });
}

describe('what the tables allow, in QEMU terms', () => {
  it('source: a cancel ends only in cancelled; every end allows a new migrate; colo and postcopy follow active', () => {
    assert.deepEqual(SOURCE_TRANSITIONS.cancelling, ['cancelled']);
    for (const end of ['completed', 'failed', 'cancelled'] as const) assert.deepEqual(SOURCE_TRANSITIONS[end], ['setup']);
    assert.ok(SOURCE_TRANSITIONS.active.includes('postcopy-active'));
    assert.ok(SOURCE_TRANSITIONS.active.includes('colo'));
    assert.ok(!SOURCE_TRANSITIONS['postcopy-active'].includes('active'), 'no way back from postcopy');
    assert.ok(SOURCE_TRANSITIONS['postcopy-active'].includes('cancelling'));
  });

  it('destination: one incoming migration; no cancel; postcopy-active and colo after active', () => {
    for (const end of ['completed', 'failed'] as const) assert.deepEqual(DESTINATION_TRANSITIONS[end], []);
    assert.deepEqual(DESTINATION_TRANSITIONS.cancelling, []);
    assert.deepEqual(DESTINATION_TRANSITIONS.setup, ['active', 'failed']);
    assert.ok(DESTINATION_TRANSITIONS.active.includes('postcopy-active'));
  });

  it('toIf moves only from the states given', () => {
    const m = new StatusMachine('source', SOURCE_TRANSITIONS, () => undefined);
    m.to('setup');
    m.to('cancelling');
    assert.equal(m.toIf(['active'], 'completed'), false);
    assert.equal(m.status, 'cancelling');
    assert.equal(m.toIf(['cancelling'], 'cancelled'), true);
  });
});
