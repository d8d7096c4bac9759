/**
 * What the primary's and the secondary's COLO sessions share (primary.ts,
 * secondary.ts): the failover state and who asked for it, the error that
 * broke the session, the checkpoint figures, COLO_EXIT, Ferry's heartbeats
 * on the link, and the heartbeat watch that fails over by itself when the
 * parameters allow it (failover.ts has the rules and the witness).
 */
import type { COLOExitReason, ColoCheckpointInfo } from '../../generated/qapi-types.js';
import type { Channel } from '../channel/channel.js';
import { ChannelError } from '../channel/errors.js';
import { MigrationError, errorMessage, type MigrationFailure } from '../errors.js';
import { FAILOVER_ERR, Failover, HeartbeatWatch, claimWitness } from './failover.js';
import type { ColoService } from './service.js';
import type { ColoReader, ColoWriter } from './wire.js';

/** Milliseconds as query-colo-status shows them (to the microsecond). */
export function ms3(x: number): number {
  return Math.round(x * 1000) / 1000;
}

/** How often a Ferry peer sends a heartbeat when it has sent nothing else. */
export const HEARTBEAT_MS = 100;

/** A wake-up for a loop that waits: notify() ends the current (or next) wait early. */
export class Signal {
  private waiter: (() => void) | null = null;
  private pending = false;

  notify(): void {
    this.pending = true;
    const w = this.waiter;
    this.waiter = null;
    w?.();
  }

  /** Resolves on notify() (also one that came before) or after ms (Infinity: no timeout). */
  wait(ms = Infinity): Promise<void> {
    if (this.pending) {
      this.pending = false;
      return Promise.resolve();
    }
    return new Promise<void>((resolve) => {
      let t: NodeJS.Timeout | undefined;
      const done = (): void => {
        if (t) clearTimeout(t);
        this.pending = false;
        this.waiter = null;
        resolve();
      };
      this.waiter = done;
      if (Number.isFinite(ms)) t = setTimeout(done, Math.max(0, ms));
    });
  }
}

export type ColoMode = 'primary' | 'secondary';

export abstract class ColoRuntime {
  abstract readonly mode: ColoMode;
  readonly failover = new Failover();
  /** What broke the session (the link, the peer, a bad message), if anything did. */
  error: MigrationFailure | null = null;
  checkpoints = 0;
  lastCheckpoint: ColoCheckpointInfo | undefined;
  /** The pair's id (the witness claim's name); null when the peer is not a Ferry. */
  pairId: Buffer | null = null;
  protected reader: ColoReader | null = null;
  protected writer: ColoWriter | null = null;
  protected channel: Channel | null = null;
  /** The loop waits on it for work, a failover or the end. */
  protected readonly signal = new Signal();
  protected ended = false;
  private exitSent = false;
  private hbTimer: NodeJS.Timeout | null = null;
  private watch: HeartbeatWatch | null = null;
  private silenceLogged = false;

  constructor(
    protected readonly service: ColoService,
    protected readonly now: () => number,
    protected readonly log: (msg: string) => void,
  ) {}

  /** In the colo migration status, not failed over yet. */
  abstract get inColo(): boolean;

  /** Peer silent this long: the heartbeat timeout has run out (0: never). */
  protected abstract autoFailoverAfterMs(): number;

  /** Null when this side may fail over by itself, else why not (logged once). */
  protected abstract whyNotAlone(): string | null;

  /** A failover is done: the guest runs alone (primary), or from the last checkpoint (secondary). */
  get failedOver(): boolean {
    return this.failover.status === 'completed';
  }

  /** Start Ferry's heartbeats (if the peer knows them) and the watch. */
  protected startLiveness(): void {
    this.hbTimer = setInterval(() => {
      try {
        this.writer?.heartbeat(HEARTBEAT_MS / 2);
      } catch {
        /* the reader sees the same failure */
      }
    }, HEARTBEAT_MS);
    this.hbTimer.unref();
    this.watch = new HeartbeatWatch(this.now, () => this.autoFailoverAfterMs(), (ms) => this.silent(ms));
  }

  /** A sign of life from the peer (any message, any byte of a checkpoint). */
  protected alive(): void {
    this.watch?.alive();
  }

  protected stopLiveness(): void {
    if (this.hbTimer) clearInterval(this.hbTimer);
    this.hbTimer = null;
    this.watch?.stop();
    this.watch = null;
  }

  /**
   * x-colo-lost-heartbeat (`request`) or the heartbeat watch (`auto`).
   * With a witness, the pair is claimed first; losing the claim refuses
   * the failover. Throws QEMU's text when one is already under way.
   */
  requestFailover(by: 'request' | 'auto'): void {
    if (this.failover.requested) throw new MigrationError(FAILOVER_ERR.alreadyActive());
    const witness = this.service.parameters.get().witness;
    if (witness !== '' && this.pairId !== null) {
      const c = claimWitness(witness, this.pairId, this.mode);
      if (!c.won) throw new MigrationError(FAILOVER_ERR.peerTookOver(c.file));
    }
    this.failover.request(by);
    this.log(`COLO: failover requested (${by === 'request' ? 'x-colo-lost-heartbeat' : 'heartbeat timeout'})`);
    this.emitExit(this.error ? 'error' : 'request');
    // wake whatever waits on the link
    this.channel?.close();
    this.signal.notify();
  }

  /** The link broke, or the peer sent what it must not: report it, stop checkpointing. */
  protected breakWith(e: unknown): void {
    if (this.error || this.failover.requested || this.ended) return;
    this.error = e as MigrationFailure;
    this.log(errorMessage(e));
    this.emitExit('error');
    this.channel?.close();
    this.signal.notify();
  }

  protected emitExit(reason: COLOExitReason): void {
    if (this.exitSent) return;
    this.exitSent = true;
    this.service.emit('exit', this.mode, reason);
  }

  /** The exit reason query-colo-status reports once the failover is done. */
  get exitReason(): COLOExitReason {
    return this.failover.by === 'auto' ? 'error' : 'request';
  }

  /** The peer was silent for the auto-failover time. */
  private silent(ms: number): void {
    if (this.failover.requested || this.ended) return;
    const who = this.mode === 'primary' ? 'secondary' : 'primary';
    this.breakWith(new ChannelError(`COLO: no sign of life from the ${who} for ${Math.round(ms)} ms`, 'ETIMEDOUT'));
    const why = this.whyNotAlone();
    if (why !== null) {
      this.noteSilence(why);
      return;
    }
    try {
      this.requestFailover('auto');
    } catch (e) {
      // lost the witness claim (or could not reach the witness): keep the guest stopped
      this.error = new MigrationError(errorMessage(e), { cause: e });
      this.log(errorMessage(e));
      void this.fence();
    }
  }

  /** Lost the claim: this machine must not run the guest. */
  protected abstract fence(): Promise<void>;

  /** Logs, once, that the peer went silent and this side does not fail over by itself. */
  private noteSilence(reason: string): void {
    if (this.silenceLogged) return;
    this.silenceLogged = true;
    this.log(reason);
  }

  /** The VM quits (or a test ends): stop everything, whatever the state. */
  shutdown(): void {
    this.ended = true;
    this.stopLiveness();
    this.channel?.close();
    this.signal.notify();
  }
}
