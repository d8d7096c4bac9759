/**
 * The incoming side as QMP sees it (`-incoming`, `migrate-incoming`,
 * query-migrate on the destination). It keeps only its status (status.ts,
 * DESTINATION_TRANSITIONS) and its session (incoming.ts), which does the
 * work. One incoming migration per process, as in QEMU. Unlike QEMU, the
 * process does not exit when the load fails: it stays up so that
 * management can read `error-desc` over QMP.
 */
import { EventEmitter } from 'node:events';
import type { MigrationInfo, MigrationStatus } from '../../generated/qapi-types.js';
import { listenIncoming, parseMigrationUri, type ChannelWrapper, type IncomingListener } from '../channel/index.js';
import type { TlsDeps } from '../channel/tls.js';
import { ColoService } from '../colo/index.js';
import { MigrationError, errorMessage } from '../errors.js';
import { MultifdWorkers } from '../multifd/workers.js';
import { RAM_SECTION } from '../ram/section.js';
import { SectionRegistry } from '../sections/registry.js';
import { IncomingSession, type DestinationTracePoint } from './incoming.js';
import type { MigrationOptions } from './options.js';
import type { MachinePort } from './port.js';
import { DESTINATION_TRANSITIONS, StatusMachine } from './status.js';

export interface DestinationDeps {
  lookupFd(name: string): number | undefined;
  now?: () => number;
  /** Called with notices such as "Expected vmdescription section, but got 0". */
  log?: (msg: string) => void;
  /** The live sections this VM accepts (default: RAM only). */
  sections?: SectionRegistry;
  /** Goes around the incoming channel (channel/wrap.ts). */
  wrapChannel?: ChannelWrapper;
  /** Where the credentials that tls-creds names are found (channel/tls.ts). */
  tls?: TlsDeps;
  trace?: (point: DestinationTracePoint) => void;
  /** QEMU's `-global migration.send-configuration`: false expects no configuration record (default true). */
  configuration?: boolean;
  /** The VM's COLO (default: one of its own). */
  colo?: ColoService;
  /** The VM's multifd channel workers (default: a pool of its own). */
  multifdWorkers?: MultifdWorkers;
}

export declare interface MigrationDestination {
  on(event: 'status', listener: (status: MigrationStatus) => void): this;
}

export class MigrationDestination extends EventEmitter {
  private readonly status_ = new StatusMachine('destination', DESTINATION_TRANSITIONS, (s) => this.emit('status', s));
  private session: IncomingSession | null = null;
  private listener: IncomingListener | null = null;
  private starting = false;
  private done: Promise<void> = Promise.resolve();
  private readonly sections: SectionRegistry;
  readonly colo: ColoService;
  readonly multifdWorkers: MultifdWorkers;

  constructor(
    private readonly machine: MachinePort,
    private readonly options: MigrationOptions,
    private readonly deps: DestinationDeps,
  ) {
    super();
    this.sections = deps.sections ?? new SectionRegistry([RAM_SECTION]);
    this.colo = deps.colo ?? new ColoService();
    this.multifdWorkers = deps.multifdWorkers ?? new MultifdWorkers();
  }

  get status(): MigrationStatus {
    return this.status_.status;
  }

  /** True once start() has succeeded or is under way (migrate-incoming works only once). */
  get started(): boolean {
    return this.starting || this.session !== null;
  }

  whenDone(): Promise<void> {
    return this.done;
  }

  /** The session of the incoming migration, once it listens. */
  get current(): IncomingSession | null {
    return this.session;
  }

  /**
   * Start listening (or reading) on `uri`. Rejects with a MigrationError for
   * a bad URI or a listen error; after that, progress shows in status.
   */
  async start(uri: string): Promise<void> {
    if (this.started) throw new MigrationError('The incoming migration has already been started');
    let parsed;
    try {
      parsed = parseMigrationUri(uri, 'incoming');
    } catch (e) {
      throw new MigrationError(errorMessage(e), { cause: e, phase: 'listen' });
    }
    this.starting = true;
    let listener: IncomingListener;
    try {
      listener = await listenIncoming(parsed, {
        lookupFd: this.deps.lookupFd,
        // multifd: the channels follow the main connection (the capability as it is when that comes)
        extraConnections: () => (this.options.capability('multifd') ? this.options.get('multifd-channels') : 0),
      });
    } catch (e) {
      throw new MigrationError(errorMessage(e), { cause: e, phase: 'listen' });
    } finally {
      this.starting = false;
    }
    this.listener = listener;
    const log = this.deps.log ?? (() => undefined);
    this.session = new IncomingSession(
      {
        machine: this.machine,
        options: this.options,
        sections: this.sections,
        status: this.status_,
        now: this.deps.now ?? (() => performance.now()),
        wrapChannel: this.deps.wrapChannel,
        tls: this.deps.tls,
        trace: this.deps.trace,
        configuration: this.deps.configuration ?? true,
        log,
        colo: this.colo,
        multifdWorkers: this.multifdWorkers,
      },
      listener,
    );
    // the incoming side announces setup unconditionally (QEMU 2.10)
    this.status_.to('setup');
    this.done = this.session.run();
  }

  /** Where we listen (tcp port 0 gets a real port), if a listener. */
  address(): ReturnType<IncomingListener['address']> | undefined {
    return this.listener?.address();
  }

  /** Abort a pending incoming migration (quit, tests). */
  close(): void {
    this.session?.close();
  }

  info(): MigrationInfo {
    if (this.session === null || this.status_.is('none')) return {};
    return this.session.info(this.status_.status);
  }
}
