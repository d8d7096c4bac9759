/**
 * Stream inspection: what `ferry inspect FILE` prints and what the tests use
 * to look at bytes on the wire. It reads a whole migration stream through the
 * same loop as the destination (core/load-loop.ts), with loaders that record
 * instead of applying: the RAM loader in inspection mode (ram/loader.ts)
 * reports every record, device sections keep their payload, commands and
 * packages are listed where they stand, and the vmdesc trailer is parsed.
 *
 * Device payloads: QEMU's `timer` (24 bytes), `globalstate` (104 bytes) and
 * `COLOState` (1 byte) have fixed sizes; every other FULL section is taken as be32-framed
 * (Ferry's own devices), unless `deviceSizes` says otherwise. A live section
 * other than `ram` needs a loader in `liveLoaders`; without one it is not
 * understood ("Unknown savevm section").
 */
import type { Readable } from 'node:stream';
import { loadStream, type LoadHandlers } from './core/load-loop.js';
import { RamLoader } from './ram/loader.js';
import type { SectionKind, SectionLoader } from './sections/section.js';
import { StreamReader } from './stream/reader.js';
import { WIRE } from './wire/constants.js';
import { ERR, MigrationStreamError } from './wire/errors.js';
import type { Command, ConfigurationRecord } from './wire/records.js';

const S = WIRE.SECTION;
const F = WIRE.RAM;

export type RamRecord =
  | { kind: 'mem_size'; flags: number; total: number; blocks: Array<{ name: string; length: number }> }
  | { kind: 'zero'; flags: number; offset: number; block: string; fill: number }
  | { kind: 'page'; flags: number; offset: number; block: string; data: Buffer }
  | { kind: 'xbzrle'; flags: number; offset: number; block: string; data: Buffer }
  | { kind: 'compress'; flags: number; offset: number; block: string; data: Buffer }
  | { kind: 'eos'; flags: number };

export interface InspectedSection {
  type: 'section';
  kind: SectionKind;
  sectionId: number;
  idstr: string;
  instanceId: number;
  versionId: number;
  /** for `ram`: its records (empty unless keepRecords) */
  ram?: RamRecord[];
  /** for `ram`: how many page records of each kind it had */
  pages?: { zero: number; page: number; xbzrle: number; compress: number };
  /** for devices: the payload (without a be32 frame) */
  payload?: Buffer;
  /** stream offset of the type byte (in the package, inside one) */
  at: number;
}

export type InspectedRecord =
  | { type: 'header'; version: number; at: number }
  | ({ type: 'config'; at: number } & ConfigurationRecord)
  | InspectedSection
  | { type: 'command'; command: Command; at: number; body?: InspectedRecord[] }
  | { type: 'eof'; at: number }
  | { type: 'vmdesc'; json: string; value: unknown; at: number };

export interface InspectOptions {
  /** Raw payload sizes of FULL sections by idstr (default timer 24, globalstate 104). */
  deviceSizes?: Record<string, number>;
  /** Expect a configuration record (default true; xen-save-devices-state has none). */
  configuration?: boolean;
  /** Keep RAM records and their payloads (default true; false keeps only counts, for big streams). */
  keepRecords?: boolean;
  /** Loaders for live sections other than `ram`, by idstr (they read their payloads). */
  liveLoaders?: Record<string, SectionLoader>;
}

const EMPTY = Buffer.alloc(0);
const KIND_NAME: Record<number, 'zero' | 'page' | 'xbzrle' | 'compress'> = {
  [F.ZERO]: 'zero',
  [F.PAGE]: 'page',
  [F.XBZRLE]: 'xbzrle',
  [F.COMPRESS_PAGE]: 'compress',
};

