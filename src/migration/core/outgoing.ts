/**
 * One outgoing migration: QEMU's migration thread, on the main loop
 * (docs/spec/qmp.md Parts C.1, D, E.1, E.2, E.6).
 *
 * The session owns everything the migration uses: the channel, the stream
 * writer, the return path, the live sections and the compression workers.
 * It runs setup, the precopy iterations and the completion, or hands over to
 * the postcopy switch (postcopy/switch.ts), and it is disposed exactly once,
 * on every path, by run()'s `finally`.
 *
 * The data path works in slices: each slice asks every live section with
 * data left for at most one staging buffer or ~5 ms of work, hands the bytes
 * to the channel and yields to the event loop, so QMP stays responsive at
 * full speed.
 */
import { setImmediate as yieldToLoop } from 'node:timers/promises';
import type { MigrationInfo, MigrationStatus } from '../../generated/qapi-types.js';
import { TARGET_PAGE_SIZE, type MigratableDevice } from '../../machine/types.js';
import { endOutput, linger, openOutgoing, type Channel, type ChannelWrapper, type MigrationUri } from '../channel/index.js';
import { chainWrappers, migrationTls, type TlsDeps } from '../channel/tls.js';
import { CompressPool } from '../codec/compress-pool.js';
import { ColoPrimary, COLO_ERR, type ColoService } from '../colo/index.js';
import { CancelledError, MigrationError, PeerError, errorMessage, inPhase, type MigrationFailure, type MigrationPhase } from '../errors.js';
import { DecisionLog, type DecisionWhy } from '../observe/decisions.js';
import type { MultifdSender } from '../multifd/sender.js';
import { checkMultifd, openMultifd } from '../multifd/setup.js';
import type { MultifdWorkers } from '../multifd/workers.js';
import { runPostcopy } from '../postcopy/switch.js';
import { ReturnPathReader } from '../return-path/reader.js';
import { MigrationClockDevice, wallClockUs } from '../sections/clock-device.js';
import { buildVmdesc, writeDeviceSections, type VmdescEntry } from '../sections/device-sections.js';
import { FIRST_SECTION_ID, type SectionRegistry } from '../sections/registry.js';
import type { LiveSection, OutgoingSectionContext, Pending } from '../sections/section.js';
import { StreamReader } from '../stream/reader.js';
import { StreamWriter, type ByteSink } from '../stream/writer.js';
import { WIRE } from '../wire/constants.js';
import {
  putCmdOpenReturnPath,
  putCmdPing,
  putCmdPostcopyAdvise,
  putConfiguration,
  putEof,
  putFooter,
  putHeader,
  putSectionPartEnd,
  putSectionStartFull,
  putVmdesc,
} from '../wire/records.js';
import type { MigrationOptions } from './options.js';
import type { MachinePort } from './port.js';
import { SourceStats } from './stats.js';
import type { SwitchoverBudget } from './switchover.js';
import type { StatusMachine } from './status.js';

const S = WIRE.SECTION;
/** Main-thread work per slice before yielding to the event loop. */
const SLICE_MS = 5;
/** Device sections a QEMU `-M none` guest has. */
const QEMU_DEVICES: ReadonlySet<string> = new Set(['timer', 'globalstate']);
/** How long a failed postcopy source waits for the return path's last words. */
const RP_SETTLE_MS = 1000;
/**
 * How long a migrate_cancel that comes after the last byte waits for the
 * destination's verdict (SHUT) before it cuts the migration short anyway.
 */
export const CANCEL_VERDICT_MS = 2000;
/** How long a source waits for an exec: command that ended its stdout without a SHUT to exit. */
const EXIT_STATUS_MS = 1000;

/**
 * Named points of an outgoing migration, reported to `trace` as they are
 * reached (tests cancel or inject faults there; nothing else depends on it).
 */
