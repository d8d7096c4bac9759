/**
 * parseStream: a passive dissector of a whole migration stream in memory,
 * for tests and tools. Understands header, configuration, commands
 * (PACKAGED recursively), `ram` sections record by record, device FULL
 * sections of known size (timer 24, globalstate 104, others be32-framed
 * unless sizes are given), EOF and the vmdesc trailer.
 */
import { StreamReader } from '../stream/reader.js';
import { WIRE } from './constants.js';
import { ERR, MigrationStreamError } from './errors.js';
import {
  type Command,
  type ConfigurationRecord,
  readCommand,
  readConfiguration,
  readFooter,
  readHeader,
  readSectionPartEnd,
  readSectionStartFull,
} from './records.js';

const S = WIRE.SECTION;
const F = WIRE.RAM;
const TWO32 = 4294967296;
const PAGE = WIRE.LIMITS.TARGET_PAGE_SIZE;

export type RamRecord =
  | { kind: 'mem_size'; flags: number; total: number; blocks: Array<{ name: string; length: number }> }
  | { kind: 'zero'; flags: number; offset: number; block: string; fill: number }
  | { kind: 'page'; flags: number; offset: number; block: string; data: Buffer }
  | { kind: 'xbzrle'; flags: number; offset: number; block: string; data: Buffer }
  | { kind: 'compress'; flags: number; offset: number; block: string; data: Buffer }
  | { kind: 'eos'; flags: number };

export type SectionKind = 'start' | 'part' | 'end' | 'full';

export interface ParsedSection {
  type: 'section';
  kind: SectionKind;
  sectionId: number;
  idstr: string;
  instanceId: number;
  versionId: number;
  /** for `ram` */
  ram?: RamRecord[];
  /** for devices: the payload (without a be32 frame) */
  payload?: Buffer;
  /** stream offset of the type byte */
  at: number;
}

export type ParsedRecord =
  | { type: 'header'; version: number; at: number }
  | ({ type: 'config'; at: number } & ConfigurationRecord)
  | ParsedSection
  | { type: 'command'; command: Command; at: number; body?: ParsedRecord[] }
  | { type: 'eof'; at: number }
  | { type: 'vmdesc'; json: string; value: unknown; at: number };

export interface ParseOptions {
  /** Raw payload sizes of FULL sections by idstr (default timer 24, globalstate 104). */
  deviceSizes?: Record<string, number>;
  /** Expect a configuration record (default true). */
  configuration?: boolean;
  /** Keep page data views in RAM records (default true). */
  keepData?: boolean;
}

interface ParseState {
  sections: Map<number, { idstr: string; instanceId: number; versionId: number }>;
  curBlock: string | null;
  sizes: Record<string, number>;
  keepData: boolean;
}

const EMPTY = Buffer.alloc(0);

async function need(r: StreamReader, n: number): Promise<void> {
  if (!r.has(n)) await r.ensure(n);
}

async function parseRam(r: StreamReader, st: ParseState): Promise<RamRecord[]> {
  const out: RamRecord[] = [];
  for (;;) {
    await need(r, 8);
    const hi = r.get32();
    const lo = r.get32();
    const flags = lo & F.FLAG_MASK;
    const offset = hi * TWO32 + ((lo & ~F.FLAG_MASK) >>> 0);
    const kind = flags & ~F.CONTINUE;
    let block = '';
    if (flags & (F.ZERO | F.PAGE | F.XBZRLE | F.COMPRESS_PAGE)) {
      if (flags & F.CONTINUE) {
        if (st.curBlock === null) throw new MigrationStreamError(ERR.badStream());
        block = st.curBlock;
      } else {
        block = st.curBlock = await r.readCountedString();
      }
    }
    switch (kind) {
      case F.EOS:
        out.push({ kind: 'eos', flags });
        return out;
      case F.MEM_SIZE: {
        const blocks: Array<{ name: string; length: number }> = [];
        let left = offset;
        while (left > 0) {
          const name = await r.readCountedString();
          await need(r, 8);
          const length = r.get64();
          if (length > left || length === 0) throw new MigrationStreamError(ERR.ramBlockListOverrun(name));
          blocks.push({ name, length });
          left -= length;
        }
        out.push({ kind: 'mem_size', flags, total: offset, blocks });
        break;
      }
      case F.ZERO:
        await need(r, 1);
        out.push({ kind: 'zero', flags, offset, block, fill: r.get8() });
        break;
      case F.PAGE: {
        await need(r, PAGE);
        const data = st.keepData ? r.getBytes(PAGE) : (r.skip(PAGE), EMPTY);
        out.push({ kind: 'page', flags, offset, block, data });
        break;
      }
      case F.XBZRLE: {
        await need(r, 3);
        if (r.get8() !== F.XBZRLE_ENCODING) throw new MigrationStreamError(ERR.xbzrleWrongEncoding());
        const len = r.get16();
        if (len > PAGE) throw new MigrationStreamError(ERR.xbzrleLenOverflow());
        await need(r, len);
        out.push({ kind: 'xbzrle', flags, offset, block, data: r.getBytes(len) });
        break;
      }
      case F.COMPRESS_PAGE: {
        await need(r, 4);
        const len = r.get32();
        if (len > WIRE.LIMITS.COMPRESS_BOUND) throw new MigrationStreamError(ERR.invalidCompressedLength(len | 0));
        await need(r, len);
        out.push({ kind: 'compress', flags, offset, block, data: r.getBytes(len) });
        break;
      }
      default:
        throw new MigrationStreamError(ERR.unknownRamFlags(flags));
    }
  }
}

