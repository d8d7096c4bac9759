/** Adapts a Machine to what the migration engine needs (MachinePort). */
import type { Machine } from '../../machine/machine.js';
import { canTransition } from '../../machine/run-state.js';
import { MigrationStreamError } from '../wire/errors.js';
import type { MachinePort } from './port.js';

export function machinePort(m: Machine, opts: { autostart: boolean }): MachinePort {
  return {
    get ram() {
      return m.ram;
    },
    get machineType() {
      return m.machineType;
    },
    get devices() {
      return m.devices;
    },
    get runState() {
      return m.runState;
    },
    stopForMigration: () => m.stop('finish-migrate'),
    async resumeAfterMigration() {
      const before = m.savedRunStateForMigration ?? 'running';
      m.savedRunStateForMigration = undefined;
      await m.setRunState(before === 'finish-migrate' ? 'running' : before);
    },
    enterPostmigrate() {
      void m.stop('postmigrate');
    },
    setThrottle: (pct) => m.setThrottle(pct),
    async finishIncoming() {
      m.endBackgroundPrefault();
      const got = m.loadedGlobalState;
      if (got === undefined || got === 'running') {
        await (opts.autostart ? m.start() : m.setRunState('paused'));
      } else {
        // the state comes from the stream: one this guest cannot enter fails the migration
        if (!canTransition(m.runState, got)) {
          throw new MigrationStreamError(
            `globalstate: the guest cannot enter run state '${got}' received from the source (it is '${m.runState}')`,
          );
        }
        await m.setRunState(got);
      }
    },
    beginDemandPaging: (onFault) => m.beginDemandPaging(onFault),
    markPresent: (block, page) => m.markPresent(block, page),
    endDemandPaging: () => m.endDemandPaging(),
    abandonIncoming: () => m.stop('internal-error'),
    checkpointPause: (fn) =>
      m.runStopped('colo', async (before) => {
        m.savedRunStateForMigration = before;
        try {
          return await fn(before);
        } finally {
          m.savedRunStateForMigration = undefined;
        }
      }),
    enterRunState: (s) => m.setRunState(s),
    get loadedRunState() {
      return m.loadedGlobalState;
    },
    snapshotRam: () => m.snapshotRam(),
    takeDirtyPages: (into) => m.takeDirtyPages(into),
    restoreRamPages: (from, pages) => m.restoreRamPages(from, pages),
    setConsoleTap: (tap) => m.setConsoleTap(tap),
    writeConsole: (text) => m.writeSerial(text),
  };
}
