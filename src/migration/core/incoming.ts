/**
 * One incoming migration (docs/spec/qmp.md B.7, C.2;
 * docs/spec/stream-format.md §5): accept the connection, load the stream
 * through the one loop (load-loop.ts), and only when everything has loaded
 * enter the run state the stream asks for.
 *
 * The session owns the listener, the channel, the return path writer, the
 * section loaders, the decompression workers and the postcopy state, and is
 * disposed exactly once. A failed load leaves the guest stopped in
 * `inmigrate` (or, after POSTCOPY_LISTEN, in internal-error): it never runs
 * a half-loaded guest.
 */
import type { MigrationInfo } from '../../generated/qapi-types.js';
import { acceptIncoming, closeAfterShut, type Channel, type ChannelWrapper, type IncomingListener } from '../channel/index.js';
import { chainWrappers, migrationTls, type TlsDeps } from '../channel/tls.js';
import { DecompressPool } from '../codec/compress-pool.js';
import { ColoRequest, ColoSecondary, type ColoService } from '../colo/index.js';
import { inPhase, type MigrationFailure, type MigrationPhase } from '../errors.js';
import { MultifdReceiver } from '../multifd/receiver.js';
import type { MultifdWorkers } from '../multifd/workers.js';
import { checkMultifd, NO_UUID } from '../multifd/setup.js';
import { PostcopyIncoming, type PostcopyCommand } from '../postcopy/incoming.js';
import { ReturnPathWriter } from '../return-path/writer.js';
import { MigrationClockDevice, wallClockUs } from '../sections/clock-device.js';
import { deviceLoader, findDevice } from '../sections/device-sections.js';
import type { SectionRegistry } from '../sections/registry.js';
import type { IncomingSectionContext, SectionLoader } from '../sections/section.js';
import { StreamReader } from '../stream/reader.js';
import { MigrationStreamError } from '../wire/errors.js';
import { readVmdesc, type Command } from '../wire/records.js';
import { loadStream, type BoundLoader, type LoadHandlers } from './load-loop.js';
import type { MigrationOptions } from './options.js';
import type { MachinePort } from './port.js';
import type { StatusMachine } from './status.js';

/** How long the destination waits for the vmdesc trailer after EOF. */
const VMDESC_WAIT_MS = 2000;

/** Named points of an incoming migration (tests). */
export type DestinationTracePoint = 'accepted' | 'loaded' | 'running' | 'disposed';

export interface IncomingDeps {
  readonly machine: MachinePort;
  readonly options: MigrationOptions;
  readonly sections: SectionRegistry;
  readonly status: StatusMachine;
  now(): number;
  readonly wrapChannel?: ChannelWrapper;
  /** Where the credentials that tls-creds names are found (channel/tls.ts). */
  readonly tls?: TlsDeps;
  trace?(point: DestinationTracePoint): void;
  /** A configuration record follows the header (QEMU's migration.send-configuration). */
  readonly configuration: boolean;
  log(msg: string): void;
  /** The VM's COLO (a stream that asks for it makes this session a COLO secondary, colo/secondary.ts). */
  readonly colo: ColoService;
  /** The VM's multifd channel workers. */
  readonly multifdWorkers: MultifdWorkers;
}

export class IncomingSession {
  channel: Channel | null = null;
  readonly returnPath = new ReturnPathWriter();
  error: MigrationFailure | undefined;
  phase: MigrationPhase = 'accept';
  private readonly clock = new MigrationClockDevice();
  /** The COLOState / ferry-colo sections, if the stream carries them. */
  private readonly coloRequest = new ColoRequest();
  /** The COLO secondary this session became, if the stream asked for COLO. */
  colo: ColoSecondary | null = null;
  private reader: StreamReader | null = null;
  private postcopy: PostcopyIncoming | null = null;
  /** The multifd channels (`multifd`), once they all came. */
  private multifd: MultifdReceiver | null = null;
  private loaders: Array<{ idstr: string; instanceId: number; bound: BoundLoader }> = [];
  private pool: DecompressPool | null = null;
  private startTime = 0;
  private totalTime = 0;
  /** Source stop -> guest running here, in ms (from the ferry-migration section). */
  private downtime: number | undefined;
  private disposed = false;
  /** Aborts a TLS handshake in flight (close()). */
  private readonly abort = new AbortController();