async function parseDevicePayload(r: StreamReader, idstr: string, st: ParseState): Promise<Buffer> {
  let len = st.sizes[idstr];
  if (len === undefined) {
    await need(r, 4);
    len = StreamReader.checkLength(r.get32(), WIRE.LIMITS.DEVICE_PAYLOAD_MAX, `the '${idstr}' payload`);
  }
  await need(r, len);
  return r.getBytes(len);
}

/** The section loop; ends at EOF or (inside a package) at POSTCOPY_RUN / end of data. */
async function parseBody(r: StreamReader, st: ParseState, out: ParsedRecord[], nested: boolean): Promise<boolean> {
  for (;;) {
    if (nested && r.atEnd) return false;
    await need(r, 1);
    const at = r.bytesRead;
    const t = r.get8();
    switch (t) {
      case S.EOF:
        out.push({ type: 'eof', at });
        return true;
      case S.START:
      case S.FULL: {
        const h = await readSectionStartFull(r);
        st.sections.set(h.sectionId, { idstr: h.idstr, instanceId: h.instanceId, versionId: h.versionId });
        const sec: ParsedSection = { type: 'section', kind: t === S.START ? 'start' : 'full', ...h, at };
        if (h.idstr === F.IDSTR) sec.ram = await parseRam(r, st);
        else sec.payload = await parseDevicePayload(r, h.idstr, st);
        await readFooter(r, h.idstr, h.sectionId);
        out.push(sec);
        break;
      }
      case S.PART:
      case S.END: {
        const { sectionId } = await readSectionPartEnd(r);
        const h = st.sections.get(sectionId);
        if (!h) throw new MigrationStreamError(ERR.unknownSectionId(sectionId));
        const sec: ParsedSection = { type: 'section', kind: t === S.PART ? 'part' : 'end', sectionId, ...h, at };
        if (h.idstr === F.IDSTR) sec.ram = await parseRam(r, st);
        else sec.payload = await parseDevicePayload(r, h.idstr, st);
        await readFooter(r, h.idstr, sectionId);
        out.push(sec);
        break;
      }
      case S.COMMAND: {
        const command = await readCommand(r, true);
        const rec: ParsedRecord & { type: 'command' } = { type: 'command', command, at };
        out.push(rec);
        if (command.cmd === 'PACKAGED' && command.blob) {
          rec.body = [];
          await parseBody(StreamReader.fromBuffer(command.blob), st, rec.body, true);
        }
        if (nested && command.cmd === 'POSTCOPY_RUN') return false;
        break;
      }
      default:
        throw new MigrationStreamError(ERR.unknownSectionType(t));
    }
  }
}

/** Parse a complete stream held in memory. Throws MigrationStreamError on malformed input. */
export async function parseStream(buf: Uint8Array, opts: ParseOptions = {}): Promise<ParsedRecord[]> {
  const r = StreamReader.fromBuffer(buf);
  const out: ParsedRecord[] = [];
  const st: ParseState = {
    sections: new Map(),
    curBlock: null,
    sizes: { timer: WIRE.DEVICE.TIMER.SIZE, globalstate: WIRE.DEVICE.GLOBALSTATE.SIZE, ...opts.deviceSizes },
    keepData: opts.keepData ?? true,
  };
  await readHeader(r);
  out.push({ type: 'header', version: WIRE.VERSION, at: 0 });
  if (opts.configuration ?? true) {
    const at = r.bytesRead;
    out.push({ type: 'config', at, ...(await readConfiguration(r)) });
  }
  const sawEof = await parseBody(r, st, out, false);
  if (sawEof && !r.atEnd) {
    const at = r.bytesRead;
    const t = r.get8();
    if (t !== S.VMDESCRIPTION) throw new MigrationStreamError(ERR.noVmdesc(t));
    await need(r, 4);
    const len = StreamReader.checkLength(r.get32(), WIRE.LIMITS.VMDESC_MAX, 'the vmdesc trailer');
    await need(r, len);
    const json = r.getBytes(len).toString('utf8');
    let value: unknown;
    try {
      value = JSON.parse(json);
    } catch (e) {
      throw new MigrationStreamError(`Invalid vmdesc JSON: ${(e as Error).message}`);
    }
    out.push({ type: 'vmdesc', json, value, at });
    if (!r.atEnd) throw new MigrationStreamError(`Trailing bytes after the vmdesc trailer at offset ${r.bytesRead}`);
  }
  return out;
}
