import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  FERRY_TRANSITIONS,
  QAPI_RUN_STATES,
  QEMU_RUN_STATE_TRANSITIONS,
  RunStateMachine,
  canTransition,
  type RunState,
} from '../../src/machine/run-state.js';
import { Machine } from '../../src/machine/index.js';
import { machinePort } from '../../src/migration/core/machine-port.js';

/**
 * The table written out again, on its own, one move a line: QEMU's
 * runstate_transitions_def (softmmu/runstate.c) in its order, then Ferry's
 * additions. Every line must be allowed and every other move refused, so a
 * line missing from (or added to) src/machine/run-state.ts fails the walk.
 */
const QEMU_MOVES = `
  debug -> running
  debug -> finish-migrate
  debug -> prelaunch
  inmigrate -> internal-error
  inmigrate -> io-error
  inmigrate -> paused
  inmigrate -> running
  inmigrate -> shutdown
  inmigrate -> suspended
  inmigrate -> watchdog
  inmigrate -> guest-panicked
  inmigrate -> finish-migrate
  inmigrate -> prelaunch
  inmigrate -> postmigrate
  inmigrate -> colo
  internal-error -> paused
  internal-error -> finish-migrate
  internal-error -> prelaunch
  io-error -> running
  io-error -> finish-migrate
  io-error -> prelaunch
  paused -> running
  paused -> finish-migrate
  paused -> postmigrate
  paused -> prelaunch
  paused -> colo
  postmigrate -> running
  postmigrate -> finish-migrate
  postmigrate -> prelaunch
  prelaunch -> running
  prelaunch -> finish-migrate
  prelaunch -> inmigrate
  finish-migrate -> running
  finish-migrate -> paused
  finish-migrate -> postmigrate
  finish-migrate -> prelaunch
  finish-migrate -> colo
  restore-vm -> running
  restore-vm -> prelaunch
  colo -> running
  colo -> prelaunch
  colo -> shutdown
  running -> debug
  running -> internal-error
  running -> io-error
  running -> paused
  running -> finish-migrate
  running -> restore-vm
  running -> save-vm
  running -> shutdown
  running -> watchdog
  running -> guest-panicked
  running -> colo
  save-vm -> running
  shutdown -> paused
  shutdown -> finish-migrate
  shutdown -> prelaunch
  shutdown -> colo
  debug -> suspended
  running -> suspended
  suspended -> running
  suspended -> finish-migrate
  suspended -> prelaunch
  suspended -> colo
  watchdog -> running
  watchdog -> finish-migrate
  watchdog -> prelaunch
  watchdog -> colo
  guest-panicked -> running
  guest-panicked -> finish-migrate
  guest-panicked -> prelaunch
`;

/** Ferry's additions, several sources a line. */
const FERRY_MOVES = `
  prelaunch paused finish-migrate postmigrate shutdown io-error suspended watchdog guest-panicked colo -> internal-error
  prelaunch paused finish-migrate postmigrate internal-error io-error suspended watchdog guest-panicked -> shutdown
  finish-migrate -> io-error
  finish-migrate -> suspended
  finish-migrate -> watchdog
  finish-migrate -> guest-panicked
  colo -> finish-migrate
  colo -> paused
  postmigrate -> paused
`;

/** `from [from...] -> to` lines as [from, to] pairs. */
function moves(text: string): [RunState, RunState][] {
  return text
    .trim()
    .split('\n')
    .flatMap((l) => {
      const [froms, to] = l.trim().split(' -> ') as [string, RunState];
      assert.ok(QAPI_RUN_STATES.includes(to), l);
      return froms.split(' ').map((from): [RunState, RunState] => {
        assert.ok(QAPI_RUN_STATES.includes(from as RunState), l);
        return [from as RunState, to];
      });
    });
}

const qemu = moves(QEMU_MOVES);
const ferry = moves(FERRY_MOVES);
const allowed = new Set([...qemu, ...ferry].map(([f, t]) => `${f} -> ${t}`));

function tableMoves(): string[] {
  const out: string[] = [];
  for (const from of QAPI_RUN_STATES) for (const to of QEMU_RUN_STATE_TRANSITIONS[from]) out.push(`${from} -> ${to}`);
  for (const t of FERRY_TRANSITIONS) for (const from of t.from) out.push(`${from} -> ${t.to}`);
  return out;
}

test('run state table: QEMU has 71 moves, Ferry adds 26, none twice', () => {
  assert.equal(qemu.length, 71);
  assert.equal(ferry.length, 26);
  assert.equal(allowed.size, 97);
  const listed = tableMoves();
  assert.equal(new Set(listed).size, listed.length, 'a move is listed twice');
  assert.deepEqual([...listed].sort(), [...allowed].sort());
  for (const t of FERRY_TRANSITIONS) assert.ok(t.why.length > 20, `no reason given for -> ${t.to}`);
});

