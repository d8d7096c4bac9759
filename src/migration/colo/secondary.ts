/**
 * The secondary of a COLO pair: what an incoming migration becomes when
 * its stream carried COLOState with colo_requested (docs/colo.md;
 * docs/spec/stream-format.md §14).
 *
 *   colo      migration status active → colo. The primary's RAM as loaded
 *             is copied into a RAM snapshot (QEMU's colo_cache) and the
 *             device state is kept: together, the last checkpoint. The
 *             guest runs as a hot standby (whatever -S said, as in QEMU),
 *             its console lines go to the primary instead of to its own
 *             console; checkpoint-ready.
 *   loop      checkpoint-request: guest stopped (run state colo),
 *             checkpoint-reply; vmstate-send, vmstate-size N; all N bytes
 *             into memory; vmstate-received; the checkpoint is checked
 *             whole, then applied (checkpoint.ts), and its pages and those
 *             the guest wrote since the checkpoint before are put back;
 *             the guest enters the run state the primary had; vmstate-loaded.
 *   broken    reported (log, COLO_EXIT, query-colo-status); the standby
 *             runs on and waits for a failover, as in 2.10
 *   failover  x-colo-lost-heartbeat (or the heartbeat timeout, with a
 *             witness): the guest is put back to the last complete
 *             checkpoint (RAM from the snapshot, devices), its console
 *             prints again, status colo → completed, and it runs from
 *             there as an ordinary VM (which may migrate, or be the
 *             primary of a new pair).
 */
import type { ColoCheckpointInfo, MigrationStatus } from '../../generated/qapi-types.js';
import { newBitmap } from '../../base/bitmap.js';
import type { MigratableDevice, RunState } from '../../machine/types.js';
import type { Channel } from '../channel/channel.js';
import type { MachinePort } from '../core/port.js';
import type { StatusMachine } from '../core/status.js';
import { MigrationError } from '../errors.js';
import type { StreamReader } from '../stream/reader.js';
import { MigrationStreamError } from '../wire/errors.js';
import { CheckpointLoader, loadDevices, saveDevices, type DevicePayload } from './checkpoint.js';
import type { ColoRequest } from './devices.js';
import { secondaryGraceMs } from './failover.js';
import { ColoRuntime, ms3 } from './runtime.js';
import type { ColoService } from './service.js';
import { COLO_ERR, ColoReader, ColoWriter, MSG } from './wire.js';

/** Checkpoint slack beyond guest RAM (device state, records, names). */
const CHECKPOINT_SLACK = 64 << 20;

/** What the incoming session hands over once the first migration has loaded. */
export interface SecondaryContext {
  readonly machine: MachinePort;
  readonly status: StatusMachine;
  readonly channel: Channel;
  /** The main stream, after the first migration's vmdesc. */
  readonly input: StreamReader;
  /** The COLOState / ferry-colo sections as loaded (the primary's settings, updated by every checkpoint). */
  readonly request: ColoRequest;
}

export class ColoSecondary extends ColoRuntime {
  readonly mode = 'secondary' as const;
  private ctx: SecondaryContext | null = null;
  private loader: CheckpointLoader | null = null;
  /** The last complete checkpoint's device state and run state (the failover's rollback). */
  private devices: DevicePayload[] = [];
  private runState: RunState = 'running';
  private buf: Buffer = Buffer.alloc(0);

  get inColo(): boolean {
    return this.ctx !== null && this.ctx.status.is('colo') && !this.failedOver;
  }

  get migrationStatus(): MigrationStatus | undefined {
    return this.ctx?.status.status;
  }

  protected autoFailoverAfterMs(): number {
    const own = this.service.parameters.get()['heartbeat-timeout'];
    const info = this.ctx?.request.ferry.received;
    if (own === 0 || this.whyNotAlone() !== null || !info) return own;
    return Math.max(own, info.heartbeatTimeoutMs + secondaryGraceMs(info.heartbeatTimeoutMs));
  }

  protected whyNotAlone(): string | null {
    const info = this.ctx?.request.ferry.received;
    if (this.service.parameters.get().witness === '' || !info?.witness) {
      return 'COLO: the primary is silent; the secondary does not fail over by itself without a witness both machines claim (x-colo-lost-heartbeat does)';
    }
    return null;
  }

