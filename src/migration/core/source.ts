/**
 * The outgoing side as QMP sees it: `migrate`, `migrate_cancel`,
 * `migrate-start-postcopy`, `query-migrate`. It keeps only its status
 * (status.ts, SOURCE_TRANSITIONS) and its current session (outgoing.ts),
 * which does the work; the last session stays current after it ended, so
 * that query-migrate shows its final figures.
 */
import { SwitchoverBudget } from './switchover.js';
import { EventEmitter } from 'node:events';
import type { MigrationInfo, MigrationStatus } from '../../generated/qapi-types.js';
import { parseMigrationUri, resolveFdParam, type ChannelWrapper } from '../channel/index.js';
import type { TlsDeps } from '../channel/tls.js';
import { ColoService, checkColoMigrate } from '../colo/index.js';
import { MigrationError, errorMessage } from '../errors.js';
import { MultifdWorkers } from '../multifd/workers.js';
import type { RamSaveSection } from '../ram/section.js';
import { RAM_SECTION } from '../ram/section.js';
import { SectionRegistry } from '../sections/registry.js';
import type { MigrationOptions } from './options.js';
import { OutgoingSession, type SourceTracePoint } from './outgoing.js';
import type { MachinePort } from './port.js';
import { SOURCE_TRANSITIONS, StatusMachine } from './status.js';

export interface SourceDeps {
  lookupFd(name: string): number | undefined;
  /**
   * Send only the device sections QEMU itself knows (`timer`, `globalstate`),
   * so that a QEMU 7.2 `-M none` guest can be the destination. Workload and
   * serial state then stay behind.
   */
  qemuCompatible?: boolean;
  /** Where the credentials that tls-creds names are found (channel/tls.ts). */
  tls?: TlsDeps;
  /** QEMU's `-global migration.send-configuration`: false leaves the configuration record out (default true). */
  sendConfiguration?: boolean;
  /** The live sections to migrate (default: RAM only). */
  sections?: SectionRegistry;
  /** Goes around the channel of every migration (channel/wrap.ts). */
  wrapChannel?: ChannelWrapper;
  /** Clock in ms (default performance.now). */
  now?: () => number;
  /** Named points of each migration as they are reached (tests). */
  trace?: (point: SourceTracePoint) => void;
  /** Diagnostics (an internal error's stack). */
  log?: (msg: string) => void;
  /** The VM's COLO (default: one of its own). */
  colo?: ColoService;
  /** The VM's multifd channel workers (default: a pool of its own). */
  multifdWorkers?: MultifdWorkers;
}

export interface MigrateFlags {
  blk?: boolean;
  inc?: boolean;
}

/** setup, active, postcopy-active (QEMU's migration_is_setup_or_active). */
const ACTIVE: readonly MigrationStatus[] = ['setup', 'active', 'postcopy-active'];
/** A new `migrate` is refused in these. */
const BUSY: readonly MigrationStatus[] = ['setup', 'active', 'postcopy-active', 'cancelling', 'colo'];

export declare interface MigrationSource {
  on(event: 'status', listener: (status: MigrationStatus) => void): this;
  on(event: 'pass', listener: (pass: number) => void): this;
}

export class MigrationSource extends EventEmitter {
  private readonly status_ = new StatusMachine('source', SOURCE_TRANSITIONS, (s) => this.emit('status', s));
  private session: OutgoingSession | null = null;
  /** Resolves when the current run() has finished all cleanup (tests, quit). */
  private running: Promise<void> = Promise.resolve();
  private readonly sections: SectionRegistry;
  private readonly now: () => number;

  /** The measured cost of a switchover on this VM, learned over its migrations. */
  readonly switchover = new SwitchoverBudget();
  readonly colo: ColoService;
  readonly multifdWorkers: MultifdWorkers;

  constructor(
    private readonly machine: MachinePort,
    private readonly options: MigrationOptions,
    private readonly deps: SourceDeps,
  ) {
    super();
    this.now = deps.now ?? (() => performance.now());
    this.sections = deps.sections ?? new SectionRegistry([RAM_SECTION]);
    this.colo = deps.colo ?? new ColoService();
    this.multifdWorkers = deps.multifdWorkers ?? new MultifdWorkers();
  }

  get status(): MigrationStatus {
    return this.status_.status;
  }

  /** The current (or last) migration's session. */
  get current(): OutgoingSession | null {
    return this.session;
  }

  /** True in setup, active and postcopy-active (migration_is_setup_or_active). */
  isActive(): boolean {
    return this.status_.isOneOf(ACTIVE);
  }

  /** Resolves once the migration in flight has ended and cleaned up. */
  whenIdle(): Promise<void> {
    return this.running;
  }

