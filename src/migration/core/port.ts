/**
 * What the migration engine needs from the guest. `Machine` implements it;
 * tests may pass a smaller fake. Nothing here knows about QMP.
 */
import type { ConsoleTap, RamSnapshot } from '../../machine/index.js';
import type { MigratableDevice, RamBlock, RunState } from '../../machine/types.js';

/**
 * One drive as block migration sees it (docs/spec/stream-format.md §13):
 * the machine's `Drive` has this shape. Reads and writes are the guest's
 * (a write marks the 1 MiB chunks it touches while tracking is on, and
 * honours the drive's cache mode); requests of one drive run in issue
 * order, so a read issued after takeDirtyChunks() sees every write marked
 * before it.
 */
export interface DrivePort {
  /** The block backend name (`ide0-hd0`, `virtio0`, the id): the device name on the wire. */
  readonly name: string;
  /** Guest-visible bytes. */
  readonly size: number;
  readonly readOnly: boolean;
  /** The top image's format. */
  readonly format: 'raw' | 'qcow2';
  /** Bytes per allocation unit of the top image (qcow2 cluster size; 512 for raw). */
  readonly clusterSize: number;
  /** Images below the top one (0: no backing file). */
  readonly backingDepth: number;
  read(offset: number, buf: Uint8Array): Promise<void>;
  write(offset: number, data: Uint8Array): Promise<void>;
  /** The buffers back to back from `offset`, without joining them where the format allows (raw: one pwritev). */
  writev(offset: number, bufs: readonly Uint8Array[]): Promise<void>;
  /** Make the range read as zeros (qcow2: zero clusters where whole clusters are covered). */
  writeZeroes(offset: number, length: number): Promise<void>;
  /** Whether the top image itself holds the bytes at `offset`, and for how many bytes that stays so. */
  blockStatus(offset: number, length: number): Promise<{ allocated: boolean; length: number }>;
  flush(): Promise<void>;
  /** The dirty-chunk log (1 MiB chunks): start clean, stop, take-and-clear, count. */
  startDirtyTracking(): void;
  stopDirtyTracking(): void;
  takeDirtyChunks(): Uint32Array;
  dirtyChunkCount(): number;
}

export interface MachinePort {
  readonly ram: readonly RamBlock[];
  /** The drives, in command-line order (block migration). */
  readonly drives: readonly DrivePort[];
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
