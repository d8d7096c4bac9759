/**
 * What every replicated drive is to the replication set (QEMU's
 * ReplicationState and its ops): a stage, start, checkpoint, the error
 * query and stop, with QEMU 7.2's texts; and what the secondary needs from
 * the drive it protects (the secondary disk, exported over NBD).
 */
import type { BlockImage } from '../block/index.js';

export type ReplicationMode = 'primary' | 'secondary';

/** QEMU's ReplicationMode numbers (its error texts print them). */
export const MODE_NUMBER: Record<ReplicationMode, number> = { primary: 0, secondary: 1 };

/** QEMU's ReplicationStage. */
export type ReplicationStage = 'none' | 'running' | 'failover' | 'failover-failed' | 'done';

/** The error a replication operation refuses or fails with (QEMU's text). */
export class ReplicationError extends Error {
  override name = 'ReplicationError';
}

/** QEMU's texts. */
export const NOT_RUNNING = 'Block replication is not running';
export const RUNNING_OR_DONE = 'Block replication is running or done';
export const IO_ERROR = 'I/O error occurred';
export const BACKUP_CANCELLED = 'Backup job was cancelled unexpectedly';

/**
 * QEMU's checks before a start: false when the call is ignored (stopped or
 * failed over: a promoted secondary), an error for a running node or the
 * wrong mode, else true.
 */
export function mayStart(stage: ReplicationStage, own: ReplicationMode, asked: ReplicationMode): boolean {
  if (stage === 'done' || stage === 'failover') return false;
  if (stage !== 'none') throw new ReplicationError(RUNNING_OR_DONE);
  if (asked !== own) throw new ReplicationError(`The parameter mode's value is invalid, needs ${MODE_NUMBER[own]}, but got ${MODE_NUMBER[asked]}`);
  return true;
}

/** QEMU's checks before a stop: false when ignored (already stopped or failing over), an error unless running. */
export function mayStop(stage: ReplicationStage): boolean {
  if (stage === 'done' || stage === 'failover') return false;
  if (stage !== 'running') throw new ReplicationError(NOT_RUNNING);
  return true;
}

/** QEMU's replication_get_error text of a node. */
export function stageError(stage: ReplicationStage, failed: boolean): string | null {
  if (stage === 'none') return NOT_RUNNING;
  return failed ? IO_ERROR : null;
}

export interface ReplicationNode {
  readonly mode: ReplicationMode;
  readonly stage: ReplicationStage;
  /** The drive (block backend) it belongs to. */
  readonly driveName: string;
  start(mode: ReplicationMode): Promise<void>;
  checkpoint(): Promise<void>;
  /** QEMU's replication_get_error: null when healthy, else the error text. */
  getError(): string | null;
  stop(failover: boolean): Promise<void>;
  /** Reopen the files below (the machine reopens its drives after a migration); state is kept. */
  reopen(): Promise<void>;
  /** What went wrong, in detail (for logs and docs; getError() keeps QEMU's text). */
  readonly errorDetail: string | null;
}

/** Called around every write to a drive: `write` does the write itself. */
export type WriteHook = (offset: number, length: number, write: () => Promise<void>) => Promise<void>;

/** What the secondary needs from the secondary disk's drive (machine/drives.ts's Drive has it). */
export interface SecondaryDisk {
  readonly name: string;
  readonly size: number;
  /** The drive's current image (it changes when the drive is reopened). */
  readonly image: BlockImage;
  write(offset: number, data: Uint8Array): Promise<void>;
  writeZeroes(offset: number, length: number): Promise<void>;
  flush(): Promise<void>;
  writeHook: WriteHook | null;
}

/** Reports a replication failure as it happens (the VM logs it). */
export type FailureSink = (drive: string, detail: Error) => void;