  /** From the end of the first migration's load to the failover (or shutdown()). Never rejects on a link failure. */
  async run(ctx: SecondaryContext): Promise<void> {
    this.ctx = ctx;
    this.channel = ctx.channel;
    const { machine } = ctx;
    const info = ctx.request.ferry.received;
    this.pairId = info?.pairId ?? null;
    this.reader = new ColoReader(ctx.input, () => this.alive());
    this.writer = new ColoWriter(ctx.channel.output, this.now);
    this.reader.extensions = this.writer.extensions = info !== null;
    this.service.attach(this);
    ctx.status.to('colo');
    // the last checkpoint is what was just loaded
    const cache = machine.snapshotRam();
    machine.takeDirtyPages(machine.ram.map((b) => newBitmap(b.pages)));
    const all = this.checkpointDevices();
    this.loader = new CheckpointLoader(machine, cache, all);
    this.devices = saveDevices(machine.devices);
    this.runState = machine.loadedRunState ?? 'running';
    // the standby's console: to the primary (when it compares), never to our own output
    machine.setConsoleTap((line) => {
      try {
        this.writer?.consoleLine(line);
      } catch {
        /* the link is gone: the reader reports it */
      }
      return true;
    });
    try {
      await machine.enterRunState(this.runState);
      await this.service.replicate('start', this.mode);
      this.writer.send(MSG.CHECKPOINT_READY);
      this.startLiveness();
      await this.loop();
    } catch (e) {
      if (!this.failover.requested && !this.ended) this.breakWith(e);
    }
    while (!this.failover.requested && !this.ended) await this.signal.wait();
    if (this.ended) return;
    await this.doFailover();
  }

  private checkpointDevices(): MigratableDevice[] {
    return [...this.ctx!.machine.devices, ...this.ctx!.request.devices];
  }

  private async loop(): Promise<void> {
    const reader = this.reader!;
    while (!this.failover.requested && !this.ended) {
      const msg = await reader.nextColo();
      if (msg !== MSG.CHECKPOINT_REQUEST) throw new MigrationStreamError(COLO_ERR.unknown(msg));
      if (this.failover.requested || this.ended) return;
      await this.checkpoint();
    }
  }

  private async checkpoint(): Promise<void> {
    const { machine } = this.ctx!;
    const reader = this.reader!;
    const writer = this.writer!;
    const start = this.now();
    let info: ColoCheckpointInfo | null = null;
    await machine.checkpointPause(async () => {
      writer.send(MSG.CHECKPOINT_REPLY);
      await reader.expect(MSG.VMSTATE_SEND);
      const n = await reader.expectValue(MSG.VMSTATE_SIZE);
      const limit = machine.ram.reduce((a, b) => a + b.size, 0) * 1.25 + CHECKPOINT_SLACK;
      if (n > limit) throw new MigrationStreamError(`COLO: a checkpoint of ${n} bytes is larger than this machine could need (${Math.round(limit)})`);
      this.buf = await reader.readBlob(this.buf, n);
      writer.send(MSG.VMSTATE_RECEIVED);
      let applied;
      let cp;
      try {
        cp = await this.loader!.validate(this.buf.subarray(0, n));
        applied = await this.loader!.apply(cp);
      } catch (e) {
        throw new MigrationStreamError(COLO_ERR.loadvm((e as Error).message), { cause: e });
      }
      // the new last checkpoint
      this.devices = cp.devices.filter((p) => machine.devices.includes(p.device));
      this.runState = cp.runState ?? this.runState;
      await this.service.replicate('checkpoint', this.mode);
      info = { pause: 0, size: n, 'dirty-pages': applied.receivedPages, 'reset-pages': applied.resetPages, duration: 0, trigger: '' };
      return this.runState;
    });
    writer.send(MSG.VMSTATE_LOADED);
    const i = info as ColoCheckpointInfo | null;
    if (i) {
      i.pause = i.duration = ms3(this.now() - start);
      this.checkpoints++;
      this.lastCheckpoint = i;
      this.service.emit('checkpoint', this.mode, this.checkpoints, i);
    }
  }

  protected async fence(): Promise<void> {
    const m = this.ctx!.machine;
    if (m.runState === 'running') await m.enterRunState('colo').catch(() => undefined);
  }

  /** Back to the last complete checkpoint and on as an ordinary VM. */
  private async doFailover(): Promise<void> {
    const ctx = this.ctx!;
    const { machine } = ctx;
    this.failover.activate();
    this.stopLiveness();
    ctx.channel.close();
    let reset = 0;
    await machine.checkpointPause(async () => {
      const pages = machine.ram.map((b) => newBitmap(b.pages));
      machine.takeDirtyPages(pages);
      reset = machine.restoreRamPages(this.loader!.cache, pages);
      try {
        loadDevices(this.devices);
      } catch (e) {
        // the state was loaded once already: refusing it now is a bug
        throw new MigrationError(`COLO: the last checkpoint's device state does not load again: ${(e as Error).message}`, { cause: e });
      }
      machine.setConsoleTap(null);
      await this.service.replicate('failover', this.mode);
      return this.runState;
    });
    this.log(`COLO: failover completed: the secondary runs from checkpoint ${this.checkpoints} (${reset} pages of its own put back)`);
    ctx.status.to('completed');
    this.failover.complete();
    this.service.detach(this);
    this.loader = null;
  }
}
