import type { DiskWorkloadConfig } from './disk-workload.js';
import type { DriveConfig } from './drives.js';

/** Target page size: 4 KiB, as on x86 (TARGET_PAGE_BITS = 12). */
export const TARGET_PAGE_BITS = 12;
export const TARGET_PAGE_SIZE = 1 << TARGET_PAGE_BITS;

/**
 * One guest RAM block (ram.ts allocates them). `bytes`, `dirty` and
 * `present` are views over SharedArrayBuffers that the vCPU workers share.
 * `dirty` has one bit per target page (bit i of word i>>5 is page i); a vCPU
 * sets it with Atomics.or on every write, a migration takes it with
 * Atomics.exchange(dirty, w, 0).
 */
export interface RamBlock {
  readonly name: string;
  /** used_length in bytes, a multiple of TARGET_PAGE_SIZE */
  readonly size: number;
  readonly pages: number;
  readonly bytes: Uint8Array;
  readonly dirty: Int32Array;
  /**
   * Pages that may hold non-zero data (bit set), kept on the main thread.
   * A page whose `touched` bit is clear is zero unless its `dirty` bit is
   * set: the boot fill sets it for every page it writes, whoever takes dirty
   * bits off `dirty` ORs them in here, and the migration loader sets it for
   * every page it writes. This lets a migration skip reading (and so
   * faulting in) RAM that was never written.
   */
  readonly touched: Uint32Array;
  /**
   * Demand paging (postcopy): one bit per target page (bit p&31 of word
   * p>>>5) over its own SharedArrayBuffer; set = the page's contents are
   * here. All ones except while a caller has cleared bits for pages still to
   * be fetched. Only consulted by the vCPUs while demand paging is on
   * (Machine.beginDemandPaging); set bits with Machine.markPresent (or
   * Atomics.or) after writing the page's bytes.
   */
  readonly present: Int32Array;
}

/** QAPI RunState names (run-state.ts has the list, the transition table and the reasons). */
export type { RunState } from './run-state.js';

/**
 * A device whose state travels in the migration stream as one FULL section.
 * `idstr`/`instanceId`/`version` are the section header fields.
 */
export interface MigratableDevice {
  readonly idstr: string;
  readonly instanceId: number;
  readonly version: number;
  /** Oldest stream version load() accepts. */
  readonly minVersion: number;
  /** Whether the section is sent at all (QEMU's vmsd `needed`). Default true. */
  needed?(): boolean;
  save(): Uint8Array;
  /** Throws Error with a clear message on a malformed payload. */
  load(data: Uint8Array, version: number): void;
  /** Exact payload size for a given version, or undefined if variable. */
  payloadSize?(version: number): number | undefined;
}

/*
 * Payload framing rule used by the migration layer: when `payloadSize(v)`
 * returns a number the payload is written raw (QEMU's fixed vmstate layouts,
 * e.g. `timer` 24 bytes, `globalstate` 104 bytes); otherwise the migration
 * layer writes a be32 length before the payload, so our own devices are
 * self-delimiting in the stream.
 */

/* ------------------------------------------------------------------------ */
/* Machine configuration (extension; the CLI builds these from -m/-smp/...). */

/**
 * Guest workload run by the vCPU workers. Sizes are bytes, addresses are
 * guest-physical (RAM blocks laid out back to back from 0).
 *
 * - `idle`: no writes.
 * - `sweep`: vCPU 0 sets the first byte of every page in [start, end) to
 *   (round+1) & 0xff, ascending, round after round (QEMU migration-test style;
 *   on zero-filled RAM that is exactly "increment"). Other vCPUs idle.
 *   Defaults start = 1M, end = ramSize. One step = one page.
 * - `stress`: dirties random pages of the working set [start, start+wss)
 *   (defaults start = 0, wss = ramSize - start), split into one disjoint
 *   stripe per vCPU, `write` bytes (1..4096, default 8) at a random offset per
 *   step, at `rate` bytes of pages per second in total (0/undefined =
 *   unlimited). One step = one page write. With `read` on, every step
 *   also reads one byte at a random offset of another random page of the
 *   same stripe and folds it into a per-vCPU checksum (see x-query-workload).
 * `steps`: when set, each vCPU stops writing after that many steps.
 */
export type WorkloadConfig =
  | { kind: 'idle' }
  | { kind: 'sweep'; start?: number; end?: number; steps?: number }
  | {
      kind: 'stress';
      rate?: number;
      wss?: number;
      start?: number;
      write?: number;
      seed?: number;
      steps?: number;
      read?: boolean;
    };

/** Boot-time RAM content; deterministic by seed (default seed 0). */
export interface FillConfig {
  kind: 'zero' | 'random' | 'text';
  seed?: number;
}

export type SerialConfig =
  | { kind: 'file'; path: string }
  | { kind: 'stdout' }
  | { kind: 'none' };

export interface MachineConfig {
  /** bytes, a positive multiple of TARGET_PAGE_SIZE */
  ramSize: number;
  /** number of vCPU worker threads, 1..64 */
  smp: number;
  name?: string;
  /** machine type name sent in the configuration record; default 'none' */
  machineType?: string;
  /** when given, RAM block(s) are named after it instead of pc.ram */
  memoryBackendId?: string;
  workload?: WorkloadConfig;
  fill?: FillConfig;
  /** -S: initial run state prelaunch */
  startPaused?: boolean;
  /** -incoming: initial run state inmigrate (wins over startPaused) */
  incoming?: boolean;
  /**
   * -mem-prealloc, or prealloc=on on the memory backend: fault all of RAM in
   * before create() returns (so before the monitor answers), as QEMU does.
   * Without it an incoming VM prefaults in the background.
   */
  prealloc?: boolean;
  serial?: SerialConfig;
  /** heartbeat period in ns of virtual time; default 1e9 */
  heartbeatPeriodNs?: number;
  /** -drive, in command-line order */
  drives?: DriveConfig[];
  /** -disk-workload: writes to one of the drives while the guest runs */
  diskWorkload?: DiskWorkloadConfig;
}
