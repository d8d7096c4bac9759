/**
 * The primary of a COLO pair: the phase of an outgoing migration that
 * follows a completed precopy when x-colo is on (docs/colo.md;
 * docs/spec/stream-format.md §14; QEMU's migration/colo.c).
 *
 *   colo      migration status active → colo; wait for checkpoint-ready
 *             (the secondary loaded everything); run the guest again
 *   loop      every x-checkpoint-delay ms (or at once, when the delay
 *             changes or the console comparison asks):
 *               checkpoint-request → checkpoint-reply
 *               guest stopped (run state colo): RAM dirtied since the last
 *               checkpoint and all device state into a buffer; guest runs
 *               vmstate-send, vmstate-size N, N bytes
 *               vmstate-received, vmstate-loaded
 *   broken    the link failed or the secondary sent what it must not: the
 *             error is reported (log, COLO_EXIT, query-colo-status) and the
 *             guest stays stopped (run state colo) until a failover: its
 *             output must not reach clients the secondary knows nothing of,
 *             and the secondary may be taking over
 *   failover  x-colo-lost-heartbeat (or the heartbeat timeout): the link
 *             closes, held console output goes out, status colo →
 *             completed, the guest runs alone
 *
 * Unlike QEMU, the guest runs again as soon as the checkpoint is in the
 * buffer, not after vmstate-loaded: the buffer is the consistent copy, and
 * with the console comparison in `full` mode no output of the new epoch is
 * released before the secondary has loaded the checkpoint that precedes it
 * (compare.ts), which is the guarantee QEMU's later resume gives.
 *
 * A failure before checkpoint-ready (the secondary never started) fails
 * the migration instead (colo → failed) and the guest runs on, as after a
 * failed precopy: no secondary exists that could take over.
 */
import { randomBytes } from 'node:crypto';
import type { ColoCheckpointInfo, MigrationStatus } from '../../generated/qapi-types.js';
import type { MigratableDevice, RunState } from '../../machine/types.js';
import type { Channel } from '../channel/channel.js';
import { MigrationError, type MigrationFailure } from '../errors.js';
import type { MigrationOptions } from '../core/options.js';
import type { MachinePort } from '../core/port.js';
import type { StatusMachine } from '../core/status.js';
import { RamSaveSection } from '../ram/section.js';
import type { LiveSection } from '../sections/section.js';
import type { StreamReader } from '../stream/reader.js';
import { MigrationStreamError } from '../wire/errors.js';
import { CheckpointWriter, type BuiltCheckpoint } from './checkpoint.js';
import { ConsoleCompare } from './compare.js';
import { ColoStateDevice, FerryColoDevice } from './devices.js';
import { ColoRuntime, ms3 } from './runtime.js';
import type { ColoService } from './service.js';
import { COLO_ERR, ColoReader, ColoWriter, FERRY_CONSOLE, FERRY_HEARTBEAT, MSG } from './wire.js';

/** Device sections a QEMU `-M none` guest has (x-qemu-compat: only these go). */
const QEMU_DEVICES: ReadonlySet<string> = new Set(['timer', 'globalstate']);
/** How often held console lines are checked against compare-timeout. */
const COMPARE_TICK_MS = 100;

/** What the outgoing session hands over once the first migration's last byte is out. */
export interface PrimaryContext {
  readonly machine: MachinePort;
  readonly options: MigrationOptions;
  readonly status: StatusMachine;
  readonly channel: Channel;
  /** The return path: from its first byte, or after the SHUT when the return-path capability had it. */
  readonly input: StreamReader;
  /** The migration's live sections: checkpoints carry RAM (QEMU's COLO leaves block migration out too). */
  readonly sections: readonly LiveSection[];
  /** The guest was stopped by the first migration: run it again. */
  resumeGuest(): Promise<void>;
  /** The session is over (failover done): its final figures. */
  finish(): void;
}

type Trigger = 'delay' | 'parameter' | 'compare';

