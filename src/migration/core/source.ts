/**
 * The outgoing migration: QEMU's source state machine and precopy loop
 * (qmp.md Parts C.1, D, E.1, E.2, E.6).
 *
 *   none/completed/failed/cancelled --start--> setup
 *   setup  -> active | failed | cancelling
 *   active -> completed | failed | cancelling
 *   cancelling -> cancelled
 *
 * The data path runs on the main thread in slices: each slice encodes at most
 * one staging buffer (or ~5 ms) of pages into a PART section, hands it to the
 * channel and yields to the event loop with setImmediate, so QMP stays
 * responsive at full speed.
 */
import { EventEmitter } from 'node:events';
import { setImmediate as yieldToLoop } from 'node:timers/promises';
import type { MigrationInfo, MigrationStatus } from '../../generated/qapi-types.js';
import { connectOutgoing, parseMigrationUri, resolveFdParam, type Channel } from '../channel/index.js';
import { CompressPool } from '../codec/compress-pool.js';
import { RamSender, type SendBudget, type SendResult } from '../ram/sender.js';
import { XbzrleSender } from '../ram/xbzrle.js';
import { StreamReader } from '../stream/reader.js';
import { StreamWriter } from '../stream/writer.js';
import { WIRE } from '../wire/constants.js';
import {
  putCmdOpenReturnPath,
  putCmdPing,
  putConfiguration,
  putEof,
  putFooter,
  putHeader,
  putSectionPartEnd,
  putSectionStartFull,
  putVmdesc,
  readRpMessage,
} from '../wire/records.js';
import { writeDeviceSections, buildVmdesc } from '../devices.js';
import { MigrationError, errorMessage } from './errors.js';
import { MigrationClockDevice, wallClockUs } from './clock-device.js';
import type { MigrationOptions } from './options.js';
import type { MachinePort } from './port.js';
import { SourceStats, DIRTY_RATE_PERIOD_MS } from './stats.js';
import { AutoConverge } from './auto-converge.js';

const S = WIRE.SECTION;
/** Share of downtime-limit given to the final RAM transfer (see iterate()). */
const SWITCHOVER_SHARE = 0.5;
/** Device sections a QEMU `-M none` guest has. */
const QEMU_DEVICES: ReadonlySet<string> = new Set(['timer', 'globalstate']);
/** Section id of `ram`; device sections are numbered after it. */
const RAM_SECTION_ID = 2;

const ACTIVE_STATES: ReadonlySet<MigrationStatus> = new Set(['setup', 'active', 'postcopy-active']);
const BUSY_STATES: ReadonlySet<MigrationStatus> = new Set([
  'setup', 'active', 'postcopy-active', 'cancelling', 'colo',
]);

export interface SourceDeps {
  lookupFd(name: string): number | undefined;
  /**
   * Send only the device sections QEMU itself knows (`timer`, `globalstate`),
   * so that a QEMU 7.2 `-M none` guest can be the destination. Workload and
   * serial state then stay behind.
   */
  qemuCompatible?: boolean;
  /** Whether a user-created object with this id exists (tls-creds lookup). */
  hasObject?(id: string): boolean;
  /** Clock in ms (default performance.now). */
  now?: () => number;
}

export interface MigrateFlags {
  blk?: boolean;
  inc?: boolean;
}

class Cancelled extends Error {}

export declare interface MigrationSource {
  on(event: 'status', listener: (status: MigrationStatus) => void): this;
  on(event: 'pass', listener: (pass: number) => void): this;
}

export class MigrationSource extends EventEmitter {
  private state: MigrationStatus = 'none';
  private errorDesc: string | undefined;
  private stats = new SourceStats();
  private started = false;
  private channel: Channel | null = null;
  private writer: StreamWriter | null = null;
  private abort: AbortController | null = null;
  private sender: RamSender | null = null;
  /** compress-threads workers while a migration with `compress` runs. */
  private compressPool: CompressPool | null = null;
  /** XBZRLE encoder of the current (or last) migration when `xbzrle` is on. */
  private xbzrle: XbzrleSender | null = null;
  private autoConverge: AutoConverge | null = null;
  /** now() of the last dirty-bitmap sync (auto-converge's periodic sync). */
  private lastSync = 0;
  /** true while the VM is stopped by us and must be restarted on failure */
  private vmStoppedByUs = false;
  private readonly now: () => number;
  /** Resolves when the current run() has finished all cleanup (tests, quit). */
  private running: Promise<void> = Promise.resolve();

