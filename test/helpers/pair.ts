/**
 * Two machines in this process, a MigrationSource on one and a
 * MigrationDestination on the other, joined by a unix socket in a temp dir
 * (the real transport, no child processes): for fast fault, cancel and
 * section tests. Everything a test creates is torn down by close().
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Machine, type MachineConfig } from '../../src/machine/index.js';
import type { ChannelWrapper } from '../../src/migration/channel/index.js';
import type { DestinationTracePoint } from '../../src/migration/core/incoming.js';
import type { SourceTracePoint } from '../../src/migration/core/outgoing.js';
import {
  MigrationDestination,
  MigrationOptions,
  MigrationSource,
  RAM_SECTION,
  SectionRegistry,
  machinePort,
  type SectionType,
  type TlsDeps,
} from '../../src/migration/index.js';
import type { MigrationCapability, MigrationStatus, MigrateSetParameters } from '../../src/generated/qapi-types.js';

export interface PairSide {
  machine: Machine;
  options: MigrationOptions;
  statuses: MigrationStatus[];
  traces: string[];
  log: string[];
}

export interface PairOptions {
  /** Guest of both sides (the destination gets `incoming: true`). */
  guest?: Partial<MachineConfig>;
  /** Capabilities on both sides. */
  caps?: MigrationCapability[];
  /** Source parameters (default max-bandwidth 0). */
  params?: MigrateSetParameters;
  /** Extra live section types of the source, registered after RAM. */
  sections?: SectionType[];
  /** Extra live section types of the destination (default: `sections`). */
  destinationSections?: SectionType[];
  /** The destination stays paused after the load (-S). */
  paused?: boolean;
  wrapSource?: ChannelWrapper;
  wrapDestination?: ChannelWrapper;
  /** Destination parameters (tls-creds, say). */
  destinationParams?: MigrateSetParameters;
  /** The credentials both sides can name in tls-creds. */
  tls?: TlsDeps;
  /** Called at each source trace point (after it is recorded). */
  onSourceTrace?: (p: SourceTracePoint, pair: Pair) => void;
  onDestinationTrace?: (p: DestinationTracePoint, pair: Pair) => void;
  /** The URI to migrate to (default a unix socket the destination listens on). */
  uri?: (dir: string) => string;
  /** Do not start a destination (the URI goes elsewhere, e.g. exec:). */
  noDestination?: boolean;
}

export class Pair {
  readonly dir = mkdtempSync(join(tmpdir(), 'ferry-pair-'));
  src!: PairSide & { source: MigrationSource };
  dst: (PairSide & { destination: MigrationDestination }) | null = null;
  uri = '';
  private constructor(readonly opts: PairOptions) {}

  static async create(opts: PairOptions = {}): Promise<Pair> {
    const p = new Pair(opts);
    try {
      await p.init();
    } catch (e) {
      await p.close();
      throw e;
    }
    return p;
  }

  private registry(side: 'source' | 'destination'): SectionRegistry {
    const extra = side === 'source' ? this.opts.sections : this.opts.destinationSections ?? this.opts.sections;
    return new SectionRegistry([RAM_SECTION, ...(extra ?? [])]);
  }

  private options(): MigrationOptions {
    const o = new MigrationOptions();
    if (this.opts.caps?.length) o.setCapabilities(this.opts.caps.map((capability) => ({ capability, state: true })));
    return o;
  }

  /** A machine with its options and the deps both engines take: recorded statuses, traces and log lines. */
  private async side<T extends string>(cfg: Partial<MachineConfig>, which: 'source' | 'destination', onTrace?: (p: T, pair: Pair) => void) {
    const machine = await Machine.create({ ramSize: 8 << 20, smp: 1, ...this.opts.guest, ...cfg });
    const side: PairSide = { machine, options: this.options(), statuses: [], traces: [], log: [] };
    const deps = {
      lookupFd: () => undefined,
      sections: this.registry(which),
      wrapChannel: which === 'source' ? this.opts.wrapSource : this.opts.wrapDestination,
      tls: this.opts.tls,
      trace: (pt: T) => {
        side.traces.push(pt);
        onTrace?.(pt, this);
      },
      log: (m: string) => void side.log.push(m),
    };
    return { side, deps };
  }

  private async init(): Promise<void> {
    const { side, deps } = await this.side<SourceTracePoint>({}, 'source', this.opts.onSourceTrace);
    side.options.setParameters({ 'max-bandwidth': 0, ...this.opts.params });
    const source = new MigrationSource(machinePort(side.machine, { autostart: true }), side.options, deps);
    source.on('status', (s) => side.statuses.push(s));
    this.src = { ...side, source };
    if (this.opts.noDestination) {
      this.uri = this.opts.uri!(this.dir);
      return;
    }
    await this.newDestination();
  }

  /** A fresh destination machine listening on a new URI (the old one is destroyed). */
  async newDestination(): Promise<void> {
    if (this.dst) await this.dst.machine.destroy();
    const { side, deps } = await this.side<DestinationTracePoint>({ incoming: true, fill: undefined }, 'destination', this.opts.onDestinationTrace);
    if (this.opts.destinationParams) side.options.setParameters(this.opts.destinationParams);
    const destination = new MigrationDestination(machinePort(side.machine, { autostart: !this.opts.paused }), side.options, deps);
    destination.on('status', (s) => side.statuses.push(s));
    this.dst = { ...side, destination };
    const n = this.uriCount++;
    this.uri = this.opts.uri ? this.opts.uri(this.dir) : `unix:${join(this.dir, `mig${n}.sock`)}`;
    await destination.start(this.uri);
  }

  private uriCount = 0;

  /** `migrate`, and wait until both sides ended. */
  async migrate(): Promise<void> {
    this.src.source.start(this.uri);
    await this.src.source.whenIdle();
    if (this.dst) await this.dst.destination.whenDone();
  }

  async close(): Promise<void> {
    // cancels a migration in flight, and ends a COLO primary where it is
    this.src?.source.shutdown();
    await this.src?.source.whenIdle();
    this.dst?.destination.close();
    await this.dst?.destination.whenDone();
    await this.src?.machine.destroy();
    await this.dst?.machine.destroy();
    rmSync(this.dir, { recursive: true, force: true });
  }
}