test('run state table: every allowed move succeeds and is reported once', () => {
  for (const [from, to] of [...qemu, ...ferry]) {
    const seen: string[] = [];
    const rs = new RunStateMachine(from, (now, old) => seen.push(`${old} -> ${now}`));
    assert.equal(canTransition(from, to), true, `${from} -> ${to}`);
    rs.set(to);
    assert.equal(rs.state, to);
    assert.deepEqual(seen, [`${from} -> ${to}`]);
  }
});

test('run state table: every other move throws a bug error and changes nothing', () => {
  let refused = 0;
  for (const from of QAPI_RUN_STATES) {
    for (const to of QAPI_RUN_STATES) {
      if (from === to || allowed.has(`${from} -> ${to}`)) continue;
      const seen: string[] = [];
      const rs = new RunStateMachine(from, (now) => seen.push(now));
      assert.equal(canTransition(from, to), false, `${from} -> ${to}`);
      assert.throws(() => rs.check(to), { message: `invalid run state transition from '${from}' to '${to}' (a bug in Ferry)` });
      assert.throws(() => rs.set(to), /invalid run state transition .* \(a bug in Ferry\)/);
      assert.equal(rs.state, from);
      assert.deepEqual(seen, []);
      refused++;
    }
  }
  assert.equal(refused, 16 * 15 - 97);
  // a few that matter: a stopped or broken guest never just runs, a running one never skips finish-migrate
  for (const [from, to] of [
    ['internal-error', 'running'],
    ['shutdown', 'running'],
    ['running', 'postmigrate'],
    ['running', 'prelaunch'],
    ['inmigrate', 'debug'],
    ['paused', 'inmigrate'],
  ] as const) {
    assert.equal(canTransition(from, to), false, `${from} -> ${to}`);
  }
});

test('run state table: staying in a state is allowed and reports nothing', () => {
  for (const s of QAPI_RUN_STATES) {
    const seen: string[] = [];
    const rs = new RunStateMachine(s, (now) => seen.push(now));
    assert.equal(canTransition(s, s), true);
    rs.set(s);
    assert.equal(rs.state, s);
    assert.deepEqual(seen, []);
  }
});

const M = 1 << 20;

test('an incoming globalstate the guest cannot enter fails the load with a clear error; one it can is entered', async () => {
  for (const bad of ['debug', 'save-vm', 'restore-vm'] as const) {
    const m = await Machine.create({ ramSize: 4 * M, smp: 1, incoming: true });
    try {
      m.setLoadedGlobalState(bad);
      await assert.rejects(machinePort(m, { autostart: true }).finishIncoming(), {
        message: `globalstate: the guest cannot enter run state '${bad}' received from the source (it is 'inmigrate')`,
        // a rejected stream, not a crash (src/migration/errors.ts)
        name: 'MigrationStreamError',
      });
      assert.equal(m.runState, 'inmigrate');
    } finally {
      await m.destroy();
    }
  }
  const m = await Machine.create({ ramSize: 4 * M, smp: 1, incoming: true });
  try {
    const seen: string[] = [];
    m.on('runstate', (now: string, old: string) => seen.push(`${old} -> ${now}`));
    m.setLoadedGlobalState('suspended');
    await machinePort(m, { autostart: true }).finishIncoming();
    assert.equal(m.runState, 'suspended');
    assert.equal(m.vcpusPaused, true);
    await m.start();
    assert.deepEqual(seen, ['inmigrate -> suspended', 'suspended -> running']);
  } finally {
    await m.destroy();
  }
});

test('the machine moves through the table: a stopped guest is abandoned and quit; internal-error never just runs', async () => {
  const m = await Machine.create({ ramSize: 4 * M, smp: 1, incoming: true });
  try {
    const seen: string[] = [];
    m.on('runstate', (now: string, old: string) => seen.push(`${old} -> ${now}`));
    await m.setRunState('paused');
    await m.stop('internal-error'); // abandonIncoming of a guest that was put in paused
    await assert.rejects(m.start(), { message: "invalid run state transition from 'internal-error' to 'running' (a bug in Ferry)" });
    assert.equal(m.runState, 'internal-error');
    assert.equal(m.vcpusPaused, true, 'the refused start did not resume the vCPUs');
    await assert.rejects(m.setRunState('postmigrate'), /invalid run state transition from 'internal-error' to 'postmigrate'/);
    await m.quit();
    assert.deepEqual(seen, ['inmigrate -> paused', 'paused -> internal-error', 'internal-error -> shutdown']);
  } finally {
    await m.destroy();
  }
});
