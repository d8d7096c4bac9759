/** auto-converge's trigger rule and throttle steps (docs/spec/qmp.md E.3). */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { AutoConverge } from '../../src/migration/ram/auto-converge.js';
import { MigrationOptions } from '../../src/migration/core/options.js';
import type { MachinePort } from '../../src/migration/core/port.js';
import { MigrationSource } from '../../src/migration/core/source.js';
import { machinePort } from '../../src/migration/core/machine-port.js';
import { Machine } from '../../src/machine/machine.js';

function setup(on = true) {
  const calls: number[] = [];
  const port = { setThrottle: (p: number) => calls.push(p) } as unknown as MachinePort;
  const options = new MigrationOptions();
  if (on) options.setCapabilities([{ capability: 'auto-converge', state: true }]);
  options.setParameters({ 'cpu-throttle-initial': 50, 'cpu-throttle-increment': 20 });
  return { calls, options, ac: new AutoConverge(port, options) };
}

const PAGE = 4096;

describe('auto-converge rule', () => {
  it('throttles after two qualifying periods, then steps by the increment up to 99', () => {
    const { calls, ac } = setup();
    let sent = 0;
    // each period: 100 pages sent, 60 pages dirtied (60 > 100 / 2)
    const period = (dirtied: number) => {
      sent += 100 * PAGE;
      ac.onPeriod(dirtied, sent);
    };
    period(60);
    assert.equal(ac.throttle, 0);
    period(60);
    assert.equal(ac.throttle, 50);
    // a non-qualifying period does not reset the count
    period(60);
    period(50); // exactly half: not more than half
    assert.equal(ac.throttle, 50);
    period(60);
    assert.equal(ac.throttle, 70);
    period(60); period(60);
    assert.equal(ac.throttle, 90);
    period(60); period(60);
    assert.equal(ac.throttle, 99);
    period(60); period(60);
    assert.equal(ac.throttle, 99);
    assert.deepEqual(calls, [50, 70, 90, 99, 99]);
    ac.lift();
    assert.equal(ac.throttle, 0);
    assert.deepEqual(calls.at(-1), 0);
  });

  it('compares with the bytes sent in the same period and reads the parameters when it steps', () => {
    const { ac, options } = setup();
    ac.onPeriod(0, 1000 * PAGE); // 1000 pages sent in the first period
    ac.onPeriod(400, 1800 * PAGE); // 800 sent: 400 is not more than half
    assert.equal(ac.throttle, 0);
    ac.onPeriod(401, 2600 * PAGE);
    ac.onPeriod(401, 3400 * PAGE);
    assert.equal(ac.throttle, 50);
    options.setParameters({ 'cpu-throttle-increment': 5 });
    ac.onPeriod(401, 4200 * PAGE);
    ac.onPeriod(401, 5000 * PAGE);
    assert.equal(ac.throttle, 55);
  });

  it('does nothing without the capability; lift without a throttle touches nothing', () => {
    const { calls, ac } = setup(false);
    for (let i = 1; i <= 6; i++) ac.onPeriod(1000, i * PAGE);
    assert.equal(ac.throttle, 0);
    ac.lift();
    assert.deepEqual(calls, []);
  });
});

describe('auto-converge in a migration', () => {
  const M = 1 << 20;
  // 2048 page writes a second into 12 MiB, sent at 2 MiB/s: throttled soon
  // after the bulk stage; downtime-limit 0 (only a sync that finds nothing
  // dirty could end it), so that it cannot complete before it throttles
  async function throttledMigration() {
    const m = await Machine.create({
      ramSize: 16 * M, smp: 1, workload: { kind: 'stress', rate: 8 * M, wss: 12 * M, write: 4096 },
    });
    // the guest must be writing before the migration starts (a loaded box
    // may be slow to get its vCPU going)
    const t = Date.now() + 20000;
    while (m.totalSteps() < 1000) {
      assert.ok(Date.now() < t, 'the workload does not run');
      await new Promise((r) => setTimeout(r, 10));
    }
    const options = new MigrationOptions();
    options.setCapabilities([{ capability: 'auto-converge', state: true }]);
    options.setParameters({ 'max-bandwidth': 2 * M, 'downtime-limit': 0, 'cpu-throttle-initial': 50 });
    const src = new MigrationSource(machinePort(m, { autostart: true }), options, { lookupFd: () => undefined });
    src.start('exec:cat > /dev/null');
    const end = Date.now() + 30000;
    while (src.info()['cpu-throttle-percentage'] === undefined) {
      assert.ok(Date.now() < end, 'no throttle within 30 s');
      assert.ok(src.status === 'setup' || src.status === 'active', src.status);
      await new Promise((r) => setTimeout(r, 50));
    }
    assert.equal(m.getThrottle(), 50);
    return { m, options, src };
  }

  it('migrate_cancel lifts the throttle', async () => {
    const { m, src } = await throttledMigration();
    try {
      src.cancel();
      await src.whenIdle();
      assert.equal(src.status, 'cancelled');
      assert.equal(m.getThrottle(), 0);
      assert.equal(m.runState, 'running');
      assert.equal(src.info()['cpu-throttle-percentage'], undefined);
    } finally {
      await m.destroy();
    }
  });

  it('completion lifts the throttle', async () => {
    const { m, options, src } = await throttledMigration();
    try {
      // the rest now fits: the migration completes
      options.setParameters({ 'downtime-limit': 2000000 });
      await src.whenIdle();
      assert.equal(src.status, 'completed');
      assert.equal(m.getThrottle(), 0);
      assert.equal(src.info()['cpu-throttle-percentage'], undefined);
    } finally {
      await m.destroy();
    }
  });
});