/** Inspect a complete stream. Throws a MigrationStreamError (QEMU's texts) on malformed input. */
export async function inspectStream(input: Uint8Array | Readable, opts: InspectOptions = {}): Promise<{ records: InspectedRecord[]; ram: RamLoader }> {
  const r = input instanceof Uint8Array ? StreamReader.fromBuffer(input) : new StreamReader(input);
  const keep = opts.keepRecords ?? true;
  const sizes: Record<string, number> = { timer: WIRE.DEVICE.TIMER.SIZE, globalstate: WIRE.DEVICE.GLOBALSTATE.SIZE, COLOState: 1, ...opts.deviceSizes };
  const top: InspectedRecord[] = [{ type: 'header', version: WIRE.VERSION, at: 0 }];
  let out = top;
  const outer: InspectedRecord[][] = [];
  let ramRecords: RamRecord[] = [];
  let payload: Buffer | undefined;
  const seen = { zero: 0, normal: 0, xbzrle: 0, compressed: 0 };

  const ram = new RamLoader([], {
    inspect: true,
    observer: {
      page(kind, flags, b, offset, data) {
        if (!keep) return;
        const block = ram.blocks[b]!.name;
        const name = KIND_NAME[kind]!;
        const buf = Buffer.isBuffer(data) ? data : Buffer.from(data.buffer, data.byteOffset, data.byteLength);
        if (name === 'zero') ramRecords.push({ kind: 'zero', flags, offset, block, fill: buf[0]! });
        else ramRecords.push({ kind: name, flags, offset, block, data: buf });
      },
      blockList(total, blocks) {
        ramRecords.push({ kind: 'mem_size', flags: F.MEM_SIZE, total, blocks: blocks.map((x) => ({ ...x })) });
      },
      eos(flags) {
        ramRecords.push({ kind: 'eos', flags });
      },
    },
  });
  const ramLoader: SectionLoader = { load: (rd, _k, v) => ram.loadSection(rd, v) };
  const device = (idstr: string): SectionLoader => ({
    async load(rd) {
      let len = sizes[idstr];
      if (len === undefined) {
        if (!rd.has(4)) await rd.ensure(4);
        len = StreamReader.checkLength(rd.get32(), WIRE.LIMITS.DEVICE_PAYLOAD_MAX, `the '${idstr}' payload`);
      }
      if (!rd.has(len)) await rd.ensure(len);
      payload = rd.getBytes(len);
    },
  });
  const anyVersion = { version: 0xffffffff, minVersion: 0 };

  const handlers: LoadHandlers = {
    section(kind, idstr) {
      if (kind === 'start') {
        if (idstr === F.IDSTR) return { loader: ramLoader, ...anyVersion };
        const other = opts.liveLoaders?.[idstr];
        return other && { loader: other, ...anyVersion };
      }
      return { loader: device(idstr), ...anyVersion };
    },
    sectionLoaded(h) {
      const sec: InspectedSection = {
        type: 'section',
        kind: h.kind,
        sectionId: h.sectionId,
        idstr: h.idstr,
        instanceId: h.instanceId,
        versionId: h.version,
        at: h.at,
      };
      if (h.idstr === F.IDSTR && h.kind !== 'full') {
        const c = ram.counters;
        sec.ram = ramRecords;
        sec.pages = { zero: c.zero - seen.zero, page: c.normal - seen.normal, xbzrle: c.xbzrle - seen.xbzrle, compress: c.compressed - seen.compressed };
        Object.assign(seen, { zero: c.zero, normal: c.normal, xbzrle: c.xbzrle, compressed: c.compressed });
      } else {
        sec.payload = payload ?? EMPTY;
      }
      ramRecords = [];
      payload = undefined;
      out.push(sec);
    },
    command(command, at) {
      out.push({ type: 'command', command, at });
    },
    package(event) {
      if (event === 'begin') {
        const rec = out[out.length - 1] as { body?: InspectedRecord[] };
        rec.body = [];
        outer.push(out);
        out = rec.body;
      } else {
        out = outer.pop()!;
      }
    },
    eof(at) {
      out.push({ type: 'eof', at });
    },
  };
  const configAt = 8;
  const { configuration } = await loadStream(r, handlers, { configuration: opts.configuration ?? true });
  if (configuration) top.splice(1, 0, { type: 'config', at: configAt, ...configuration });

  if (!r.atEnd) {
    if (!r.has(1)) await r.ensure(1).catch(() => undefined);
  }
  if (!r.atEnd && r.has(1)) {
    const at = r.bytesRead;
    const t = r.get8();
    if (t !== S.VMDESCRIPTION) throw new MigrationStreamError(ERR.noVmdesc(t));
    if (!r.has(4)) await r.ensure(4);
    const len = StreamReader.checkLength(r.get32(), WIRE.LIMITS.VMDESC_MAX, 'the vmdesc trailer');
    if (!r.has(len)) await r.ensure(len);
    const json = r.getBytes(len).toString('utf8');
    let value: unknown;
    try {
      value = JSON.parse(json);
    } catch (e) {
      throw new MigrationStreamError(`Invalid vmdesc JSON: ${(e as Error).message}`);
    }
    top.push({ type: 'vmdesc', json, value, at });
    if (!r.has(1)) await r.ensure(1).catch(() => undefined);
    if (r.has(1)) throw new MigrationStreamError(`Trailing bytes after the vmdesc trailer at offset ${r.bytesRead}`);
  }
  return { records: top, ram };
}

