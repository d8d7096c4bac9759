/**
 * COLO as one VM sees it: its settings (parameters.ts), the COLO session it
 * runs now (a primary or a secondary, created by the outgoing or incoming
 * migration), what the last one left behind, and what QMP asks of it:
 * query-colo-status, x-colo-lost-heartbeat, and the checkpoint at once
 * that a new x-checkpoint-delay asks for. One per VM (cli/vm.ts), given to
 * its MigrationSource and MigrationDestination.
 *
 * Events: 'exit' (mode, reason) once per session, when its checkpoint loop
 * ends (COLO_EXIT); 'checkpoint' (mode, count, ColoCheckpointInfo) after
 * every complete checkpoint.
 *
 * Replication hooks (for disks under COLO, issue 13: QEMU's block
 * replication, replication_start_all / do_checkpoint_all / stop_all):
 * addReplication() registers a layer that is called, in order, at
 *   start       the session begins (the guest still stopped by the first migration)
 *   checkpoint  the primary: guest stopped, before its state is saved;
 *               the secondary: the checkpoint applied, guest still stopped
 *   failover    the guest is about to run alone (the secondary: put back
 *               to the last checkpoint)
 * A hook that throws breaks the session like a failed checkpoint.
 */
import { EventEmitter } from 'node:events';
import type { COLOMode, COLOStatus, ColoCheckpointInfo } from '../../generated/qapi-types.js';
import { MigrationError, errorMessage } from '../errors.js';
import { FAILOVER_ERR } from './failover.js';
import { ColoParameters } from './parameters.js';
import type { ColoPrimary } from './primary.js';
import type { ColoMode, ColoRuntime } from './runtime.js';
import type { ColoSecondary } from './secondary.js';

export type ReplicationEvent = 'start' | 'checkpoint' | 'failover';

/** A layer that keeps something besides RAM and devices in step (see the file header). */
export type ColoReplication = Partial<Record<ReplicationEvent, (mode: ColoMode) => void | Promise<void>>>;

export declare interface ColoService {
  on(event: 'exit', listener: (mode: ColoMode, reason: 'request' | 'error') => void): this;
  on(event: 'checkpoint', listener: (mode: ColoMode, count: number, info: ColoCheckpointInfo) => void): this;
}

export class ColoService extends EventEmitter {
  readonly parameters = new ColoParameters();
  private current: ColoRuntime | null = null;
  /** The last session (for its figures once it is over). */
  private last: ColoRuntime | null = null;
  private lastMode: COLOMode = 'unknown';
  private readonly replication: ColoReplication[] = [];

  /** The session running now (until its failover is done), if any. */
  get session(): ColoRuntime | null {
    return this.current;
  }

  get primary(): ColoPrimary | null {
    return this.current?.mode === 'primary' ? (this.current as ColoPrimary) : null;
  }

  get secondary(): ColoSecondary | null {
    return this.current?.mode === 'secondary' ? (this.current as ColoSecondary) : null;
  }

  attach(s: ColoRuntime): void {
    this.current = s;
    this.last = s;
  }

  /** The session ended (failover done, or it never started): last-mode remembers its role. */
  detach(s: ColoRuntime): void {
    if (this.current !== s) return;
    this.current = null;
    if (s.failedOver) this.lastMode = s.mode;
  }

  addReplication(r: ColoReplication): void {
    this.replication.push(r);
  }

  async replicate(event: ReplicationEvent, mode: ColoMode): Promise<void> {
    for (const r of this.replication) await r[event]?.(mode);
  }

  /** x-colo-lost-heartbeat: QEMU's texts outside COLO and for a second request. */
  lostHeartbeat(): void {
    const s = this.current;
    if (s === null || !s.inColo) throw new MigrationError(FAILOVER_ERR.disabled());
    s.requestFailover('request');
  }

  /** x-checkpoint-delay changed: a primary in COLO checkpoints at once and counts the new delay from then. */
  checkpointDelayChanged(): void {
    this.primary?.requestCheckpoint('parameter');
  }

  /** query-colo-status. */
  status(): COLOStatus {
    const s = this.current !== null && this.current.inColo ? this.current : null;
    const r = this.last;
    const fs = r?.failover.status ?? 'none';
    let reason: COLOStatus['reason'];
    if (fs === 'none') reason = 'none';
    else if (fs === 'completed') reason = r!.exitReason;
    else reason = s !== null ? 'processing' : 'error';
    const out: COLOStatus = {
      mode: s?.mode ?? 'unknown',
      'last-mode': this.lastMode,
      reason,
      'x-failover-status': fs,
      'x-checkpoints': r?.checkpoints ?? 0,
      'x-compare-checkpoints': r?.mode === 'primary' ? (r as ColoPrimary).compareCheckpoints : 0,
      'x-console-held': r?.mode === 'primary' ? (r as ColoPrimary).consoleHeld : 0,
    };
    if (r?.lastCheckpoint) out['x-last-checkpoint'] = { ...r.lastCheckpoint };
    if (r?.error) out['x-error'] = errorMessage(r.error);
    return out;
  }

  /** The VM quits: the session (if any) stops where it is. */
  shutdown(): void {
    this.current?.shutdown();
  }
}