  constructor(
    private readonly machine: MachinePort,
    private readonly options: MigrationOptions,
    private readonly deps: SourceDeps,
  ) {
    super();
    this.now = deps.now ?? (() => performance.now());
  }

  get status(): MigrationStatus {
    return this.state;
  }

  /** True in setup, active and postcopy-active (migration_is_setup_or_active). */
  isActive(): boolean {
    return ACTIVE_STATES.has(this.state);
  }

  /** Resolves once the migration in flight has ended and cleaned up. */
  whenIdle(): Promise<void> {
    return this.running;
  }

  private setStatus(next: MigrationStatus, expected?: readonly MigrationStatus[]): boolean {
    if (expected && !expected.includes(this.state)) return false;
    if (this.state === next) return true;
    this.state = next;
    this.emit('status', next);
    return true;
  }

  /**
   * `migrate`: synchronous checks (each throws MigrationError with QEMU's
   * text), then the migration runs in the background.
   */
  start(uri: string, flags: MigrateFlags = {}): void {
    if (BUSY_STATES.has(this.state)) {
      throw new MigrationError("There's a migration process in progress");
    }
    if (this.machine.runState === 'inmigrate') {
      throw new MigrationError('Guest is waiting for an incoming migration');
    }
    const tls = this.options.get('tls-creds');
    if (tls !== '') {
      // never migrate in the clear when the user asked for TLS
      if (!this.deps.hasObject?.(tls)) throw new MigrationError(`No TLS credentials with id '${tls}'`);
      throw new MigrationError('TLS migration is not supported by this build yet');
    }
    if (flags.blk || flags.inc) {
      if (this.options.capability('block') || this.options.get('block-incremental')) {
        throw new MigrationError('Command options are incompatible with current migration capabilities');
      }
      throw new MigrationError(
        'QEMU compiled without old-style (blk/-b, inc/-i) block migration',
      );
    }
    // reset: statistics zeroed, error cleared, none -> setup (event)
    this.stats = new SourceStats();
    this.xbzrle = null;
    this.errorDesc = undefined;
    this.started = true;
    this.state = 'none';
    this.stats.begin(this.now(), this.machine.ram.reduce((a, b) => a + b.size, 0));
    this.setStatus('setup');

    let parsed;
    try {
      parsed = parseMigrationUri(uri, 'outgoing');
    } catch (e) {
      // a bad URI fails the migration without error-desc (as QEMU does)
      this.setStatus('failed');
      throw new MigrationError(errorMessage(e));
    }
    if (parsed.kind === 'fd') {
      // QEMU looks the descriptor up before it returns from `migrate`
      try {
        resolveFdParam(parsed.name, this.deps.lookupFd);
      } catch (e) {
        this.errorDesc = errorMessage(e);
        this.setStatus('failed');
        throw new MigrationError(this.errorDesc);
      }
    }
    this.abort = new AbortController();
    this.autoConverge = new AutoConverge(this.machine, this.options);
    this.running = this.run(parsed).catch(() => undefined);
  }

  /** `migrate_cancel`: always succeeds; acts in setup, active and postcopy-active. */
  cancel(): void {
    if (!this.isActive()) return;
    this.setStatus('cancelling');
    this.abort?.abort();
    this.writer?.setError(new Cancelled('migration cancelled'));
    this.channel?.close();
  }

  /** `migrate_set_speed` / max-bandwidth changed: applies to the running stream at once. */
  applyMaxBandwidth(): void {
    if (this.writer && this.state === 'active') {
      this.writer.setMaxBandwidth(this.options.get('max-bandwidth'));
    }
  }

  /** migrate-set-cache-size: the running migration's cache takes the new size (emptied). */
  resizeXbzrleCache(size: number): void {
    if (this.isActive()) this.xbzrle?.resize(size);
  }

  /** `xbzrle-cache` whenever the capability is on (D.1, xbzrle.md §5). */
  private addXbzrle(info: MigrationInfo): void {
    if (!this.options.capability('xbzrle')) return;
    const size = this.options.xbzrleCacheSize();
    info['xbzrle-cache'] = this.xbzrle?.stats(size) ??
      { 'cache-size': size, bytes: 0, pages: 0, 'cache-miss': 0, 'cache-miss-rate': 0, overflow: 0 };
  }

