/**
 * The contract of a migratable section, Ferry's SaveVMHandlers.
 *
 * A migration stream is a sequence of sections (docs/spec/stream-format.md
 * §5). A *live* section (RAM; disks next) goes out in pieces while the guest
 * runs: a START section at setup, PART sections while iterating, an END
 * section when the guest is stopped. A *one-shot* section (a device's state)
 * goes out once, as a FULL section, while the guest is stopped. Each kind of
 * section is registered once as a SectionType (registry.ts); for every
 * migration the source asks it for a LiveSection and the destination for a
 * SectionLoader, so no state survives from one migration to the next and
 * nothing is global.
 *
 * Threads and states. Every hook runs on the main thread, between two turns
 * of the event loop, so no two hooks of one migration run at once and QMP
 * commands run between them. A hook may await (a worker pool, a flush); the
 * session does not call another hook of the same migration until it
 * resolves. The session writes the section headers and footers; a hook
 * writes only its payload, which must end with the section's own end marker
 * (RAM: an EOS record) so that the destination's loader knows where it ends.
 *
 * Source, in call order:
 *
 *   hook               MigrationStatus        guest (run state)
 *   setup              setup                  running (or whatever it was)
 *   pending            active                 running
 *   iterate            active                 running
 *   pending(exact)     active                 running; also after the stop
 *   completePrecopy    active                 stopped (finish-migrate)
 *   postcopy.switch    postcopy-active        stopped (finish-migrate)
 *   postcopy.iterate   postcopy-active        stopped here, running there
 *   postcopy.complete  postcopy-active        stopped here, running there
 *   postcopy.done      postcopy-active        only after the destination's SHUT 0
 *   cleanup            any, exactly once      any
 *
 * Destination: a SectionLoader's load() runs for each of its sections, in
 * MigrationStatus active (guest stopped in inmigrate) or postcopy-active
 * (guest running, demand paging on); cleanup() runs exactly once when the
 * incoming migration ends, whatever the outcome.
 */
import type { MigrationInfo } from '../../generated/qapi-types.js';
import type { MachinePort } from '../core/port.js';
import type { MigrationOptions } from '../core/options.js';
import type { SourceTracePoint } from '../core/outgoing.js';
import type { CompressPool, DecompressPool } from '../codec/compress-pool.js';
import type { MultifdReceiver } from '../multifd/receiver.js';
import type { MultifdSender } from '../multifd/sender.js';
import type { ReturnPathReader } from '../return-path/reader.js';
import type { ReturnPathWriter } from '../return-path/writer.js';
import type { StreamReader } from '../stream/reader.js';
import type { StreamWriter } from '../stream/writer.js';

/** What a live section still has to send, in bytes. */
export interface Pending {
  /** Must go before the destination runs (precopy or the stop-and-copy). */
  precopy: number;
  /** May also go after the switch to postcopy. */
  postcopy: number;
}

/** Bounds of one iterate() call. */
export interface IterateBudget {
  /** Return after about this many milliseconds of work. */
  maxMillis: number;
  /** Return once about this many bytes are written (default: no limit but the writer's). */
  maxBytes?: number;
}

/**
 * What a live section can use on the source for one migration. The session
 * owns all of it and disposes it; a section only borrows.
 */
export interface OutgoingSectionContext {
  readonly machine: MachinePort;
  readonly options: MigrationOptions;
  now(): number;
  /** The return path, when this migration has one. */
  readonly returnPath: ReturnPathReader | null;
  /** The session's compression workers (`compress`), created on first use. */
  compressPool(): CompressPool;
  /** A dirty-log sync ended a pass (QEMU's MIGRATION_PASS, numbered by dirty-sync-count). */
  onPass(count: number): void;
  /** The stream's throughput over the last window (query-migrate `mbps`). */
  throughputMbps(): number;
  /** The destination is a QEMU (`x-qemu-compat`): send nothing it does not know. */
  readonly qemuCompatible: boolean;
  /** Report a trace point of the session (core/outgoing.ts SourceTracePoint). */
  trace?(point: SourceTracePoint): void;
  /** The multifd channels, when the migration has the `multifd` capability. */
  readonly multifd?: MultifdSender | null;
}

