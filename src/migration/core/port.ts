/**
 * What the migration engine needs from the guest. `Machine` implements it;
 * tests may pass a smaller fake. Nothing here knows about QMP.
 */
import type { ConsoleTap, RamSnapshot } from '../../machine/index.js';
import type { MigratableDevice, RamBlock, RunState } from '../../machine/types.js';

export interface MachinePort {
  readonly ram: readonly RamBlock[];
  /** Machine type name sent in the configuration record, e.g. "none". */
  readonly machineType: string;
  /** Devices in section order. */
  readonly devices: readonly MigratableDevice[];
  readonly runState: RunState;
  /**
   * Source, switchover: stop the vCPUs and enter `finish-migrate`. Resolves
   * only when no vCPU will write guest memory again. Remembers the state the
   * VM had, which globalstate carries.
   */
  stopForMigration(): Promise<void>;
  /** Source, after a failed or cancelled migration: back to the state before stopForMigration. */
  resumeAfterMigration(): Promise<void>;
  /** Source, after completion: run state `postmigrate`. */
  enterPostmigrate(): void;
  /**
   * Source, auto-converge: throttle the vCPUs to `pct` percent (0..99; 0 =
   * full speed). Each vCPU runs ~10 ms, then sleeps 10 ms × p/(1 − p).
   */
  setThrottle(pct: number): void;
  /**
   * Destination, after a complete load: enter the run state the stream's
   * globalstate asked for (running unless started with -S, or the received
   * state). Resolves once the vCPUs run (or the state is set). Background
   * work for the incoming migration (the prefault of RAM) ends.
   */
  finishIncoming(): Promise<void>;
  /**
   * Destination, postcopy (userfaultfd-like): from now on a vCPU that touches
   * a page whose bit is clear in its block's `present` bitmap blocks until
   * markPresent() sets it, and `onFault(block, page)` is called on the main
   * thread for it. The caller clears the bits of the missing pages first.
   */
  beginDemandPaging(onFault: (block: number, page: number) => void): void;
  /** The page's contents are in place: set its present bit and wake its waiters. */
  markPresent(block: number, page: number): void;
  /** Every page is present: vCPUs stop checking. */
  endDemandPaging(): void;
  /**
   * Destination, a postcopy that failed after the guest started: stop the
   * vCPUs for good (run state internal-error), so that the guest never runs on
   * with pages missing.
   */
  abandonIncoming(): Promise<void>;

  // ---- COLO (migration/colo/)
  /**
   * Run `fn` with the guest stopped (run state colo when it ran), other run
   * state changes waiting; the globalstate saved meanwhile is the state
   * before. Afterwards the guest enters what `fn` returns, or that state.
   */
  checkpointPause(fn: (before: RunState) => Promise<RunState | void>): Promise<void>;
  /** Enter a run state (running: start the guest). */
  enterRunState(s: RunState): Promise<void>;
  /** The run state the last loaded globalstate carried, if any. */
  readonly loadedRunState: RunState | undefined;
  /** A copy of guest RAM (the vCPUs stopped). */
  snapshotRam(): RamSnapshot;
  /** Takes and clears the dirty log into per-block bitmaps; returns the pages taken. */
  takeDirtyPages(into: readonly Uint32Array[]): number;
  /** Puts the pages set in `pages` back from the snapshot (vCPUs stopped); returns how many. */
  restoreRamPages(from: RamSnapshot, pages: readonly Uint32Array[]): number;
  /** Lines the guest prints go to `tap` first, which may keep them back (null: no tap). */
  setConsoleTap(tap: ConsoleTap | null): void;
  /** Text to the guest's console output. */
  writeConsole(text: string): void;
}