  private checkCancelled(): void {
    if (this.state === 'cancelling') throw new Cancelled('migration cancelled');
  }

  private async run(uri: ReturnType<typeof parseMigrationUri>): Promise<void> {
    const setupStart = this.now();
    const useReturnPath = this.options.capability('return-path');
    let rp: ReturnPath | null = null;
    try {
      const channel = await connectOutgoing(uri, {
        lookupFd: this.deps.lookupFd,
        signal: this.abort!.signal,
      });
      this.channel = channel;
      this.checkCancelled();
      if (useReturnPath && !channel.bidirectional) {
        throw new MigrationError('Unable to open return-path for postcopy');
      }
      const w = new StreamWriter(channel.output, { now: this.now });
      this.writer = w;
      w.setMaxBandwidth(this.options.get('max-bandwidth'));
      this.stats.beginTransfer(this.now(), 0, this.options.get('downtime-limit'));

      putHeader(w);
      putConfiguration(w, this.machine.machineType);
      if (useReturnPath) {
        rp = new ReturnPath(channel, (e) => this.onReturnPathError(e));
        putCmdOpenReturnPath(w);
        putCmdPing(w, 1);
      }

      // setup: START section with the block list; the migration bitmap starts
      // all ones and the first sync clears what the vCPUs dirtied so far
      const sender = new RamSender(this.machine.ram, { now: this.now });
      this.sender = sender;
      if (this.options.capability('xbzrle')) {
        this.xbzrle = new XbzrleSender(sender, this.options.xbzrleCacheSize(), this.now());
        sender.setPageHook(this.xbzrle.hook);
      }
      putSectionStartFull(w, S.START, RAM_SECTION_ID, 'ram', 0, WIRE.RAM.VERSION);
      sender.syncDirtyLog();
      this.onSync(sender, 0);
      sender.sendSetup(w);
      putFooter(w, RAM_SECTION_ID);
      await w.flush();
      this.checkCancelled();
      this.stats.setupTime = Math.round(this.now() - setupStart);
      this.setStatus('active', ['setup']);
      this.checkCancelled();

      await this.iterate(w, sender);
      await this.complete(w, sender, rp);
    } catch (e) {
      await this.fail(e);
    } finally {
      // the migration left its loop, whatever the outcome: unthrottle (E.3)
      this.autoConverge?.lift();
      rp?.stop();
      this.channel?.close();
      this.channel = null;
      this.writer = null;
      this.sender = null;
      void this.compressPool?.close();
      this.compressPool = null;
      this.xbzrle?.release();
      this.abort = null;
    }
  }

  private onSync(sender: RamSender, newlyDirty: number): void {
    const now = this.now();
    this.lastSync = now;
    const dirtied = this.stats.onSync(now, newlyDirty);
    if (dirtied !== undefined) this.autoConverge?.onPeriod(dirtied, sender.counters.transferred);
    this.stats.remainingPages = sender.dirtyPages;
    this.xbzrle?.onSync(now);
    this.emit('pass', this.stats.dirtySyncCount);
  }

  /** Precopy iterations until the rest fits in downtime-limit (qmp.md E.2). */
  private async iterate(w: StreamWriter, sender: RamSender): Promise<void> {
    let threshold = 0;
    for (;;) {
      this.checkCancelled();
      if (w.error) throw w.error;
      const now = this.now();
      if (this.stats.updateWindow(now, w.bytesWritten)) {
        // Bytes that fit in the downtime budget. QEMU uses the whole limit;
        // we keep half of it for what the estimate does not see (stopping
        // the vCPUs, the device sections, the destination starting its guest),
        // so that the measured downtime stays within downtime-limit.
        threshold = this.stats.bandwidth * this.options.get('downtime-limit') * SWITCHOVER_SHARE;
      }
      let pending = sender.dirtyPages * 4096;
      if (pending < threshold || pending === 0 || this.periodicSyncDue(sender, now)) {
        const found = sender.syncDirtyLog();
        this.onSync(sender, found);
        pending = sender.dirtyPages * 4096;
      }
      this.stats.remainingPages = sender.dirtyPages;
      if (pending === 0 || pending < threshold) return;

      // one slice: a PART section of dirty pages
      putSectionPartEnd(w, S.PART, RAM_SECTION_ID);
      await this.sendSlice(w, sender, { maxMillis: 5 });
      sender.sendEos(w);
      putFooter(w, RAM_SECTION_ID);
      this.copyCounters(sender);
      await w.flush();
      if (w.rateLimitExceeded()) await w.waitForWindow();
      else await yieldToLoop();
    }
  }