export type SourceTracePoint =
  | 'connected'
  | 'setup-sent'
  | 'slice'
  /** a chunk record of the block bulk walk was put (block/sender.ts) */
  | 'block-bulk'
  | 'stopped'
  | 'sent'
  | 'lingering'
  | 'postcopy-stopped'
  | 'package-sent'
  | 'postcopy-slice'
  | 'postcopy-sent'
  /** x-colo: a checkpoint is built and its bytes go next (vmstate-send, vmstate-size, the stream; colo/primary.ts) */
  | 'colo-checkpoint'
  /** x-colo: those bytes were handed to the channel; vmstate-received is awaited */
  | 'colo-checkpoint-sent'
  | 'disposed';

export interface OutgoingDeps {
  readonly machine: MachinePort;
  readonly options: MigrationOptions;
  readonly sections: SectionRegistry;
  readonly status: StatusMachine;
  now(): number;
  lookupFd(name: string): number | undefined;
  /** Send only QEMU's own device sections (a QEMU 7.2 `-M none` destination). */
  readonly qemuCompatible: boolean;
  /** Put the configuration record after the header (QEMU's migration.send-configuration). */
  readonly sendConfiguration: boolean;
  readonly wrapChannel?: ChannelWrapper;
  /** Where the credentials that tls-creds names are found (channel/tls.ts). */
  readonly tls?: TlsDeps;
  trace?(point: SourceTracePoint): void;
  /** The MIGRATION_PASS count went up. */
  onPass(count: number): void;
  /** What switchovers cost on this VM (switchover.ts); one per source, shared by its migrations. */
  readonly switchover: SwitchoverBudget;
  /** The VM's COLO (x-colo: after the precopy the session goes on as a COLO primary, colo/primary.ts). */
  readonly colo: ColoService;
  /** The VM's multifd channel workers. */
  readonly multifdWorkers: MultifdWorkers;
  log?(msg: string): void;
}

/** A live section of this migration with its section id. */
export interface ActiveSection {
  readonly id: number;
  readonly section: LiveSection;
}

interface PendingSum {
  precopy: number;
  postcopy: number;
  total: number;
  each: Pending[];
}

export class OutgoingSession {
  readonly stats = new SourceStats();
  readonly abort = new AbortController();
  /** What the switchover decided and why (x-query-migrate-decisions). */
  readonly decisions = new DecisionLog();
  /** The dirty-sync count (MIGRATION_PASS) so far. */
  pass = 0;
  channel: Channel | null = null;
  writer: StreamWriter | null = null;
  returnPath: ReturnPathReader | null = null;
  sections: ActiveSection[] = [];
  /** The error the migration failed with (error-desc is its message). */
  error: MigrationFailure | undefined;
  /** migrate-start-postcopy was issued for this migration. */
  postcopyRequested = false;
  /** The switch to postcopy has begun: the guest may run on the destination. */
  inPostcopy = false;
  /** The VM is stopped by us and must be restarted on failure. */
  vmStopped = false;
  /** x-colo: the COLO primary this migration becomes once its precopy completed. */
  colo: ColoPrimary | null = null;
  phase: MigrationPhase = 'start';
  private compress: CompressPool | null = null;
  /** The multifd channels (`multifd`). */
  multifd: MultifdSender | null = null;
  /** Which section goes first in the next slice. */
  private turn = 0;
  /** vmdesc entries of the device sections written by writeDevices(). */
  private vmdesc: VmdescEntry[] = [];
  private disposed = false;
  /** now() when the vCPUs stopped for the switchover. */
  private stopTime = 0;
  /** Every byte is out and the return path's SHUT will say who owns the guest. */
  private verdictPending = false;
  private cancelTimer: NodeJS.Timeout | undefined;

  constructor(readonly deps: OutgoingDeps) {
    this.stats.begin(deps.now());
  }

  get machine(): MachinePort {
    return this.deps.machine;
  }

  get options(): MigrationOptions {
    return this.deps.options;
  }

  now(): number {
    return this.deps.now();
  }

