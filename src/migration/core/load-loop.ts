/**
 * The one loop that reads a migration stream (docs/spec/stream-format.md
 * §4–§10): header, configuration, then sections and commands until EOF.
 * The destination, `ferry inspect` and the tests all load streams through
 * it; what a section or a command means is the handlers' business.
 *
 *   START / FULL  the handlers name the loader of (idstr, instance) for that
 *                 kind, or none ("Unknown savevm section or instance"); the
 *                 version is checked against the loader's bounds; START
 *                 binds the section id for later PART / END sections.
 *   PART / END    the loader bound to the id ("Unknown savevm section").
 *                 Every section ends with a footer naming its id.
 *   COMMAND       read and checked here; PACKAGED blobs are loaded by this
 *                 same loop from memory, up to their POSTCOPY_RUN or EOF.
 *   EOF           the loop returns; the caller decides about the trailer.
 */
import { StreamReader } from '../stream/reader.js';
import { WIRE } from '../wire/constants.js';
import { ERR, MigrationStreamError } from '../wire/errors.js';
import {
  checkSectionVersion,
  readCommand,
  readConfiguration,
  readFooter,
  readHeader,
  readSectionPartEnd,
  readSectionStartFull,
  type Command,
  type ConfigurationRecord,
} from '../wire/records.js';
import type { SectionKind, SectionLoader } from '../sections/section.js';

const S = WIRE.SECTION;

export interface SectionHeader {
  kind: SectionKind;
  sectionId: number;
  idstr: string;
  instanceId: number;
  /** The version from the START or FULL header. */
  version: number;
  /** Offset of the section's type byte (in the package, for a section inside one). */
  at: number;
}

/** A loader with the versions it accepts. */
export interface BoundLoader {
  loader: SectionLoader;
  version: number;
  minVersion: number;
}

export interface LoadHandlers {
  /** The loader for a START (live) or FULL (one-shot) section, or undefined when there is none. */
  section(kind: 'start' | 'full', idstr: string, instanceId: number): BoundLoader | undefined;
  /**
   * A command (PACKAGED too, before the loop loads its blob). Returning
   * 'run' (POSTCOPY_RUN) ends the package being loaded.
   */
  command(c: Command, at: number, nested: boolean): void | 'run' | Promise<void | 'run'>;
  /** A section was loaded, footer included. */
  sectionLoaded?(h: SectionHeader): void;
  /** The loop enters ('begin') or leaves ('end') a PACKAGED blob. */
  package?(event: 'begin' | 'end'): void;
  /** EOF of the main stream or of a package. */
  eof?(at: number, nested: boolean): void;
}

export interface LoadOptions {
  /** Expect a configuration record (default true; xen-save-devices-state streams have none). */
  configuration?: boolean;
  /** Our machine type, checked against the configuration record; undefined accepts any. */
  machineType?: string;
}

export interface LoadResult {
  configuration: ConfigurationRecord | undefined;
}

/** Header, configuration, and every record up to EOF. Leaves the reader after the EOF byte. */
export async function loadStream(r: StreamReader, h: LoadHandlers, opts: LoadOptions = {}): Promise<LoadResult> {
  await readHeader(r);
  const configuration = (opts.configuration ?? true) ? await readConfiguration(r, opts.machineType) : undefined;
  await loadBody(r, h, false, new Map());
  return { configuration };
}

/** The records of the main stream (`nested` false) or of a PACKAGED blob. */
async function loadBody(r: StreamReader, h: LoadHandlers, nested: boolean, live: Map<number, SectionHeader & { bound: BoundLoader }>): Promise<void> {
  for (;;) {
    if (!r.has(1)) await r.ensure(1);
    const at = r.bytesRead;
    const t = r.get8();
    switch (t) {
      case S.EOF:
        h.eof?.(at, nested);
        return;
      case S.START:
      case S.FULL: {
        const kind = t === S.START ? 'start' : 'full';
        const s = await readSectionStartFull(r);
        const bound = h.section(kind, s.idstr, s.instanceId);
        if (!bound) throw new MigrationStreamError(ERR.unknownSection(s.idstr, s.instanceId));
        checkSectionVersion(s.idstr, s.versionId, bound.version, bound.minVersion);
        const head = { kind, sectionId: s.sectionId, idstr: s.idstr, instanceId: s.instanceId, version: s.versionId, at } as const;
        if (kind === 'start') live.set(s.sectionId, { ...head, bound });
        await bound.loader.load(r, kind, s.versionId);
        await readFooter(r, s.idstr, s.sectionId);
        h.sectionLoaded?.(head);
        break;
      }
      case S.PART:
      case S.END: {
        const { sectionId } = await readSectionPartEnd(r);
        const sec = live.get(sectionId);
        if (!sec) throw new MigrationStreamError(ERR.unknownSectionId(sectionId));
        const kind = t === S.PART ? 'part' : 'end';
        await sec.bound.loader.load(r, kind, sec.version);
        await readFooter(r, sec.idstr, sectionId);
        h.sectionLoaded?.({ ...sec, kind, at });
        break;
      }
      case S.COMMAND: {
        const c = await readCommand(r);
        const verdict = await h.command(c, at, nested);
        if (c.cmd === 'PACKAGED') {
          // the whole blob is in memory (readCommand read it): load it as a stream body
          h.package?.('begin');
          await loadBody(StreamReader.fromBuffer(c.blob!), h, true, live);
          h.package?.('end');
        } else if (verdict === 'run' && nested) {
          return;
        }
        break;
      }
      default:
        throw new MigrationStreamError(ERR.unknownSectionType(t));
    }
  }
}