  constructor(
    private readonly deps: IncomingDeps,
    private readonly listener: IncomingListener,
  ) {}

  /** The whole incoming migration; never rejects. */
  async run(): Promise<void> {
    const { status } = this.deps;
    try {
      let ch: Channel;
      try {
        ch = await acceptIncoming(this.listener, (inner, side) => {
          // tls-creds as it is when the source connects (it may be set after -incoming)
          const tls = migrationTls(this.deps.options.get('tls-creds'), this.deps.tls, 'incoming', { signal: this.abort.signal });
          const wrap = chainWrappers(this.deps.wrapChannel, tls);
          return wrap === undefined ? inner : wrap(inner, side);
        });
        if (this.deps.options.capability('multifd')) {
          // QEMU starts loading only once every channel is there
          this.channel = ch;
          checkMultifd(this.deps.options, this.listener.acceptExtra !== undefined);
          const sockets = await this.listener.acceptExtra!();
          this.multifd = new MultifdReceiver(sockets, this.deps.machine.ram, NO_UUID, this.deps.multifdWorkers, () => this.channel?.close());
          await this.multifd.ready();
        }
      } finally {
        this.listener.close();
      }
      this.channel = ch;
      this.returnPath.attach(ch);
      this.deps.trace?.('accepted');
      this.startTime = this.deps.now();
      status.to('active');
      this.phase = 'load';
      try {
        await this.load(ch);
      } catch (e) {
        this.returnPath.shut(1);
        // the guest may have run on pages from here: it must not go on with holes
        if (this.postcopy?.listening) await this.deps.machine.abandonIncoming().catch(() => undefined);
        // a failed multifd channel closed the main one: its error is the cause
        this.fail(this.multifd?.error ?? e);
        if (this.returnPath.isOpen) closeAfterShut(ch);
        else ch.close();
        return;
      }
      this.totalTime = Math.round(this.deps.now() - this.startTime);
      this.deps.trace?.('loaded');
      if (this.coloRequest.requested && !this.postcopy?.listening) {
        await this.runColo(ch);
        return;
      }
      if (!this.postcopy?.listening) {
        this.phase = 'start-guest';
        await this.startGuest();
      }
      this.returnPath.shut(0);
      status.to('completed');
      // With or without a return path, read what the source still sends (a
      // TLS close_notify) until it closes: closing with those bytes unread
      // resets the connection, and a source without a return path that reads
      // that reset before its channel closes fails a migration we completed.
      closeAfterShut(ch);
    } catch (e) {
      this.fail(e);
      this.channel?.close();
    } finally {
      this.dispose();
    }
  }