  trace(point: SourceTracePoint): void {
    this.deps.trace?.(point);
  }

  // ---------------------------------------------------------------- run

  /** The whole migration; resolves (never rejects) once it ended and the session is disposed. */
  async run(uri: MigrationUri): Promise<void> {
    try {
      await this.setup(uri);
      this.phase = 'iterate';
      const next = await this.iterate();
      if (next === 'postcopy') {
        this.phase = 'postcopy-switch';
        await runPostcopy(this);
      } else {
        this.phase = 'complete';
        await this.complete();
      }
    } catch (e) {
      await this.fail(e);
    } finally {
      this.dispose();
    }
  }

  /** migrate_cancel: the writer fails with CancelledError, the channel closes, a pending connect aborts. */
  cancel(): void {
    this.abort.abort();
    this.writer?.setError(new CancelledError({ phase: this.phase }));
    this.channel?.close();
  }

  /**
   * migrate_cancel after the last byte, while the destination's verdict is
   * pending: the destination may have loaded everything and be running the
   * guest already, so resuming ours would leave two running copies (QEMU
   * resumes it). The cancel waits for the SHUT: 0 completes the migration
   * (the cancel came too late), anything else fails it and our guest runs on.
   * Without a verdict within CANCEL_VERDICT_MS, `then` cancels after all.
   * False when nothing is pending (cancel at once).
   */
  deferCancel(then: () => void): boolean {
    if (!this.verdictPending) return false;
    this.cancelTimer ??= setTimeout(() => {
      this.verdictPending = false;
      then();
    }, CANCEL_VERDICT_MS);
    return true;
  }

  /** Throws CancelledError once migrate_cancel was issued. */
  checkCancelled(): void {
    if (this.deps.status.is('cancelling')) throw new CancelledError({ phase: this.phase });
  }