export class ColoPrimary extends ColoRuntime {
  readonly mode = 'primary' as const;
  private ctx: PrimaryContext | null = null;
  private ram: RamSaveSection | null = null;
  private readonly qemuCompatible: boolean;
  private readonly colostate = new ColoStateDevice(true);
  private readonly ferry: FerryColoDevice;
  private readonly cpWriter = new CheckpointWriter();
  private compare: ConsoleCompare | null = null;
  private compareTimer: NodeJS.Timeout | null = null;
  private unwatchParams: (() => void) | null = null;
  /** Messages from the secondary not yet expected, and who waits for the next. */
  private readonly queue: number[] = [];
  private queueWaiter: (() => void) | null = null;
  private pumpError: MigrationFailure | null = null;
  private trigger: Trigger | null = null;
  private lastStart = 0;
  /** The guest's run state when the break stopped it (given back at the failover). */
  private stoppedFrom: RunState | null = null;
  /** The secondary has sent checkpoint-ready. */
  private ready = false;
  /** The session's trace points (core/outgoing.ts SourceTracePoint; tests inject faults there). */
  private readonly trace: (point: 'colo-checkpoint' | 'colo-checkpoint-sent') => void;

  constructor(
    service: ColoService,
    opts: { qemuCompatible: boolean; now: () => number; log: (m: string) => void; trace?: (point: 'colo-checkpoint' | 'colo-checkpoint-sent') => void },
  ) {
    super(service, opts.now, opts.log);
    this.qemuCompatible = opts.qemuCompatible;
    this.trace = opts.trace ?? (() => undefined);
    this.pairId = opts.qemuCompatible ? null : randomBytes(16);
    this.ferry = new FerryColoDevice(() => {
      const p = this.service.parameters.get();
      return { pairId: this.pairId!, witness: p.witness !== '', heartbeatTimeoutMs: p['heartbeat-timeout'] };
    });
  }

  /** The device sections COLO adds to every stream (the first migration's and each checkpoint's). */
  streamDevices(): MigratableDevice[] {
    return this.qemuCompatible ? [this.colostate] : [this.colostate, this.ferry];
  }

  get inColo(): boolean {
    return this.ctx !== null && this.ctx.status.is('colo') && !this.failedOver;
  }

  get compareCheckpoints(): number {
    return this.compare?.checkpointsAsked ?? 0;
  }

  get consoleHeld(): number {
    return this.compare?.held ?? 0;
  }

  protected autoFailoverAfterMs(): number {
    return this.service.parameters.get()['heartbeat-timeout'];
  }

  protected whyNotAlone(): null {
    // the secondary never takes over without a witness the primary claims first
    return null;
  }

  /** A checkpoint as soon as possible (the first reason given is kept). */
  requestCheckpoint(why: Trigger): void {
    if (!this.inColo || this.error) return;
    this.trigger ??= why;
    this.signal.notify();
  }

  /**
   * From the first migration's last byte to the failover. Resolves once the
   * guest runs alone (status completed), or when shutdown() ends it; rejects
   * only when the secondary never started (the caller fails the migration).
   */
  async run(ctx: PrimaryContext): Promise<void> {
    this.ctx = ctx;
    this.channel = ctx.channel;
    const ram = ctx.sections.find((x): x is RamSaveSection => x instanceof RamSaveSection);
    const other = ctx.sections.find((x) => x !== ram);
    if (!ram || other) throw new MigrationError(other ? `COLO does not checkpoint the '${other.idstr}' section` : 'COLO needs the ram section');
    this.ram = ram;
    this.reader = new ColoReader(ctx.input, () => this.alive());
    this.writer = new ColoWriter(ctx.channel.output, this.now);
    this.reader.extensions = this.writer.extensions = !this.qemuCompatible;
    this.service.attach(this);
    ctx.status.to('colo');
    // nothing of the RAM section's precopy machinery takes part in checkpoints
    ram.sender.setPageHook(null);
    ram.autoConverge.lift();
    this.startLiveness();
    try {
      await this.reader.expect(MSG.CHECKPOINT_READY);
      this.ready = true;
    } catch (e) {
      if (!this.failover.requested && !this.ended) {
        this.stopLiveness();
        this.service.detach(this);
        throw e;
      }
    }
    if (this.ready && !this.failover.requested && !this.ended) {
      // QEMU's order: replication starts before the guest runs again
      await this.service.replicate('start', this.mode);
      await ctx.resumeGuest();
      this.startCompare();
      void this.pump();
      this.lastStart = this.now();
      await this.loop();
    }
    if (this.ended) return;
    if (!this.failover.requested) await this.brokenWait();
    if (this.ended) return;
    await this.doFailover();
  }