  /** Exactly once: loaders, workers and the listener are released (the channel closes by its own policy). */
  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    for (const { bound } of this.loaders) bound.loader.cleanup?.();
    void this.pool?.close();
    this.pool = null;
    void this.multifd?.close();
    this.listener.close();
    this.deps.trace?.('disposed');
  }

  /** The stream asked for COLO: this session goes on as the secondary until a failover. */
  private async runColo(ch: Channel): Promise<void> {
    this.phase = 'colo';
    // with a return path the source waits for the load's verdict before COLO's messages
    if (this.returnPath.isOpen) this.returnPath.shut(0);
    this.colo = new ColoSecondary(this.deps.colo, this.deps.now, (m) => this.deps.log(m));
    await this.colo.run({ machine: this.deps.machine, status: this.deps.status, channel: ch, input: this.reader!, request: this.coloRequest });
    ch.close();
  }

  /** Abort (quit, tests): a pending accept fails, an open channel closes. */
  close(): void {
    this.colo?.shutdown();
    this.abort.abort();
    void this.multifd?.close();
    this.listener.close();
    this.channel?.close();
  }

  private fail(e: unknown): void {
    const err = inPhase(e, this.phase);
    this.error = err;
    this.deps.log(this.errorDesc());
    if (err.kind === 'internal') {
      const cause = (err as { cause?: unknown }).cause;
      this.deps.log(`the load failed on an internal error: ${cause instanceof Error ? cause.stack : String(cause)}`);
    }
    this.deps.status.to('failed');
  }

  /** A failure before any byte of the stream (the TLS handshake) is not a load failure. */
  private errorDesc(): string {
    const message = this.error?.message ?? '';
    return this.error?.phase === 'accept' ? message : `load of migration failed: ${message}`;
  }

  /** Enter the run state the stream asked for; note the real downtime. */
  private async startGuest(): Promise<void> {
    await this.deps.machine.finishIncoming();
    this.deps.trace?.('running');
    const resumedAtUs = wallClockUs();
    if (this.clock.stopWallUs > 0) {
      this.downtime = Math.max(0, Math.round((resumedAtUs - this.clock.stopWallUs) / 1000));
    }
  }

  private async load(ch: Channel): Promise<void> {
    const { machine, options, sections } = this.deps;
    // with `compress`, COMPRESS_PAGE records are inflated on decompress-threads workers
    if (options.capability('compress')) this.pool = new DecompressPool({ threads: options.get('decompress-threads') });
    const reader = new StreamReader(ch.input);
    this.reader = reader;
    const ctx: IncomingSectionContext = { machine, options, decompressPool: this.pool, returnPath: this.returnPath, multifd: this.multifd };
    this.loaders = sections.types.map((t) => ({
      idstr: t.idstr,
      instanceId: t.instanceId,
      bound: { loader: t.load(ctx), version: t.version, minVersion: t.minVersion },
    }));
    const devices = [...machine.devices, this.clock, ...this.coloRequest.devices];
    const postcopy = new PostcopyIncoming({
      machine,
      options,
      returnPath: this.returnPath,
      reader,
      listen: () => {
        this.phase = 'postcopy-load';
        for (const { bound } of this.loaders) bound.loader.postcopyListen?.();
      },
      enterPostcopy: () => this.deps.status.to('postcopy-active'),
      startGuest: () => this.startGuest(),
      log: (m) => this.deps.log(m),
    });
    this.postcopy = postcopy;

    const handlers: LoadHandlers = {
      section: (kind, idstr, instanceId) => {
        if (kind === 'start') return this.loaders.find((l) => l.idstr === idstr && l.instanceId === instanceId)?.bound;
        const d = findDevice(devices, idstr, instanceId);
        return d && { loader: deviceLoader(d), version: d.version, minVersion: d.minVersion };
      },
      command: (c) => this.command(c, ch, postcopy),
    };
    await loadStream(reader, handlers, { machineType: machine.machineType, configuration: this.deps.configuration });
    for (const { bound } of this.loaders) await bound.loader.loadComplete?.();
    if (postcopy.listening) {
      // postcopy: no vmdesc; every page must be here now
      postcopy.end();
    } else {
      const vm = await withTimeout(readVmdesc(reader), VMDESC_WAIT_MS);
      if (vm?.notice) this.deps.log(vm.notice);
    }
  }

  /** One command record (docs/spec/stream-format.md §10). */
  private command(c: Command, ch: Channel, postcopy: PostcopyIncoming): void | 'run' | Promise<void | 'run'> {
    switch (c.cmd) {
      case 'OPEN_RETURN_PATH':
        if (!ch.bidirectional) throw new MigrationStreamError('Unable to open the return path');
        this.returnPath.open();
        return;
      case 'PING':
        if (!this.returnPath.isOpen) throw new MigrationStreamError('Received PING but no return path');
        this.returnPath.pong(c.value);
        return;
      case 'PACKAGED':
        return; // the loop loads the blob
      default:
        return postcopy.command(c as PostcopyCommand);
    }
  }

  /** The loaders of this migration (tests look at their counters). */
  loader<T extends SectionLoader>(idstr: string): T | undefined {
    return this.loaders.find((l) => l.idstr === idstr)?.bound.loader as T | undefined;
  }

  info(status: MigrationInfo['status']): MigrationInfo {
    const info: MigrationInfo = { status };
    if (status === 'completed') {
      info['total-time'] = this.totalTime;
      if (this.downtime !== undefined) info.downtime = this.downtime;
    } else if (status === 'failed' && this.error) {
      info['error-desc'] = this.errorDesc();
    }
    return info;
  }
}

async function withTimeout<T>(p: Promise<T>, ms: number): Promise<T | null> {
  let t: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([
      p.catch(() => null),
      new Promise<null>((resolve) => {
        t = setTimeout(() => resolve(null), ms);
      }),
    ]);
  } finally {
    if (t) clearTimeout(t);
  }
}