  /** Exactly once: every resource of the migration is released. */
  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    for (const { section } of this.sections) {
      try {
        section.cleanup();
      } catch (e) {
        this.deps.log?.(`cleanup of section '${section.idstr}' failed: ${(e as Error).stack ?? String(e)}`);
      }
    }
    this.returnPath?.stop();
    this.colo?.shutdown();
    this.channel?.close();
    void this.multifd?.close();
    void this.compress?.close();
    this.compress = null;
    this.trace('disposed');
  }

  get isDisposed(): boolean {
    return this.disposed;
  }

  private async setup(uri: MigrationUri): Promise<void> {
    const { options, machine } = this;
    const setupStart = this.now();
    const postcopy = options.capability('postcopy-ram');
    // postcopy-ram implies the return path (docs/spec/qmp.md B.2)
    const useReturnPath = postcopy || options.capability('return-path');
    // what multifd cannot do is refused before anything connects
    if (options.capability('multifd')) checkMultifd(options, uri.kind === 'tcp' || uri.kind === 'unix');
    this.phase = 'connect';
    // transport → the test's wrapper (it sees the bytes on the wire) → TLS
    const tls = migrationTls(options.get('tls-creds'), this.deps.tls, 'outgoing', {
      hostname: options.get('tls-hostname'),
      uriHost: uri.kind === 'tcp' ? uri.host : undefined,
      signal: this.abort.signal,
    });
    const wrap = chainWrappers(this.deps.wrapChannel, tls);
    const channel = await openOutgoing(uri, { lookupFd: this.deps.lookupFd, signal: this.abort.signal, wrap });
    this.channel = channel;
    this.checkCancelled();
    this.trace('connected');
    this.phase = 'setup';
    if (useReturnPath && !channel.bidirectional) throw new MigrationError('Unable to open return-path for postcopy');
    if (options.capability('x-colo')) {
      // COLO's messages come back on the channel's other direction
      if (!channel.bidirectional) throw new MigrationError(COLO_ERR.noReturnPath());
      this.colo = new ColoPrimary(this.deps.colo, {
        qemuCompatible: this.deps.qemuCompatible,
        now: this.deps.now,
        log: (m) => this.deps.log?.(m),
        trace: (p) => this.trace(p),
      });
      // the replicated drives mirror from here on, so that the first migration's disk writes reach the secondary too
      await this.deps.colo.replicate('setup', 'primary').catch((e: unknown) => {
        throw new MigrationError(errorMessage(e), { cause: e });
      });
    }
    if (options.capability('multifd')) {
      // the channels connect after the main one, as QEMU's do
      this.multifd = await openMultifd(uri, options, machine.ram, this.abort.signal, this.deps.multifdWorkers, (e) => {
        this.writer?.setError(e);
        this.channel?.close();
      });
      this.checkCancelled();
    }
    const w = new StreamWriter(channel.output, { now: this.deps.now });
    this.writer = w;
    w.setMaxBandwidth(options.get('max-bandwidth'));
    this.stats.beginTransfer(this.now(), 0, options.get('downtime-limit'));

    putHeader(w);
    if (this.deps.sendConfiguration) putConfiguration(w, machine.machineType);
    if (useReturnPath) {
      this.returnPath = new ReturnPathReader(channel, (e) => this.onReturnPathError(e), { stopAtShut: this.colo !== null });
      putCmdOpenReturnPath(w);
      putCmdPing(w, 1);
    }
    // page-size summary: the OR of every block's page size (all 4 KiB here)
    if (postcopy) putCmdPostcopyAdvise(w, TARGET_PAGE_SIZE, TARGET_PAGE_SIZE);

    const ctx = this.sectionContext();
    let id = FIRST_SECTION_ID;
    for (const type of this.deps.sections.types) {
      const section = type.save(ctx);
      if (section) this.sections.push({ id: id++, section });
    }
    for (const { id, section } of this.sections) {
      putSectionStartFull(w, S.START, id, section.idstr, section.instanceId, section.version);
      await section.setup(w);
      putFooter(w, id);
    }
    await w.flush();
    this.checkCancelled();
    this.trace('setup-sent');
    this.stats.setupTime = Math.round(this.now() - setupStart);
    if (!this.deps.status.toIf(['setup'], 'active')) this.checkCancelled();
  }

  private sectionContext(): OutgoingSectionContext {
    return {
      machine: this.machine,
      options: this.options,
      now: this.deps.now,
      returnPath: this.returnPath,
      compressPool: () => (this.compress ??= new CompressPool({ threads: this.options.get('compress-threads') })),
      onPass: (n) => {
        this.pass = n;
        this.deps.onPass(n);
      },
      throughputMbps: () => this.stats.mbps,
      qemuCompatible: this.deps.qemuCompatible,
      trace: (p) => this.trace(p),
      multifd: this.multifd,
    };
  }

  /** What every live section has left (`exact`: see LiveSection.pending). */
  pending(exact: boolean): PendingSum {
    const sum: PendingSum = { precopy: 0, postcopy: 0, total: 0, each: [] };
    for (const { section } of this.sections) {
      const { precopy, postcopy } = section.pending(exact);
      sum.precopy += precopy;
      sum.postcopy += postcopy;
      sum.each.push({ precopy, postcopy });
    }
    sum.total = sum.precopy + sum.postcopy;
    return sum;
  }

  /**
   * Precopy iterations until the rest fits in downtime-limit (docs/spec/qmp.md
   * E.2), or until a requested switch to postcopy can happen.
   */
  private async iterate(): Promise<'complete' | 'postcopy'> {
    const w = this.writer!;
    let threshold = 0;
    for (;;) {
      this.checkCancelled();
      if (w.error) throw w.error;
      if (this.stats.updateWindow(this.now(), w.bytesWritten)) {
        // Bytes that fit in the downtime budget: QEMU's rule (what remains
        // fits in downtime-limit at the measured bandwidth, here the lowest
        // of the last two windows), less the measured cost of the stop
        // itself (switchover.ts)
        threshold = this.deps.switchover.thresholdBytes(this.stats.lowBandwidth, this.options.get('downtime-limit'));
      }
      // bytes put but not yet handed to the kernel go after the stop too
      const queued = w.bytesWritten - w.bytesFlushed;
      let p = this.pending(false);
      const exact = p.total + queued < threshold || p.total === 0;
      if (exact) p = this.pending(true);
      this.stats.remaining = p.total;
      if (p.total === 0 || p.total + queued < threshold) {
        this.decide(p, queued, threshold, 'switchover', p.total === 0 ? 'empty' : 'fits');
        return 'complete';
      }
      // what must go before the switch fits: postcopy carries the rest
      const postcopy = this.postcopyRequested && this.options.capability('postcopy-ram');
      if (postcopy && p.precopy + queued <= threshold) {
        this.decide(p, queued, threshold, 'postcopy', 'postcopy-fits');
        return 'postcopy';
      }
      if (exact) this.decide(p, queued, threshold, 'iterate', postcopy ? 'postcopy-waits' : 'too-much');

      this.trace('slice');
      // Sections take turns at going first, so that one that fills the
      // rate-limit window or the staging buffer does not starve the others.
      const t0 = this.now();
      const n = this.sections.length;
      const first = this.turn++ % n;
      for (let k = 0; k < n; k++) {
        const i = (first + k) % n;
        const pi = p.each[i]!;
        if (pi.precopy + pi.postcopy === 0) continue;
        const left = SLICE_MS - (this.now() - t0);
        if (left <= 0) break;
        const { id, section } = this.sections[i]!;
        putSectionPartEnd(w, S.PART, id);
        await section.iterate(w, { maxMillis: left });
        putFooter(w, id);
        if (w.wantsFlush() || w.rateLimitExceeded()) break;
      }
      await w.flush();
      if (w.rateLimitExceeded()) await w.waitForWindow();
      else await yieldToLoop();
    }
  }

  /** Record a decision with the figures it was taken on (observe/decisions.ts). */
  private decide(p: PendingSum, queued: number, threshold: number, decision: 'iterate' | 'switchover' | 'postcopy', why: DecisionWhy): void {
    const budget = this.deps.switchover;
    const limit = this.options.get('downtime-limit');
    const bandwidth = this.stats.lowBandwidth;
    this.decisions.record({
      timeMs: this.now() - this.stats.startTime,
      pass: this.pass,
      dirtyBytes: p.total,
      precopyBytes: p.precopy,
      queuedBytes: queued,
      bandwidth,
      plannedBandwidth: budget.plannedBandwidth(bandwidth),
      expectedDowntimeMs: budget.expectedDowntimeMs(p.total + queued, bandwidth, limit),
      limitMs: limit,
      reserveMs: budget.reserveMs(limit),
      thresholdBytes: threshold,
      decision,
      why,
    });
  }

  /** Stop-and-copy: VM stopped, the rest of every section, devices, EOF, vmdesc. */
  private async complete(): Promise<void> {
    const w = this.writer!;
    const stopWall = wallClockUs();
    const stopTime = this.now();
    this.stopTime = stopTime;
    const bandwidth = this.stats.lowBandwidth;
    const flushedAtStop = w.bytesFlushed;
    await this.machine.stopForMigration();
    this.vmStopped = true;
    this.checkCancelled();
    this.trace('stopped');
    w.setMaxBandwidth(0);
    for (const { id, section } of this.sections) {
      putSectionPartEnd(w, S.END, id);
      await section.completePrecopy(w);
      putFooter(w, id);
    }
    this.writeDevices(w, stopWall);
    putEof(w);
    putVmdesc(w, buildVmdesc(this.vmdesc));
    await w.drain();
    this.checkCancelled();
    const rp = this.returnPath;
    // set before the trace point: a cancel there must already wait for the verdict
    this.verdictPending = rp !== null && !this.colo;
    this.trace('sent');
    if (this.colo) {
      await this.runColo(rp);
      return;
    }
    if (rp) {
      const ch = this.channel!;
      let shut: number;
      try {
        // an exec: command sees the end of the stream only at EOF on its
        // stdin: `cat > FILE` would otherwise wait for more while we wait for
        // its SHUT (QEMU 7.2 hangs there in `active`). Ended now, a command
        // that cannot answer exits, its stdout ends, and that fails below.
        if (ch.endOnLastByte) await endOutput(ch);
        shut = await rp.waitForShut();
      } catch (e) {
        // the command ended without a verdict: its exit status, when it
        // failed (a full disk), says more than the end of its stdout
        if (ch.endOnLastByte && !this.deps.status.is('cancelling')) {
          await linger(ch, EXIT_STATUS_MS, this.abort.signal);
          if (ch.error !== undefined) throw ch.error;
          if (ch.released) throw new PeerError(`The command exited without a verdict on the return path (no SHUT): ${errorMessage(e)}`, { cause: e });
        }
        throw e;
      } finally {
        this.verdictPending = false;
        clearTimeout(this.cancelTimer);
      }
      this.checkCancelled();
      if (shut !== 0) throw new PeerError(`Destination reported failure (SHUT ${shut})`);
    } else {
      await endOutput(this.channel!);
    }
    const end = this.now();
    if (!rp) {
      // without a return path, the channel closing is the end: an exec:
      // forwarder gets to pass the tail on before we close it
      this.trace('lingering');
      await linger(this.channel!, undefined, this.abort.signal);
      // an exec: forwarder that failed to pass the tail on (`cat > FILE` on
      // a full disk exits 1): the stream did not arrive, our guest runs on
      const chErr = this.channel!.error;
      if (chErr !== undefined && !this.deps.status.is('cancelling')) throw chErr;
    }
    // a cancel that came after the last byte still wins (QEMU: cancelled, the source runs on)
    this.checkCancelled();
    this.stats.downtime = Math.round(end - stopTime);
    this.deps.switchover.record(end - stopTime, w.bytesWritten - flushedAtStop, bandwidth);
    this.finish(end);
  }

  /** x-colo: instead of completing, the session goes on as the COLO primary until a failover. */
  private async runColo(rp: ReturnPathReader | null): Promise<void> {
    const channel = this.channel!;
    let input: StreamReader;
    if (rp) {
      // the destination confirms the load with SHUT 0 before COLO's messages
      const shut = await rp.waitForShut();
      this.checkCancelled();
      if (shut !== 0) throw new PeerError(`Destination reported failure (SHUT ${shut})`);
      input = rp.takeReader();
    } else {
      input = new StreamReader(channel.input);
    }
    this.phase = 'colo';
    const end = this.now();
    this.stats.downtime = Math.round(end - this.stopTime);
    await this.colo!.run({
      machine: this.machine,
      options: this.options,
      status: this.deps.status,
      channel,
      input,
      sections: this.sections.map((a) => a.section),
      resumeGuest: async () => {
        this.vmStopped = false;
        await this.machine.resumeAfterMigration();
      },
      finish: () => this.stats.finish(this.now(), this.writer!.bytesWritten),
    });
  }

  /** The device sections of the switchover, numbered after the live sections. */
  writeDevices(w: ByteSink, stopWallUs: number): void {
    const first = FIRST_SECTION_ID + this.sections.length;
    const { entries } = writeDeviceSections(w, this.devicesToSend(stopWallUs), first);
    this.vmdesc = entries;
  }

  /** Device sections for the switchover (stop time in the ferry-migration section). */
  private devicesToSend(stopWallUs: number): MigratableDevice[] {
    const own = this.deps.qemuCompatible
      ? this.machine.devices.filter((d) => QEMU_DEVICES.has(d.idstr))
      : [...this.machine.devices, new MigrationClockDevice(stopWallUs)];
    return this.colo ? [...own, ...this.colo.streamDevices()] : own;
  }

  /** Final statistics, run state postmigrate, status completed. */
  finish(end: number): void {
    this.stats.finish(end, this.writer!.bytesWritten);
    this.vmStopped = false;
    this.machine.enterPostmigrate();
    this.deps.status.to('completed');
  }

  private onReturnPathError(e: MigrationFailure): void {
    e.phase ??= 'return-path';
    this.writer?.setError(e);
    // after the last byte on an exec: channel, complete() first waits for
    // the command's exit status (it closes the channel when it is done)
    if (this.verdictPending && this.channel?.endOnLastByte) return;
    this.channel?.close();
  }

  private async fail(e: unknown): Promise<void> {
    // x-colo: a session that never began stops the mirroring its setup started
    if (this.colo !== null && !this.colo.started) {
      await this.deps.colo.replicate('abort', 'primary').catch((x: unknown) => this.deps.log?.(`COLO: stopping block replication failed: ${errorMessage(x)}`));
    }
    let err = inPhase(e, this.phase);
    // a write that failed on a wrapped channel (TLS): the channel's text names the layer
    const chErr = this.channel?.error;
    if (chErr !== undefined && err.cause !== undefined && chErr.cause === err.cause) err = inPhase(chErr, this.phase);
    const rp = this.returnPath;
    if (this.inPostcopy && rp) {
      // a destination that gave up says so (SHUT) just before it closes: let
      // that message arrive, it decides whether our copy may run again
      await rp.settle(RP_SETTLE_MS);
      if (rp.failedBeforeRun()) err = new PeerError(`Destination reported failure (SHUT ${rp.shutValue})`, { phase: err.phase });
    }
    if (this.vmStopped) {
      this.vmStopped = false;
      if (this.inPostcopy && !rp?.failedBeforeRun()) {
        // The guest may have run on the destination: our copy is stale and
        // must not run again (docs/spec/qmp.md C.1). It stays stopped in postmigrate.
        this.machine.enterPostmigrate();
      } else {
        try {
          await this.machine.resumeAfterMigration();
        } catch {
          /* the VM stays stopped; the failure below is what the user sees */
        }
      }
    }
    if (err.kind === 'internal') this.deps.log?.(`migration failed on an internal error: ${stackOf(err)}`);
    // looked at only now: a cancel may have come while we waited above
    if (this.deps.status.is('cancelling')) {
      this.deps.status.to('cancelled');
      return;
    }
    this.error = err;
    this.deps.status.to('failed');
  }

  // ---------------------------------------------------------------- info

  /** query-migrate while this session is the current one. */
  info(status: MigrationStatus): MigrationInfo {
    const s = this.stats;
    const info: MigrationInfo = { status };
    if (status === 'active' || status === 'postcopy-active' || status === 'cancelling') {
      info['total-time'] = Math.round(this.now() - s.startTime);
      info['expected-downtime'] = s.expectedDowntime;
      info['setup-time'] = s.setupTime;
      for (const { section } of this.sections) section.addInfo?.(info, false);
    } else if (status === 'completed') {
      info['total-time'] = s.totalTime;
      info.downtime = s.downtime;
      info['setup-time'] = s.setupTime;
      for (const { section } of this.sections) section.addInfo?.(info, true);
    } else if (status === 'failed' && this.error !== undefined && this.error.message !== '') {
      info['error-desc'] = this.error.message;
    }
    return info;
  }

  /** The live section with this idstr, if it takes part. */
  section<T extends LiveSection>(idstr: string): T | undefined {
    return this.sections.find((s) => s.section.idstr === idstr)?.section as T | undefined;
  }
}

function stackOf(e: Error): string {
  const cause = (e as { cause?: unknown }).cause;
  return cause instanceof Error ? cause.stack ?? cause.message : e.stack ?? e.message;
}