  /**
   * `migrate`: synchronous checks (each throws MigrationError with QEMU's
   * text), then the migration runs in the background.
   */
  start(uri: string, flags: MigrateFlags = {}): void {
    if (this.status_.isOneOf(BUSY)) throw new MigrationError("There's a migration process in progress");
    if (this.machine.runState === 'inmigrate') throw new MigrationError('Guest is waiting for an incoming migration');
    checkColoMigrate(this.options, flags, this.colo);
    // blk / inc: the `block` capability (and block-incremental) for this
    // migration only, switched off again when it ends (QEMU 7.2's migrate_prepare)
    const blockForThisMigration = flags.blk === true || flags.inc === true;
    if (blockForThisMigration) {
      if (this.options.capability('block') || this.options.get('block-incremental')) {
        throw new MigrationError('Command options are incompatible with current migration capabilities');
      }
      this.options.setCapabilities([{ capability: 'block', state: true }]);
      if (flags.inc) this.options.setParameters({ 'block-incremental': true });
    }
    const dropBlockOptions = (): void => {
      if (!blockForThisMigration) return;
      this.options.setCapabilities([{ capability: 'block', state: false }]);
      this.options.setParameters({ 'block-incremental': false });
    };
    // statistics zeroed, error cleared: a new session; none|completed|... -> setup (event)
    const session = new OutgoingSession({
      machine: this.machine,
      options: this.options,
      sections: this.sections,
      status: this.status_,
      now: this.now,
      lookupFd: this.deps.lookupFd,
      qemuCompatible: this.deps.qemuCompatible ?? false,
      sendConfiguration: this.deps.sendConfiguration ?? true,
      wrapChannel: this.deps.wrapChannel,
      tls: this.deps.tls,
      trace: this.deps.trace,
      onPass: (n) => this.emit('pass', n),
      log: this.deps.log,
      switchover: this.switchover,
      colo: this.colo,
      multifdWorkers: this.multifdWorkers,
    });
    this.session = session;
    this.status_.to('setup');

    let parsed;
    try {
      parsed = parseMigrationUri(uri, 'outgoing');
      // QEMU looks the descriptor up before it returns from `migrate`
      if (parsed.kind === 'fd') {
        try {
          resolveFdParam(parsed.name, this.deps.lookupFd);
        } catch (e) {
          session.error = new MigrationError(errorMessage(e), { cause: e, phase: 'start' });
          throw e;
        }
      }
    } catch (e) {
      // a bad URI fails the migration without error-desc (as QEMU does)
      session.dispose();
      dropBlockOptions();
      this.status_.to('failed');
      throw new MigrationError(errorMessage(e), { cause: e, phase: 'start' });
    }
    this.running = session.run(parsed).finally(dropBlockOptions);
  }

  /** The VM quits (or a test ends): a migration in flight is cancelled, a COLO primary stops where it is. */
  shutdown(): void {
    this.cancel();
    this.session?.colo?.shutdown();
  }

  /**
   * `migrate_cancel`: always succeeds; acts in setup, active and
   * postcopy-active. In colo the status stays (QEMU 7.2's
   * migration_is_running leaves COLO out), but QEMU 7.2 shuts the return
   * path down first, whatever the status, and in COLO that is the link
   * itself: the session breaks and waits for a failover.
   */
  cancel(): void {
    if (this.status_.is('colo')) {
      this.session?.colo?.shutdownLink();
      return;
    }
    if (!this.isActive()) return;
    // after the last byte the destination's verdict decides who owns the guest
    if (this.session?.deferCancel(() => this.cancel())) return;
    this.status_.to('cancelling');
    this.session?.cancel();
  }

  /**
   * `migrate-start-postcopy`: switch at the next decision point
   * (docs/spec/qmp.md B.9, E.2). The caller has checked the capability; a
   * request when no migration is running is remembered and has no effect,
   * as in QEMU.
   */
  requestPostcopy(): void {
    if (this.session) this.session.postcopyRequested = true;
  }

  /** `migrate_set_speed` / max-bandwidth changed: applies to the running stream at once. */
  applyMaxBandwidth(): void {
    if (this.status_.is('active')) this.session?.writer?.setMaxBandwidth(this.options.get('max-bandwidth'));
  }

  /** migrate-set-cache-size: the running migration's cache takes the new size (emptied). */
  resizeXbzrleCache(size: number): void {
    if (this.isActive()) this.session?.section<RamSaveSection>('ram')?.resizeXbzrleCache(size);
  }

  info(): MigrationInfo {
    if (this.session === null) return {};
    return this.session.info(this.status_.status);
  }
}