  /**
   * auto-converge only looks at the guest when a sync closes a ≥ 1 s period.
   * Like QEMU we sync when the rest fits the threshold or a pass is over
   * (pending 0), so a workload that never converges still gets one sync per
   * pass. A pass lasts (dirty set / bandwidth), which can be many seconds: with
   * auto-converge on, after the bulk stage, we also sync once a period is
   * due, so the trigger is evaluated about every second whatever the pass
   * length. The rule compares bytes dirtied with bytes sent in the same
   * period, so the shorter periods change how soon it answers, not what.
   * During the bulk stage there is no extra sync (QEMU does not throttle
   * then: its first sync after setup comes at the end of the bulk pass).
   */
  private periodicSyncDue(sender: RamSender, now: number): boolean {
    return this.autoConverge !== null && this.autoConverge.enabled && !sender.bulkStage &&
      now - this.lastSync >= DIRTY_RATE_PERIOD_MS;
  }

  /** One batch of dirty pages: compressed on the pool with `compress` on (xbzrle.md §6). */
  private sendSlice(w: StreamWriter, sender: RamSender, budget: SendBudget): SendResult | Promise<SendResult> {
    if (this.options.capability('compress')) {
      this.compressPool ??= new CompressPool({ threads: this.options.get('compress-threads') });
      return sender.sendPagesCompressed(w, this.compressPool, this.options.get('compress-level'), budget);
    }
    return sender.sendPages(w, budget);
  }

  private copyCounters(sender: RamSender): void {
    const c = sender.counters;
    this.stats.ramTransferred = c.transferred;
    this.stats.duplicate = c.duplicate;
    this.stats.normal = c.normal;
    this.stats.remainingPages = sender.dirtyPages;
  }

  /** Stop-and-copy: VM stopped, the rest of RAM, devices, EOF, vmdesc. */
  private async complete(w: StreamWriter, sender: RamSender, rp: ReturnPath | null): Promise<void> {
    const stopWall = wallClockUs();
    const stopTime = this.now();
    await this.machine.stopForMigration();
    this.vmStoppedByUs = true;
    this.checkCancelled();
    w.setMaxBandwidth(0);
    const found = sender.syncDirtyLog();
    this.onSync(sender, found);

    this.xbzrle?.setLastStage();
    putSectionPartEnd(w, S.END, RAM_SECTION_ID);
    for (;;) {
      const r = await this.sendSlice(w, sender, { maxMillis: 50 });
      if (r.done) break;
      if (w.wantsFlush()) {
        await w.flush();
        this.checkCancelled();
      }
    }
    sender.sendEos(w);
    putFooter(w, RAM_SECTION_ID);
    this.copyCounters(sender);

    const devices = this.deps.qemuCompatible
      ? this.machine.devices.filter((d) => QEMU_DEVICES.has(d.idstr))
      : [...this.machine.devices, new MigrationClockDevice(stopWall)];
    const { entries } = writeDeviceSections(w, devices, RAM_SECTION_ID + 1);
    putEof(w);
    putVmdesc(w, buildVmdesc(entries));
    await w.drain();
    this.checkCancelled();
    if (rp) {
      const shut = await rp.waitForShut();
      this.checkCancelled();
      if (shut !== 0) {
        throw new MigrationError(`Destination reported failure (SHUT ${shut})`);
      }
    } else {
      await endOutput(this.channel!);
    }
    const end = this.now();
    // An exec: command (a forwarder such as socat) must get to pass the tail
    // of the stream on before close() signals it: wait, bounded, for the
    // channel to wind down by itself.
    if (!rp) await waitForClose(this.channel!, CHANNEL_LINGER_MS);
    this.stats.downtime = Math.round(end - stopTime);
    this.stats.totalTime = Math.round(end - this.stats.startTime);
    const total = w.bytesWritten;
    this.stats.mbps = this.stats.totalTime > 0 ? (total * 8) / this.stats.totalTime / 1000 : 0;
    this.stats.remainingPages = 0;
    this.vmStoppedByUs = false;
    this.machine.enterPostmigrate();
    this.setStatus('completed', ['active']);
  }

