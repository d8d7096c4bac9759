/**
 * The outgoing migration: QEMU's source state machine and precopy loop
 * (qmp.md Parts C.1, D, E.1, E.2, E.6).
 *
 *   none/completed/failed/cancelled --start--> setup
 *   setup  -> active | failed | cancelling
 *   active -> completed | failed | cancelling | postcopy-active
 *   postcopy-active -> completed | failed | cancelling
 *   cancelling -> cancelled
 *
 * The data path runs on the main thread in slices: each slice encodes at most
 * one staging buffer (or ~5 ms) of pages into a PART section, hands it to the
 * channel and yields to the event loop with setImmediate, so QMP stays
 * responsive at full speed.
 *
 * Postcopy (stream-format.md §11, qmp.md E.4): with `postcopy-ram`, once
 * `migrate-start-postcopy` was requested the source stops the VM, tells the
 * destination which pages not to trust (RAM_DISCARD), sends the devices in a
 * PACKAGED blob that ends with POSTCOPY_RUN, and then streams the rest of RAM
 * while serving the destination's page requests first.
 */
import { EventEmitter } from 'node:events';
import { setImmediate as yieldToLoop } from 'node:timers/promises';
import type { MigrationInfo, MigrationStatus } from '../../generated/qapi-types.js';
import { connectOutgoing, parseMigrationUri, resolveFdParam, type Channel } from '../channel/index.js';
import { CompressPool } from '../codec/compress-pool.js';
import { RamReleaser } from '../ram/release.js';
import { RamSender, type SendBudget, type SendResult } from '../ram/sender.js';
import { XbzrleSender } from '../ram/xbzrle.js';
import { StreamReader } from '../stream/reader.js';
import { BufferSink, StreamWriter } from '../stream/writer.js';
import { WIRE } from '../wire/constants.js';
import { ERR } from '../wire/errors.js';
import {
  putCmdOpenReturnPath,
  putCmdPackaged,
  putCmdPing,
  putCmdPostcopyAdvise,
  putCmdPostcopyListen,
  putCmdPostcopyRun,
  putCmdRamDiscard,
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
import type { RamBlock } from '../../machine/types.js';
import { TARGET_PAGE_SIZE } from '../../machine/types.js';
import { SourceStats, DIRTY_RATE_PERIOD_MS } from './stats.js';
import { AutoConverge } from './auto-converge.js';

const S = WIRE.SECTION;
/** Share of downtime-limit given to the final RAM transfer (see iterate()). */
const SWITCHOVER_SHARE = 0.5;
/** Device sections a QEMU `-M none` guest has. */
const QEMU_DEVICES: ReadonlySet<string> = new Set(['timer', 'globalstate']);
/** Section id of `ram`; device sections are numbered after it. */
const RAM_SECTION_ID = 2;
/**
 * Bytes of background pages per PART section after the switch to postcopy
 * (4 full pages, or about a thousand zero pages). Small, so that a page
 * request waits behind little of the background walk.
 */
const POSTCOPY_SLICE_BYTES = 16 * 1024;
/**
 * SO_SNDBUF after the switch when the destination is on this host: a
 * requested page then queues behind at most about this much (x2, as Linux
 * counts it) in the kernel. Measured in bench/postcopy.ts: 64 KiB gave a
 * p99 fault latency of 10-25 ms, 16 KiB under 5 ms at the same throughput.
 */
const POSTCOPY_SOCKET_BUFFER = 16 * 1024;
/** release-ram: how often the sent pages are handed back during postcopy. */
const RELEASE_EVERY_MS = 20;

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
  /** migrate-start-postcopy was issued for this migration. */
  private postcopyRequested = false;
  /** The switch to postcopy has begun: the guest may run on the destination. */
  private inPostcopy = false;
  private rp: ReturnPath | null = null;
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
    this.postcopyRequested = false;
    this.inPostcopy = false;
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

  /**
   * `migrate-start-postcopy`: switch at the next decision point (qmp.md B.9,
   * E.2). The caller has checked the capability; a request when no migration
   * is running is remembered and has no effect, as in QEMU.
   */
  requestPostcopy(): void {
    this.postcopyRequested = true;
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
    const postcopy = this.options.capability('postcopy-ram');
    // postcopy-ram implies the return path (qmp.md B.2)
    const useReturnPath = postcopy || this.options.capability('return-path');
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
        rp = new ReturnPath(channel, postcopy ? this.machine.ram : null, (e) => this.onReturnPathError(e), () => {
          this.stats.postcopyRequests++;
        });
        this.rp = rp;
        putCmdOpenReturnPath(w);
        putCmdPing(w, 1);
      }
      if (postcopy) {
        // page-size summary: the OR of every block's page size (all 4 KiB here)
        putCmdPostcopyAdvise(w, TARGET_PAGE_SIZE, TARGET_PAGE_SIZE);
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

      const next = await this.iterate(w, sender);
      if (next === 'postcopy') await this.runPostcopy(w, sender, rp!);
      else await this.complete(w, sender, rp);
    } catch (e) {
      await this.fail(e);
    } finally {
      // the migration left its loop, whatever the outcome: unthrottle (E.3)
      this.autoConverge?.lift();
      rp?.stop();
      this.rp = null;
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

  /**
   * Precopy iterations until the rest fits in downtime-limit (qmp.md E.2),
   * or until a requested switch to postcopy can happen.
   */
  private async iterate(w: StreamWriter, sender: RamSender): Promise<'complete' | 'postcopy'> {
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
      if (pending === 0 || pending < threshold) return 'complete';
      // all of what is pending is RAM, which postcopy can carry
      if (this.postcopyRequested && this.options.capability('postcopy-ram')) return 'postcopy';

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

    const { entries } = writeDeviceSections(w, this.devicesToSend(stopWall), RAM_SECTION_ID + 1);
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
    this.finish(w, end);
  }

  /** Device sections for the switchover (stop time in the ferry-migration section). */
  private devicesToSend(stopWallUs: number) {
    return this.deps.qemuCompatible
      ? this.machine.devices.filter((d) => QEMU_DEVICES.has(d.idstr))
      : [...this.machine.devices, new MigrationClockDevice(stopWallUs)];
  }

  /** Final statistics, run state postmigrate, state completed. */
  private finish(w: StreamWriter, end: number): void {
    this.stats.totalTime = Math.round(end - this.stats.startTime);
    const total = w.bytesWritten;
    this.stats.mbps = this.stats.totalTime > 0 ? (total * 8) / this.stats.totalTime / 1000 : 0;
    this.stats.remainingPages = 0;
    this.vmStoppedByUs = false;
    this.machine.enterPostmigrate();
    this.setStatus('completed', ['active', 'postcopy-active']);
  }

  /**
   * The switch to postcopy and the postcopy phase (stream-format.md §11).
   * `downtime` is the time from the stop until the package is sent (D.2).
   */
  private async runPostcopy(w: StreamWriter, sender: RamSender, rp: ReturnPath): Promise<void> {
    // E.4: postcopy-active comes before the VM stops
    if (!this.setStatus('postcopy-active', ['active'])) this.checkCancelled();
    const stopWall = wallClockUs();
    const stopTime = this.now();
    await this.machine.stopForMigration();
    this.vmStoppedByUs = true;
    this.inPostcopy = true;
    this.checkCancelled();
    w.setMaxBandwidth(0);
    // after the switch the destination takes ZERO and PAGE records only
    sender.setPageHook(null);
    const found = sender.syncDirtyLog();
    this.onSync(sender, found);

    // every page the destination must not trust: never sent, or dirtied since
    const max = WIRE.LIMITS.DISCARD_MAX_RANGES;
    for (let b = 0; b < sender.blocks.length; b++) {
      const ranges = sender.dirtyRanges(b);
      for (let i = 0; i < ranges.length; i += max) {
        putCmdRamDiscard(w, sender.blocks[b]!.name, ranges, i, Math.min(i + max, ranges.length));
      }
    }
    sender.resetLastBlock();
    putCmdPing(w, 2);
    const pkg = new BufferSink();
    putCmdPostcopyListen(pkg);
    writeDeviceSections(pkg, this.devicesToSend(stopWall), RAM_SECTION_ID + 1);
    putCmdPing(pkg, 3);
    putCmdPostcopyRun(pkg);
    putCmdPackaged(w, pkg.length);
    w.putBytes(pkg.toBuffer());
    putCmdPing(w, 4);
    await w.flush();
    this.checkCancelled();
    this.stats.downtime = Math.round(this.now() - stopTime);
    // From here on requested pages must not queue behind megabytes in the
    // kernel. Not earlier: the discards and the package should go at full
    // speed, the guest is stopped until they are in.
    this.channel?.limitSocketBuffers(POSTCOPY_SOCKET_BUFFER);

    // release-ram frees only once the destination has loaded the devices
    // (PONG 3): until then a failure can still give the guest back to us
    const releaser = this.options.capability('release-ram') ? new RamReleaser(sender.blocks, sender.bitmaps) : null;
    let released = -Infinity;
    for (;;) {
      this.checkCancelled();
      if (w.error) throw w.error;
      // a walk over the bitmaps, so not on every (small) slice
      if (releaser && this.now() - released >= RELEASE_EVERY_MS && rp.ponged(3)) {
        releaser.releaseSent();
        released = this.now();
      }
      if (sender.dirtyPages === 0) break;
      putSectionPartEnd(w, S.PART, RAM_SECTION_ID);
      this.serveRequests(w, sender, rp);
      sender.sendPages(w, { maxBytes: POSTCOPY_SLICE_BYTES, maxMillis: 1 });
      this.serveRequests(w, sender, rp);
      sender.sendEos(w);
      putFooter(w, RAM_SECTION_ID);
      this.copyCounters(sender);
      await w.flush();
      // lets the return path deliver the requests that came meanwhile
      await yieldToLoop();
    }
    putSectionPartEnd(w, S.END, RAM_SECTION_ID);
    sender.sendEos(w);
    putFooter(w, RAM_SECTION_ID);
    this.copyCounters(sender);
    putEof(w);
    await w.drain();
    this.checkCancelled();
    const shut = await rp.waitForShut();
    this.checkCancelled();
    if (shut !== 0) throw new MigrationError(`Destination reported failure (SHUT ${shut})`);
    releaser?.releaseSent();
    this.finish(w, this.now());
  }

  /** Pages the destination asked for go out before any background page. */
  private serveRequests(w: StreamWriter, sender: RamSender, rp: ReturnPath): void {
    for (let q = rp.nextRequest(); q !== null; q = rp.nextRequest()) {
      sender.sendRequested(w, q.block, q.page, q.pages);
    }
  }

  private onReturnPathError(e: Error): void {
    this.writer?.setError(e);
    this.channel?.close();
  }

  private async fail(e: unknown): Promise<void> {
    const cancelled = this.state === 'cancelling';
    const rp = this.rp;
    if (this.inPostcopy && rp) {
      // a destination that gave up says so (SHUT) just before it closes: let
      // that message arrive, it decides whether our copy may run again
      await rp.settle(RP_SETTLE_MS);
      if (rp.failedBeforeRun()) e = new MigrationError(`Destination reported failure (SHUT ${rp.shutValue})`);
    }
    if (this.vmStoppedByUs) {
      this.vmStoppedByUs = false;
      if (this.inPostcopy && !rp?.failedBeforeRun()) {
        // The guest may have run on the destination: our copy is stale and
        // must not run again (qmp.md C.1). It stays stopped in postmigrate.
        this.machine.enterPostmigrate();
      } else {
        try {
          await this.machine.resumeAfterMigration();
        } catch {
          /* the VM stays stopped; the failure below is what the user sees */
        }
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

/** How long a failed postcopy source waits for the return path's last words. */
const RP_SETTLE_MS = 1000;

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

/** A page request from the destination, in pages of one block. */
interface PageRequest {
  block: number;
  page: number;
  pages: number;
}

/**
 * Reader of the destination's messages (stream-format.md §12). PONGs are
 * noted, SHUT ends it, page requests (postcopy only: `blocks` given) are
 * checked and queued; anything malformed fails the migration.
 */
class ReturnPath {
  private readonly reader: StreamReader;
  private shut: number | null = null;
  /** PONG 3 had not arrived when a failing SHUT came. */
  private shutBeforeRun = false;
  private readonly requests: PageRequest[] = [];
  private reqHead = 0;
  /** Block of the last REQ_PAGES_ID (REQ_PAGES refers to it). */
  private reqBlock = -1;
  private readonly byName = new Map<string, number>();
  private shutWaiters: ((v: number) => void)[] = [];
  private failWaiters: ((e: Error) => void)[] = [];
  private error: Error | null = null;
  private stopped = false;
  readonly pongs: number[] = [];

  constructor(
    ch: Channel,
    private readonly blocks: readonly RamBlock[] | null,
    private readonly onError: (e: Error) => void,
    private readonly onRequest: () => void,
  ) {
    blocks?.forEach((b, i) => this.byName.set(b.name, i));
    this.reader = new StreamReader(ch.input);
    this.ended = this.loop();
  }

  private readonly ended: Promise<void>;

  get shutValue(): number | null {
    return this.shut;
  }

  /** Resolves when the reader has stopped (SHUT, error, end) or after `ms`. */
  async settle(ms: number): Promise<void> {
    let t: NodeJS.Timeout | undefined;
    await Promise.race([this.ended, new Promise<void>((r) => (t = setTimeout(r, ms)))]);
    clearTimeout(t);
  }

  ponged(v: number): boolean {
    return this.pongs.includes(v);
  }

  /**
   * The destination said it failed (SHUT non-zero) before it answered PING 3,
   * which it does just before POSTCOPY_RUN: its guest never ran.
   */
  failedBeforeRun(): boolean {
    return this.shutBeforeRun;
  }

  nextRequest(): PageRequest | null {
    if (this.reqHead >= this.requests.length) {
      if (this.reqHead > 0) {
        this.requests.length = 0;
        this.reqHead = 0;
      }
      return null;
    }
    return this.requests[this.reqHead++]!;
  }

  /** Check a page request (stream-format.md §12) and queue it. */
  private request(block: number, start: number, length: number): void {
    const b = this.blocks![block]!;
    if (start % TARGET_PAGE_SIZE !== 0 || length % TARGET_PAGE_SIZE !== 0) {
      throw new MigrationError(ERR.rpMisaligned(start, length));
    }
    if (start + length > b.size) throw new MigrationError(ERR.rpOverrun(start, length, b.size));
    this.onRequest();
    if (length > 0) this.requests.push({ block, page: start / TARGET_PAGE_SIZE, pages: length / TARGET_PAGE_SIZE });
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
          if (m.value !== 0) {
            this.shutBeforeRun = !this.pongs.includes(3);
            // stop sending at once: the destination gave up
            this.onError(new MigrationError(`Destination reported failure (SHUT ${m.value})`));
          }
          return;
        } else if (this.blocks === null) {
          throw new MigrationError(`Unexpected return path message ${m.type} in precopy`);
        } else if (m.type === 'REQ_PAGES_ID') {
          const b = this.byName.get(m.blockName);
          if (b === undefined) throw new MigrationError(ERR.rpNoBlock(m.blockName));
          this.reqBlock = b;
          this.request(b, m.start, m.length);
        } else {
          if (this.reqBlock < 0) throw new MigrationError(ERR.rpNoPreviousBlock());
          this.request(this.reqBlock, m.start, m.length);
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