  private async loop(): Promise<void> {
    while (!this.failover.requested && !this.error && !this.ended) {
      const trigger = await this.nextTrigger();
      if (trigger === null) return;
      try {
        await this.checkpoint(trigger);
      } catch (e) {
        if (this.failover.requested || this.ended) return;
        this.breakWith(e);
        return;
      }
    }
  }

  /** Waits until a checkpoint is due; null when the loop must end. */
  private async nextTrigger(): Promise<Trigger | null> {
    for (;;) {
      if (this.failover.requested || this.error || this.ended) return null;
      if (this.trigger !== null) {
        const t = this.trigger;
        this.trigger = null;
        return t;
      }
      const due = this.lastStart + this.ctx!.options.get('x-checkpoint-delay');
      const wait = due - this.now();
      if (wait <= 0) return 'delay';
      await this.signal.wait(wait);
    }
  }

  private async checkpoint(trigger: Trigger): Promise<void> {
    const ctx = this.ctx!;
    const writer = this.writer!;
    const start = this.now();
    this.lastStart = start;
    writer.send(MSG.CHECKPOINT_REQUEST);
    await this.expect(MSG.CHECKPOINT_REPLY);
    let built: BuiltCheckpoint | null = null;
    const stop0 = this.now();
    let pause: number;
    try {
      await ctx.machine.checkpointPause(async () => {
        if (this.failover.requested || this.ended) return;
        this.compare?.closeEpoch();
        await this.service.replicate('checkpoint', this.mode);
        built = await this.cpWriter.build(ctx.machine.machineType, this.ram!, this.checkpointDevices());
      });
      pause = this.now() - stop0;
      if (built === null) return; // failover requested meanwhile
      const cp = built as BuiltCheckpoint;
      this.trace('colo-checkpoint');
      writer.sendCheckpoint(cp.data, cp.size);
      this.trace('colo-checkpoint-sent');
      await this.expect(MSG.VMSTATE_RECEIVED);
      await this.expect(MSG.VMSTATE_LOADED);
    } finally {
      // the secondary has its replication checkpoint (or the transaction is over): held disk writes go on
      await this.service.replicate('checkpoint-done', this.mode);
    }
    const cp = built as BuiltCheckpoint;
    this.compare?.loaded();
    this.checkpoints++;
    const info: ColoCheckpointInfo = {
      pause: ms3(pause),
      size: cp.size,
      'dirty-pages': cp.pages,
      'reset-pages': 0,
      duration: ms3(this.now() - start),
      trigger,
    };
    this.lastCheckpoint = info;
    this.service.emit('checkpoint', this.mode, this.checkpoints, info);
  }

  private checkpointDevices(): MigratableDevice[] {
    const m = this.ctx!.machine;
    const own = this.qemuCompatible ? m.devices.filter((d) => QEMU_DEVICES.has(d.idstr)) : [...m.devices];
    return [...own, ...this.streamDevices()];
  }

  // ---- the return path: read all the time (console lines, heartbeats, COLOMessages)

  private async pump(): Promise<void> {
    const reader = this.reader!;
    try {
      for (;;) {
        const m = await reader.next();
        if (m.msg === FERRY_HEARTBEAT) continue;
        if (m.msg === FERRY_CONSOLE) {
          this.compare?.secondaryLine(m.line!);
          continue;
        }
        this.queue.push(m.msg);
        this.wakeQueue();
      }
    } catch (e) {
      this.pumpError = e as MigrationFailure;
      this.wakeQueue();
      if (!this.failover.requested && !this.ended) this.breakWith(e);
    }
  }

  private wakeQueue(): void {
    const w = this.queueWaiter;
    this.queueWaiter = null;
    w?.();
  }

