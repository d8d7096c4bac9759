/**
 * The machine's run state and the table of the moves between run states.
 *
 * The table is QEMU's (`runstate_transitions_def` in softmmu/runstate.c, the
 * 7.x table), plus the few moves Ferry makes that QEMU's table does not have,
 * each listed with its reason in FERRY_TRANSITIONS. Every run state change
 * of the machine goes through RunStateMachine.set(), which throws on a move
 * the table does not allow: that is a bug in Ferry, never bad input. Input
 * from outside (the run state received in a migration's globalstate) is
 * checked with canTransition() first and refused with its own error.
 *
 * Staying in the same state is always allowed and changes nothing (as in
 * QEMU's runstate_set()).
 */

/** QAPI RunState names, in schema order (the names a globalstate section may carry). */
export const QAPI_RUN_STATES = [
  'debug',
  'inmigrate',
  'internal-error',
  'io-error',
  'paused',
  'postmigrate',
  'prelaunch',
  'finish-migrate',
  'restore-vm',
  'running',
  'save-vm',
  'shutdown',
  'suspended',
  'watchdog',
  'guest-panicked',
  'colo',
] as const;

/**
 * A QAPI run state. The machine enters prelaunch, running, paused,
 * inmigrate, finish-migrate, postmigrate, shutdown and internal-error by
 * itself, colo while a COLO checkpoint stops it (Machine.runStopped); io-error,
 * suspended, watchdog and guest-panicked only when an incoming migration's
 * globalstate says so; debug, save-vm and
 * restore-vm never (no allowed move from inmigrate leads there).
 */
export type RunState = (typeof QAPI_RUN_STATES)[number];

export function isRunState(s: string): s is RunState {
  return (QAPI_RUN_STATES as readonly string[]).includes(s);
}

/** QEMU's table: for each state, the states it may move to. */
export const QEMU_RUN_STATE_TRANSITIONS: Readonly<Record<RunState, readonly RunState[]>> = {
  debug: ['running', 'finish-migrate', 'prelaunch', 'suspended'],
  inmigrate: [
    'internal-error',
    'io-error',
    'paused',
    'running',
    'shutdown',
    'suspended',
    'watchdog',
    'guest-panicked',
    'finish-migrate',
    'prelaunch',
    'postmigrate',
    'colo',
  ],
  'internal-error': ['paused', 'finish-migrate', 'prelaunch'],
  'io-error': ['running', 'finish-migrate', 'prelaunch'],
  paused: ['running', 'finish-migrate', 'postmigrate', 'prelaunch', 'colo'],
  postmigrate: ['running', 'finish-migrate', 'prelaunch'],
  prelaunch: ['running', 'finish-migrate', 'inmigrate'],
  'finish-migrate': ['running', 'paused', 'postmigrate', 'prelaunch', 'colo'],
  'restore-vm': ['running', 'prelaunch'],
  colo: ['running', 'prelaunch', 'shutdown'],
  running: [
    'debug',
    'internal-error',
    'io-error',
    'paused',
    'finish-migrate',
    'restore-vm',
    'save-vm',
    'shutdown',
    'watchdog',
    'guest-panicked',
    'colo',
    'suspended',
  ],
  'save-vm': ['running'],
  shutdown: ['paused', 'finish-migrate', 'prelaunch', 'colo'],
  suspended: ['running', 'finish-migrate', 'prelaunch', 'colo'],
  watchdog: ['running', 'finish-migrate', 'prelaunch', 'colo'],
  'guest-panicked': ['running', 'finish-migrate', 'prelaunch'],
};

/** A group of moves Ferry makes beyond QEMU's table, and why. */
export interface FerryTransitions {
  from: readonly RunState[];
  to: RunState;
  why: string;
}

const RESUME_WHY =
  'a source whose migration failed or was cancelled goes back to the state that stop(finish-migrate) ' +
  'recorded (resumeAfterMigration), whatever it was; QEMU 7.2 resumes a running guest or enters postmigrate';

/** Ferry's additions to QEMU's table: moves the machine made before the table was strict, kept. */
export const FERRY_TRANSITIONS: readonly FerryTransitions[] = [
  {
    // every state the machine can be in (see RunState) that QEMU's table does not list
    from: [
      'prelaunch',
      'paused',
      'finish-migrate',
      'postmigrate',
      'shutdown',
      'io-error',
      'suspended',
      'watchdog',
      'guest-panicked',
      'colo',
    ],
    to: 'internal-error',
    why:
      'a vCPU worker thread can fail (error, non-zero exit) in any run state, and a postcopy destination ' +
      'that fails is stopped for good (abandonIncoming) in whatever state its guest was put in; QEMU ' +
      'enters internal-error only from running and inmigrate',
  },
  {
    // likewise
    from: [
      'prelaunch',
      'paused',
      'finish-migrate',
      'postmigrate',
      'internal-error',
      'io-error',
      'suspended',
      'watchdog',
      'guest-panicked',
    ],
    to: 'shutdown',
    why:
      'quit() records shutdown before it ends the machine, in any run state (QEMU exits without a run ' +
      'state change unless the guest runs); finish-migrate -> shutdown is also: ' + RESUME_WHY,
  },
  { from: ['finish-migrate'], to: 'io-error', why: RESUME_WHY },
  { from: ['finish-migrate'], to: 'suspended', why: RESUME_WHY },
  { from: ['finish-migrate'], to: 'watchdog', why: RESUME_WHY },
  { from: ['finish-migrate'], to: 'guest-panicked', why: RESUME_WHY },
  {
    from: ['colo'],
    to: 'finish-migrate',
    why:
      'a guest put in colo by an incoming globalstate may migrate on (stop(finish-migrate) takes any ' +
      'stopped state)',
  },
  {
    from: ['colo'],
    to: 'paused',
    why:
      'a COLO secondary mirrors its primary: a checkpoint taken while the primary was paused leaves the ' +
      'secondary paused after it was applied (QEMU starts the secondary whatever the primary does)',
  },
  {
    from: ['postmigrate'],
    to: 'paused',
    why:
      'setRunState() sets a stopped machine to the state asked for; the unit tests apply a received ' +
      'paused to a machine that migrated out',
  },
];

const ALLOWED = new Map<RunState, Set<RunState>>();
for (const from of QAPI_RUN_STATES) ALLOWED.set(from, new Set(QEMU_RUN_STATE_TRANSITIONS[from]));
for (const t of FERRY_TRANSITIONS) for (const from of t.from) ALLOWED.get(from)!.add(t.to);

/** Whether the table allows the move (staying in the same state is always allowed). */
export function canTransition(from: RunState, to: RunState): boolean {
  return from === to || ALLOWED.get(from)!.has(to);
}

/** The current run state; every change is checked against the table and reported. */
export class RunStateMachine {
  private current: RunState;

  constructor(
    initial: RunState,
    private readonly changed: (now: RunState, old: RunState) => void,
  ) {
    this.current = initial;
  }

  get state(): RunState {
    return this.current;
  }

  /** Throws unless the table allows moving from the current state to `to` (a bug in the caller). */
  check(to: RunState): void {
    if (!canTransition(this.current, to)) {
      throw new Error(`invalid run state transition from '${this.current}' to '${to}' (a bug in Ferry)`);
    }
  }

  /** Enters `to` (nothing happens when already there) and reports the change. */
  set(to: RunState): void {
    this.check(to);
    const old = this.current;
    if (old === to) return;
    this.current = to;
    this.changed(to, old);
  }
}