/** The source side of a live section for one migration (see the table above). */
export interface LiveSection {
  readonly idstr: string;
  readonly instanceId: number;
  readonly version: number;
  /** The START payload. */
  setup(w: StreamWriter): void | Promise<void>;
  /**
   * What is left. `exact` false: a cheap estimate, called before every
   * slice. `exact` true: the section may look harder (RAM syncs its dirty
   * log); called when the estimate says the rest may fit in the downtime
   * and when the estimate is 0. Called before every slice, so it should not
   * allocate: the returned object may be reused, and is read before the
   * next call.
   */
  pending(exact: boolean): Pending;
  /** One PART payload within the budget. */
  iterate(w: StreamWriter, budget: IterateBudget): void | Promise<void>;
  /** The END payload: everything that is left. The guest is stopped. */
  completePrecopy(w: StreamWriter): Promise<void>;
  /** Present on sections that can finish after the destination runs. */
  readonly postcopy?: PostcopySection;
  /** Adds this section's statistics to query-migrate (`completed`: the final figures). */
  addInfo?(info: MigrationInfo, completed: boolean): void;
  /** Exactly once, whatever the outcome. */
  cleanup(): void;
}

/** The postcopy hooks of a live section (docs/spec/stream-format.md §11). */
export interface PostcopySection {
  /**
   * At the switch, guest stopped: write the commands that tell the
   * destination which of its data not to trust (RAM: POSTCOPY_RAM_DISCARD),
   * into the main stream before the package.
   */
  switchOver(w: StreamWriter): void;
  /** One PART payload after the switch (requested data first). */
  iterate(w: StreamWriter, budget: IterateBudget): void;
  /** The END payload after the switch. */
  complete(w: StreamWriter): void;
  /** The destination said SHUT 0: everything arrived. */
  done(): void;
}

/** What a loader can use on the destination for one incoming migration. */
export interface IncomingSectionContext {
  readonly machine: MachinePort;
  readonly options: MigrationOptions;
  /** The session's decompression workers (`compress`), or null. */
  readonly decompressPool: DecompressPool | null;
  /** The return path writer (open once the source asked for it). */
  readonly returnPath: ReturnPathWriter;
  /** The multifd channels, when the migration has the `multifd` capability. */
  readonly multifd?: MultifdReceiver | null;
}

export type SectionKind = 'start' | 'part' | 'end' | 'full';

/** The destination side of a section for one incoming migration. */
export interface SectionLoader {
  /**
   * One section's payload. The reader stands after the section header; the
   * loader reads up to (not including) the footer. `version` is the one the
   * START or FULL header carried (already checked against the SectionType).
   */
  load(r: StreamReader, kind: SectionKind, version: number): void | Promise<void>;
  /** POSTCOPY_LISTEN: the guest may run before the rest of this section's data has come. */
  postcopyListen?(): void;
  /** The stream loaded up to EOF: finish what still runs (writes behind the stream) before the guest does. */
  loadComplete?(): Promise<void>;
  /** Exactly once, when the incoming migration ends. */
  cleanup?(): void;
}

/** One kind of section, registered once (registry.ts). */
export interface SectionType {
  readonly idstr: string;
  readonly instanceId: number;
  /** Version sent, and the highest accepted. */
  readonly version: number;
  /** Lowest version accepted. */
  readonly minVersion: number;
  /** Source: this migration's live section, or null when it takes no part (its capability is off). */
  save(ctx: OutgoingSectionContext): LiveSection | null;
  /** Destination: this migration's loader. */
  load(ctx: IncomingSectionContext): SectionLoader;
}