  /** The next COLOMessage from the secondary must be `expected`. */
  private async expect(expected: number): Promise<void> {
    while (this.queue.length === 0) {
      if (this.pumpError) throw this.pumpError;
      if (this.failover.requested || this.ended) throw new MigrationError('COLO: failover');
      await new Promise<void>((r) => (this.queueWaiter = r));
    }
    const got = this.queue.shift()!;
    if (got !== expected) throw new MigrationStreamError(COLO_ERR.unexpected(got, expected));
  }

  // ---- the console comparison

  private startCompare(): void {
    const { machine } = this.ctx!;
    const apply = (): void => {
      const p = this.service.parameters.get();
      if (p.compare === 'off' && this.compare === null) return;
      if (this.compare === null) {
        this.compare = new ConsoleCompare(p.compare, p['compare-timeout'], {
          release: (text) => machine.writeConsole(text),
          checkpoint: () => this.requestCheckpoint('compare'),
          now: this.now,
        });
        machine.setConsoleTap((line) => this.compare!.primaryLine(line));
        this.compareTimer = setInterval(() => this.compare?.tick(), COMPARE_TICK_MS);
        this.compareTimer.unref();
      } else {
        this.compare.configure(p.compare, p['compare-timeout']);
      }
    };
    apply();
    this.unwatchParams = this.service.parameters.onChange(() => {
      if (this.inColo && !this.error) apply();
    });
  }

  private stopCompare(): void {
    this.unwatchParams?.();
    this.unwatchParams = null;
    if (this.compareTimer) clearInterval(this.compareTimer);
    this.compareTimer = null;
    if (this.compare) {
      this.ctx!.machine.setConsoleTap(null);
      this.compare.releaseAll();
    }
  }

  // ---- broken, failover

  /** Broken: the guest stops (fail-stop) until a failover (or a fence) settles it. */
  private async brokenWait(): Promise<void> {
    const m = this.ctx!.machine;
    if (this.stoppedFrom === null) {
      this.stoppedFrom = m.runState === 'colo' ? 'running' : m.runState;
      await m.enterRunState('colo').catch(() => undefined);
    }
    while (!this.failover.requested && !this.ended) await this.signal.wait();
  }

  protected async fence(): Promise<void> {
    // the guest is stopped already (brokenWait); it stays so
  }

  private async doFailover(): Promise<void> {
    const ctx = this.ctx!;
    this.failover.activate();
    this.stopLiveness();
    ctx.channel.close();
    this.stopCompare();
    await this.service.replicate('failover', this.mode);
    // the guest runs alone: back to what it was when COLO broke (running, unless a user paused it);
    // a failover before checkpoint-ready finds it still stopped by the first migration
    const back = this.stoppedFrom ?? (ctx.machine.runState === 'colo' ? 'running' : null);
    try {
      if (!this.ready) await ctx.resumeGuest();
      else if (back !== null) await ctx.machine.enterRunState(back);
    } catch (e) {
      this.log(`COLO: the guest could not run again: ${(e as Error).message}`);
    }
    ctx.finish();
    ctx.status.to('completed');
    this.failover.complete();
    this.service.detach(this);
    this.log('COLO: failover completed, the primary runs alone');
  }

  /** Bytes COLO has put on the link so far (after the first migration's). */
  get bytesSent(): number {
    return this.writer?.bytesWritten ?? 0;
  }

  /**
   * migrate_cancel in colo (QEMU 7.2): the status stays colo, but the link
   * is shut down both ways (QEMU shuts the return path's file down, which
   * in COLO is the migration socket itself): the session breaks as on a
   * lost link and waits for a failover.
   */
  shutdownLink(): void {
    if (this.inColo) this.ctx!.channel.close();
  }

  override shutdown(): void {
    super.shutdown();
    if (this.compareTimer) clearInterval(this.compareTimer);
    this.unwatchParams?.();
    this.wakeQueue();
  }

  /** For query-colo-status: the status it reports. */
  get migrationStatus(): MigrationStatus | undefined {
    return this.ctx?.status.status;
  }

  /** The secondary confirmed the first migration (checkpoint-ready). */
  get started(): boolean {
    return this.ready;
  }
}
