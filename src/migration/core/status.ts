/**
 * MigrationStatus as two explicit state machines, one per side (docs/spec/qmp.md C.1,
 * C.2). Every status change goes through `StatusMachine.to()`; a move the
 * table does not list throws IllegalTransition, which is a bug in Ferry (no
 * input may cause one: input errors fail the migration through a legal move).
 *
 * Source (QEMU's outgoing states as 2.10 and 7.2 use them):
 *
 *   none ─▶ setup ─▶ active ─▶ completed
 *             │        │ ├──▶ postcopy-active ─▶ completed | failed | cancelling
 *             │        │ └──▶ colo ─▶ completed | failed
 *             │        └───▶ failed | cancelling
 *             └──▶ failed | cancelling
 *   cancelling ─▶ cancelled
 *   completed | failed | cancelled ─▶ setup (the next `migrate`)
 *
 * Destination (one incoming migration per process):
 *
 *   none ─▶ setup ─▶ active ─▶ completed | failed
 *             │        ├──▶ postcopy-active ─▶ completed | failed
 *             │        └──▶ colo ─▶ completed | failed
 *             └──▶ failed
 */
import type { MigrationStatus } from '../../generated/qapi-types.js';

export type TransitionTable = Readonly<Record<MigrationStatus, readonly MigrationStatus[]>>;

export const SOURCE_TRANSITIONS: TransitionTable = Object.freeze({
  none: ['setup'],
  setup: ['active', 'failed', 'cancelling'],
  active: ['completed', 'failed', 'cancelling', 'postcopy-active', 'colo'],
  'postcopy-active': ['completed', 'failed', 'cancelling'],
  colo: ['completed', 'failed'],
  cancelling: ['cancelled'],
  completed: ['setup'],
  failed: ['setup'],
  cancelled: ['setup'],
});

export const DESTINATION_TRANSITIONS: TransitionTable = Object.freeze({
  none: ['setup'],
  setup: ['active', 'failed'],
  active: ['completed', 'failed', 'postcopy-active', 'colo'],
  'postcopy-active': ['completed', 'failed'],
  colo: ['completed', 'failed'],
  cancelling: [],
  cancelled: [],
  completed: [],
  failed: [],
});

export class IllegalTransition extends Error {
  override readonly name = 'IllegalTransition';
  constructor(side: string, from: MigrationStatus, to: MigrationStatus) {
    super(`bug: ${side} migration status cannot go from '${from}' to '${to}'`);
  }
}

export class StatusMachine {
  private current: MigrationStatus = 'none';

  constructor(
    private readonly side: 'source' | 'destination',
    private readonly table: TransitionTable,
    private readonly onChange: (status: MigrationStatus) => void,
  ) {}

  get status(): MigrationStatus {
    return this.current;
  }

  can(next: MigrationStatus): boolean {
    return this.table[this.current].includes(next);
  }

  /** Move to `next` (and announce it); throws IllegalTransition for a move the table does not have. */
  to(next: MigrationStatus): void {
    if (!this.can(next)) throw new IllegalTransition(this.side, this.current, next);
    this.current = next;
    this.onChange(next);
  }

  /** Move only when the status is one of `from`; false (and no change) otherwise. */
  toIf(from: readonly MigrationStatus[], next: MigrationStatus): boolean {
    if (!from.includes(this.current)) return false;
    this.to(next);
    return true;
  }

  /** The status is `s` (checked before every slice: no allocation). */
  is(s: MigrationStatus): boolean {
    return this.current === s;
  }

  isOneOf(list: readonly MigrationStatus[]): boolean {
    return list.includes(this.current);
  }
}