  private onReturnPathError(e: Error): void {
    this.writer?.setError(e);
    this.channel?.close();
  }

  private async fail(e: unknown): Promise<void> {
    const cancelled = this.state === 'cancelling';
    if (this.vmStoppedByUs) {
      this.vmStoppedByUs = false;
      try {
        await this.machine.resumeAfterMigration();
      } catch {
        /* the VM stays stopped; the failure below is what the user sees */
      }
    }
    if (cancelled) {
      this.setStatus('cancelled', ['cancelling']);
      return;
    }
    this.errorDesc = errorMessage(e);
    this.setStatus('failed');
  }

  info(): MigrationInfo {
    if (!this.started) return {};
    const s = this.stats;
    const st = this.state;
    const info: MigrationInfo = { status: st };
    const now = this.now();
    if (st === 'active' || st === 'postcopy-active' || st === 'cancelling') {
      info['total-time'] = Math.round(now - s.startTime);
      info['expected-downtime'] = s.expectedDowntime;
      info['setup-time'] = s.setupTime;
      info.ram = s.ram(false);
      this.addXbzrle(info);
      this.addThrottle(info);
    } else if (st === 'completed') {
      info['total-time'] = s.totalTime;
      info.downtime = s.downtime;
      info['setup-time'] = s.setupTime;
      info.ram = s.ram(true);
      this.addXbzrle(info);
      this.addThrottle(info);
    } else if (st === 'failed') {
      if (this.errorDesc !== undefined) info['error-desc'] = this.errorDesc;
    }
    return info;
  }

  /** `cpu-throttle-percentage`: only while auto-converge throttles (D.1). */
  private addThrottle(info: MigrationInfo): void {
    const pct = this.autoConverge?.throttle ?? 0;
    if (pct > 0) info['cpu-throttle-percentage'] = pct;
  }
}

/** How long a finished source waits for its channel to close by itself. */
const CHANNEL_LINGER_MS = 5000;

function waitForClose(ch: Channel, ms: number): Promise<void> {
  if (ch.released) return Promise.resolve();
  return new Promise((resolve) => {
    const t = setTimeout(done, ms);
    function done() {
      clearTimeout(t);
      ch.off('close', done);
      resolve();
    }
    ch.once('close', done);
  });
}

/** End the forward direction and wait until the bytes are handed to the OS. */
function endOutput(ch: Channel): Promise<void> {
  return new Promise((resolve, reject) => {
    const out = ch.output;
    if (out.writableFinished) return resolve();
    out.once('error', reject);
    out.end(() => resolve());
  });
}

/**
 * Reader of the destination's messages (stream-format.md §12). PONGs are
 * noted, SHUT ends it; anything malformed fails the migration.
 */
class ReturnPath {
  private readonly reader: StreamReader;
  private shut: number | null = null;
  private shutWaiters: ((v: number) => void)[] = [];
  private failWaiters: ((e: Error) => void)[] = [];
  private error: Error | null = null;
  private stopped = false;
  readonly pongs: number[] = [];

  constructor(
    ch: Channel,
    private readonly onError: (e: Error) => void,
  ) {
    this.reader = new StreamReader(ch.input);
    void this.loop();
  }

  private async loop(): Promise<void> {
    try {
      for (;;) {
        const m = await readRpMessage(this.reader);
        if (m.type === 'PONG') this.pongs.push(m.value);
        else if (m.type === 'SHUT') {
          this.shut = m.value;
          for (const f of this.shutWaiters) f(m.value);
          this.shutWaiters = [];
          return;
        } else {
          throw new MigrationError(`Unexpected return path message ${m.type} in precopy`);
        }
      }
    } catch (e) {
      if (this.stopped) return;
      const err = new MigrationError(`Detected IO failure for postcopy. Migration fails: ${errorMessage(e)}`);
      this.error = err;
      for (const f of this.failWaiters) f(err);
      this.failWaiters = [];
      this.onError(err);
    }
  }

  waitForShut(): Promise<number> {
    if (this.shut !== null) return Promise.resolve(this.shut);
    if (this.error) return Promise.reject(this.error);
    return new Promise((resolve, reject) => {
      this.shutWaiters.push(resolve);
      this.failWaiters.push(reject);
    });
  }

  stop(): void {
    this.stopped = true;
    this.reader.detach();
  }
}