const hex = (n: number): string => '0x' + n.toString(16);

function describeCommand(c: Command): string {
  switch (c.cmd) {
    case 'PING':
      return `PING ${c.value}`;
    case 'POSTCOPY_ADVISE':
      return `POSTCOPY_ADVISE page-size-summary ${hex(c.pageSizeSummary)} target-page-size ${c.targetPageSize}`;
    case 'POSTCOPY_RAM_DISCARD': {
      const bytes = c.ranges.reduce((a, x) => a + x[1], 0);
      return `POSTCOPY_RAM_DISCARD '${c.blockName}' ${c.ranges.length} range(s), ${bytes} bytes`;
    }
    case 'PACKAGED':
      return `PACKAGED ${c.length} bytes`;
    default:
      return c.cmd;
  }
}

function ramSummary(sec: InspectedSection): string {
  const recs = sec.ram ?? [];
  const n: Record<string, number> = { ...sec.pages };
  const parts = ['zero', 'page', 'xbzrle', 'compress'].filter((k) => n[k]).map((k) => `${k} ${n[k]}`);
  const list = recs.find((x) => x.kind === 'mem_size');
  const blocks = list && list.kind === 'mem_size' ? ` [${list.blocks.map((b) => `${b.name} ${hex(b.length)}`).join(', ')}]` : '';
  return (parts.length ? parts.join(', ') : 'no pages') + blocks;
}

/**
 * The inspection as text, one line a record, in the spirit of QEMU's
 * scripts/analyze-migration.py: sections with their ids, versions and
 * contents, commands, the end, and (with `desc`) the vmdesc JSON.
 */
export function formatInspection(records: readonly InspectedRecord[], opts: { records?: boolean; desc?: boolean } = {}, indent = ''): string {
  const lines: string[] = [];
  for (const rec of records) {
    const at = `${indent}${hex(rec.at).padStart(10)}  `;
    switch (rec.type) {
      case 'header':
        lines.push(`${at}header: QEVM version ${rec.version}`);
        break;
      case 'config':
        lines.push(`${at}configuration: machine '${rec.machine}'` +
          (rec.targetPageBits !== undefined ? `, target page bits ${rec.targetPageBits}` : '') +
          (rec.capabilities?.length ? `, capabilities ${rec.capabilities.join(' ')}` : ''));
        break;
      case 'section': {
        const head = `${at}${rec.kind.toUpperCase().padEnd(5)} section ${rec.sectionId} '${rec.idstr}' instance ${rec.instanceId} version ${rec.versionId}`;
        if (rec.ram) {
          lines.push(`${head}: ${ramSummary(rec)}`);
          if (opts.records) {
            for (const x of rec.ram) {
              const cont = x.flags & F.CONTINUE ? ' cont' : '';
              if (x.kind === 'mem_size') lines.push(`${indent}              mem_size ${x.blocks.map((b) => `${b.name} ${hex(b.length)}`).join(', ')}`);
              else if (x.kind === 'eos') lines.push(`${indent}              eos`);
              else if (x.kind === 'zero') lines.push(`${indent}              zero ${x.block} ${hex(x.offset)} fill ${x.fill}${cont}`);
              else lines.push(`${indent}              ${x.kind} ${x.block} ${hex(x.offset)} ${x.data.length} bytes${cont}`);
            }
          }
        } else {
          lines.push(`${head}: ${rec.payload?.length ?? 0} bytes`);
        }
        break;
      }
      case 'command':
        lines.push(`${at}command ${describeCommand(rec.command)}`);
        if (rec.body) lines.push(formatInspection(rec.body, opts, indent + '    '));
        break;
      case 'eof':
        lines.push(`${at}EOF`);
        break;
      case 'vmdesc':
        lines.push(`${at}vmdesc: ${rec.json.length} bytes of JSON`);
        if (opts.desc) lines.push(JSON.stringify(rec.value, null, 2));
        break;
    }
  }
  return lines.join('\n');
}
