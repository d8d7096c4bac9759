/**
 * Encoders and decoders of the stream's records (docs/spec/stream-format.md §4–§12).
 * Encoders write into any ByteSink; decoders read from a StreamReader,
 * awaiting data only when it is missing, and validate with QEMU's texts.
 */
import { hi32, join64 } from '../../base/u64.js';
import type { ByteSink } from '../stream/writer.js';
import { StreamReader } from '../stream/reader.js';
import { CMD_LENGTHS, CMD_NAMES, RP_LENGTHS, RP_NAMES, WIRE } from './constants.js';
import { ERR, MigrationStreamError } from './errors.js';

const S = WIRE.SECTION;

function fail(msg: string): never {
  throw new MigrationStreamError(msg);
}

// ---------------------------------------------------------------------------
// Header and configuration

export function putHeader(w: ByteSink): void {
  w.put32(WIRE.MAGIC);
  w.put32(WIRE.VERSION);
}

export async function readHeader(r: StreamReader): Promise<void> {
  if (!r.has(4)) await r.ensure(4);
  const magic = r.get32();
  if (magic !== WIRE.MAGIC) fail(ERR.notAStream(magic));
  if (!r.has(4)) await r.ensure(4);
  const v = r.get32();
  if (v === WIRE.VERSION_V2) fail(ERR.obsoleteV2());
  if (v !== WIRE.VERSION) fail(ERR.unsupportedVersion());
}

/** Configuration record without subsections (we send none). */
export function putConfiguration(w: ByteSink, machine: string): void {
  const b = Buffer.from(machine, 'utf8');
  w.put8(S.CONFIGURATION);
  w.put32(b.length);
  w.putBytes(b);
}

export interface ConfigurationRecord {
  machine: string;
  targetPageBits?: number;
  capabilities?: string[];
  uuid?: Uint8Array;
}

/** Subsection header (after the 0x05 byte). */
async function readSubsectionHeader(r: StreamReader): Promise<{ name: string; version: number }> {
  const name = await r.readCountedString();
  if (!r.has(4)) await r.ensure(4);
  return { name, version: r.get32() };
}

/**
 * Read the configuration record. `local` is the local machine type: QEMU
 * compares with strncmp over the received length (a prefix comparison).
 */
export async function readConfiguration(
  r: StreamReader,
  local?: string,
  opts: { targetPageBits?: number } = {},
): Promise<ConfigurationRecord> {
  if (!r.has(1)) await r.ensure(1);
  if (r.peek8() !== S.CONFIGURATION) fail(ERR.configMissing());
  r.get8();
  if (!r.has(4)) await r.ensure(4);
  const len = StreamReader.checkLength(r.get32(), WIRE.LIMITS.MACHINE_NAME_MAX, 'the machine type name');
  if (!r.has(len)) await r.ensure(len);
  const nameBytes = r.getBytes(len);
  const machine = nameBytes.toString('utf8');
  if (local !== undefined) {
    const lb = Buffer.from(local, 'utf8');
    // strncmp(received, local, len): stops at a NUL in either string
    let mismatch = false;
    for (let i = 0; i < len; i++) {
      const a = nameBytes[i]!;
      const b = i < lb.length ? lb[i]! : 0;
      if (a !== b) {
        mismatch = true;
        break;
      }
      if (a === 0) break;
    }
    if (mismatch) fail(ERR.machineMismatch(machine, local));
  }
  const rec: ConfigurationRecord = { machine };
  // optional subsections, each "configuration/..."
  for (;;) {
    if (!r.has(2)) {
      try {
        await r.ensure(2);
      } catch {
        break; // nothing more: let the section loop report the truncation
      }
    }
    if (r.peek8() !== S.SUBSECTION) break;
    // peek the name to check it belongs to us
    r.get8();
    const sub = await readSubsectionHeader(r);
    if (sub.name === 'configuration/target-page-bits') {
      if (!r.has(4)) await r.ensure(4);
      rec.targetPageBits = r.get32();
      const localBits = opts.targetPageBits ?? WIRE.LIMITS.TARGET_PAGE_BITS;
      if (rec.targetPageBits !== localBits) fail(ERR.pageBitsMismatch(rec.targetPageBits, localBits));
    } else if (sub.name === 'configuration/capabilities') {
      if (!r.has(4)) await r.ensure(4);
      const n = StreamReader.checkLength(r.get32(), 64, 'the capability count');
      rec.capabilities = [];
      for (let i = 0; i < n; i++) rec.capabilities.push(await r.readCountedString());
    } else if (sub.name === 'configuration/uuid') {
      if (!r.has(16)) await r.ensure(16);
      rec.uuid = Buffer.from(r.getBytes(16));
    } else {
      fail(`Unknown subsection '${sub.name}' in configuration`);
    }
  }
  return rec;
}

// ---------------------------------------------------------------------------
// Sections

export function putSectionStartFull(
  w: ByteSink,
  type: typeof S.START | typeof S.FULL,
  sectionId: number,
  idstr: string,
  instanceId: number,
  versionId: number,
): void {
  w.put8(type);
  w.put32(sectionId);
  w.putCountedString(idstr);
  w.put32(instanceId);
  w.put32(versionId);
}

export function putSectionPartEnd(w: ByteSink, type: typeof S.PART | typeof S.END, sectionId: number): void {
  w.put8(type);
  w.put32(sectionId);
}

export function putFooter(w: ByteSink, sectionId: number): void {
  w.put8(S.FOOTER);
  w.put32(sectionId);
}

export function putEof(w: ByteSink): void {
  w.put8(S.EOF);
}

/** After the type byte of START/FULL. */
export async function readSectionStartFull(
  r: StreamReader,
): Promise<{ sectionId: number; idstr: string; instanceId: number; versionId: number }> {
  if (!r.has(4)) await r.ensure(4);
  const sectionId = r.get32();
  const idstr = await r.readCountedString();
  if (!r.has(8)) await r.ensure(8);
  const instanceId = r.get32();
  const versionId = r.get32();
  return { sectionId, idstr, instanceId, versionId };
}

/*
 * The two records around every RAM section (one per postcopy slice) answer
 * without a promise when their bytes are buffered: an async function per
 * slice was a third of the destination's garbage in postcopy.
 */

/** After the type byte of PART/END. */
export function readSectionPartEnd(r: StreamReader): { sectionId: number } | Promise<{ sectionId: number }> {
  if (r.has(4)) return { sectionId: r.get32() };
  return r.ensure(4).then(() => ({ sectionId: r.get32() }));
}

/** Check the footer of section `sectionId` named `idstr`. */
export function readFooter(r: StreamReader, idstr: string, sectionId: number): void | Promise<void> {
  if (r.has(5)) return checkFooter(r, idstr, sectionId);
  return r.ensure(5).then(
    () => checkFooter(r, idstr, sectionId),
    (e: unknown) => {
      if (r.has(1) && r.peek8() !== S.FOOTER) fail(ERR.missingFooter(idstr));
      throw e;
    },
  );
}

function checkFooter(r: StreamReader, idstr: string, sectionId: number): void {
  if (r.get8() !== S.FOOTER) fail(ERR.missingFooter(idstr));
  const id = r.get32();
  if (id !== sectionId) fail(ERR.mismatchedFooter(idstr, id, sectionId));
}

/** Version check of a START/FULL section against the local handler. */
export function checkSectionVersion(idstr: string, received: number, local: number, minimum = 0): void {
  if (received > local) fail(ERR.unsupportedSectionVersion(received, idstr, local));
  if (received < minimum) fail(ERR.versionTooOld(idstr, received, minimum));
}

// ---------------------------------------------------------------------------
// vmdesc trailer

export function putVmdesc(w: ByteSink, json: string): void {
  const b = Buffer.from(json, 'utf8');
  w.put8(S.VMDESCRIPTION);
  w.put32(b.length);
  w.putBytes(b);
}

/**
 * After EOF: read the optional trailer. Returns the JSON text, or null with
 * QEMU's notice ("Expected vmdescription section, but got %d") when another
 * byte (or nothing, -1) follows. Never fails on a missing trailer.
 */
export async function readVmdesc(r: StreamReader): Promise<{ json: string | null; notice?: string }> {
  try {
    if (!r.has(1)) await r.ensure(1);
  } catch {
    return { json: null, notice: ERR.noVmdesc(-1) };
  }
  const t = r.get8();
  if (t !== S.VMDESCRIPTION) return { json: null, notice: ERR.noVmdesc(t) };
  if (!r.has(4)) await r.ensure(4);
  const len = StreamReader.checkLength(r.get32(), WIRE.LIMITS.VMDESC_MAX, 'the vmdesc trailer');
  if (!r.has(len)) await r.ensure(len);
  return { json: r.getBytes(len).toString('utf8') };
}

// ---------------------------------------------------------------------------
// Commands (type 0x08)

const C = WIRE.CMD;

function putCmdHeader(w: ByteSink, cmd: number, len: number): void {
  w.put8(S.COMMAND);
  w.put16(cmd);
  w.put16(len);
}

export function putCmdOpenReturnPath(w: ByteSink): void {
  putCmdHeader(w, C.OPEN_RETURN_PATH, 0);
}
export function putCmdPing(w: ByteSink, value: number): void {
  putCmdHeader(w, C.PING, 4);
  w.put32(value);
}
export function putCmdPostcopyAdvise(w: ByteSink, pageSizeSummary: number, targetPageSize: number): void {
  putCmdHeader(w, C.POSTCOPY_ADVISE, 16);
  w.put64(pageSizeSummary);
  w.put64(targetPageSize);
}
export function putCmdPostcopyListen(w: ByteSink): void {
  putCmdHeader(w, C.POSTCOPY_LISTEN, 0);
}
export function putCmdPostcopyRun(w: ByteSink): void {
  putCmdHeader(w, C.POSTCOPY_RUN, 0);
}
/**
 * One RAM_DISCARD command: ranges[from..to) (at most 12 (start, length) byte
 * ranges) of one block. Indexed, not sliced: a busy guest's switch encodes
 * thousands of them while it is stopped.
 */
export function putCmdRamDiscard(
  w: ByteSink,
  blockName: string,
  ranges: ReadonlyArray<readonly [number, number]>,
  from = 0,
  to = ranges.length,
): void {
  const n = to - from;
  if (n <= 0 || n > WIRE.LIMITS.DISCARD_MAX_RANGES) {
    throw new RangeError(`RAM_DISCARD takes 1..${WIRE.LIMITS.DISCARD_MAX_RANGES} ranges, got ${n}`);
  }
  const name = Buffer.from(blockName, 'utf8');
  if (name.length > 255) throw new RangeError('block name too long');
  putCmdHeader(w, C.POSTCOPY_RAM_DISCARD, 3 + name.length + 16 * n);
  w.put8(0); // version
  w.put8(name.length);
  w.putBytes(name);
  w.put8(0); // nil
  for (let i = from; i < to; i++) {
    const r = ranges[i]!;
    w.put64(r[0]);
    w.put64(r[1]);
  }
}
/** PACKAGED header; the `length` bytes of the blob follow (putBytes). */
export function putCmdPackaged(w: ByteSink, length: number): void {
  if (length > WIRE.LIMITS.PACKAGED_MAX) throw new MigrationStreamError(ERR.packagedTooLarge(length));
  putCmdHeader(w, C.PACKAGED, 4);
  w.put32(length);
}

export type Command =
  | { cmd: 'OPEN_RETURN_PATH' }
  | { cmd: 'PING'; value: number }
  | { cmd: 'POSTCOPY_ADVISE'; pageSizeSummary: number; targetPageSize: number }
  | { cmd: 'POSTCOPY_LISTEN' }
  | { cmd: 'POSTCOPY_RUN' }
  | { cmd: 'POSTCOPY_RAM_DISCARD'; blockName: string; ranges: Array<[number, number]> }
  /** the blob itself is read by the caller (readPackagedBlob) or included when `blob` */
  | { cmd: 'PACKAGED'; length: number; blob?: Buffer };

/**
 * After the 0x08 type byte: read and validate one command. For PACKAGED the
 * blob is read too when `readBlob` (default true).
 */
export async function readCommand(r: StreamReader, readBlob = true): Promise<Command> {
  if (!r.has(4)) await r.ensure(4);
  const cmd = r.get16();
  const len = r.get16();
  if (cmd >= C.MAX || cmd === C.INVALID) fail(ERR.cmdUnknown(cmd, len));
  const fixed = CMD_LENGTHS[cmd]!;
  if (fixed !== -1 && len !== fixed) fail(ERR.cmdBadLength(CMD_NAMES[cmd]!, fixed, len));
  if (!r.has(len)) await r.ensure(len);
  switch (cmd) {
    case C.OPEN_RETURN_PATH:
      return { cmd: 'OPEN_RETURN_PATH' };
    case C.PING:
      return { cmd: 'PING', value: r.get32() };
    case C.POSTCOPY_ADVISE:
      return { cmd: 'POSTCOPY_ADVISE', pageSizeSummary: r.get64(), targetPageSize: r.get64() };
    case C.POSTCOPY_LISTEN:
      return { cmd: 'POSTCOPY_LISTEN' };
    case C.POSTCOPY_RUN:
      return { cmd: 'POSTCOPY_RUN' };
    case C.POSTCOPY_RAM_DISCARD: {
      const data = r.getBytes(len);
      return decodeRamDiscard(data);
    }
    case C.PACKAGED: {
      const length = r.get32();
      if (length > WIRE.LIMITS.PACKAGED_MAX) fail(ERR.packagedTooLarge(length));
      if (!readBlob) return { cmd: 'PACKAGED', length };
      if (!r.has(length)) await r.ensure(length);
      return { cmd: 'PACKAGED', length, blob: Buffer.from(r.getBytes(length)) };
    }
  }
  return fail(ERR.cmdUnknown(cmd, len));
}

function decodeRamDiscard(d: Buffer): Command {
  const len = d.length;
  if (len < 1 + 1 + 1 + 1 + 2 * 8) fail(ERR.discardInvalidLength(len));
  if (d[0] !== 0) fail(ERR.discardInvalidVersion(d[0]!));
  const nameLen = d[1]!;
  if (2 + nameLen + 1 > len) fail(ERR.discardInvalidLength(len));
  const blockName = d.toString('utf8', 2, 2 + nameLen);
  const nil = d[2 + nameLen]!;
  if (nil !== 0) fail(ERR.discardMissingNil(nil));
  const rest = len - 3 - nameLen;
  if (rest % 16 !== 0 || rest === 0) fail(ERR.discardInvalidLength(len));
  const ranges: Array<[number, number]> = [];
  for (let p = 3 + nameLen; p < len; p += 16) {
    const s = join64(d.readUInt32BE(p), d.readUInt32BE(p + 4));
    const l = join64(d.readUInt32BE(p + 8), d.readUInt32BE(p + 12));
    ranges.push([s, l]);
  }
  return { cmd: 'POSTCOPY_RAM_DISCARD', blockName, ranges };
}

// ---------------------------------------------------------------------------
// Return path (destination -> source): be16 type, be16 len, data

const RP = WIRE.RP;

function rpHeader(type: number, len: number): Buffer {
  const b = Buffer.alloc(4 + len);
  b.writeUInt16BE(type, 0);
  b.writeUInt16BE(len, 2);
  return b;
}

export function encodeRpShut(value: number): Buffer {
  const b = rpHeader(RP.SHUT, 4);
  b.writeUInt32BE(value >>> 0, 4);
  return b;
}
export function encodeRpPong(value: number): Buffer {
  const b = rpHeader(RP.PONG, 4);
  b.writeUInt32BE(value >>> 0, 4);
  return b;
}
export function encodeRpReqPagesId(start: number, length: number, blockName: string): Buffer {
  const name = Buffer.from(blockName, 'utf8');
  if (name.length > 255) throw new RangeError('block name too long');
  const b = rpHeader(RP.REQ_PAGES_ID, 13 + name.length);
  b.writeUInt32BE(hi32(start), 4);
  b.writeUInt32BE(start >>> 0, 8);
  b.writeUInt32BE(length >>> 0, 12);
  b[16] = name.length;
  name.copy(b, 17);
  return b;
}
export function encodeRpReqPages(start: number, length: number): Buffer {
  const b = rpHeader(RP.REQ_PAGES, 12);
  b.writeUInt32BE(hi32(start), 4);
  b.writeUInt32BE(start >>> 0, 8);
  b.writeUInt32BE(length >>> 0, 12);
  return b;
}

export type RpMessage =
  | { type: 'SHUT'; value: number }
  | { type: 'PONG'; value: number }
  | { type: 'REQ_PAGES_ID'; start: number; length: number; blockName: string }
  | { type: 'REQ_PAGES'; start: number; length: number };

function decodeRpBody(type: number, d: Buffer): RpMessage {
  switch (type) {
    case RP.SHUT:
      return { type: 'SHUT', value: d.readUInt32BE(0) };
    case RP.PONG:
      return { type: 'PONG', value: d.readUInt32BE(0) };
    case RP.REQ_PAGES_ID: {
      if (d.length < 13) fail(ERR.rpReqPagesIdLength(d.length, 13));
      const n = d[12]!;
      if (d.length !== 13 + n) fail(ERR.rpReqPagesIdLength(d.length, 13 + n));
      return {
        type: 'REQ_PAGES_ID',
        start: join64(d.readUInt32BE(0), d.readUInt32BE(4)),
        length: d.readUInt32BE(8),
        blockName: d.toString('utf8', 13, 13 + n),
      };
    }
    default:
      return { type: 'REQ_PAGES', start: join64(d.readUInt32BE(0), d.readUInt32BE(4)), length: d.readUInt32BE(8) };
  }
}

function checkRpHeader(type: number, len: number): void {
  if (type >= RP.MAX || type === RP.INVALID) fail(ERR.rpInvalid(type, len));
  const fixed = RP_LENGTHS[type]!;
  if ((fixed !== -1 && len !== fixed) || len > WIRE.LIMITS.RP_MAX_LEN) {
    fail(ERR.rpBadLength(RP_NAMES[type]!, type, len, fixed));
  }
}

/**
 * Decode one return-path message from `buf` at `offset`. Returns null when
 * the message is incomplete; throws on an invalid one.
 */
export function decodeRpMessage(buf: Buffer, offset = 0): { msg: RpMessage; size: number } | null {
  if (buf.length - offset < 4) return null;
  const type = buf.readUInt16BE(offset);
  const len = buf.readUInt16BE(offset + 2);
  checkRpHeader(type, len);
  if (buf.length - offset < 4 + len) return null;
  return { msg: decodeRpBody(type, buf.subarray(offset + 4, offset + 4 + len)), size: 4 + len };
}

/** Read one return-path message from a reader. */
export async function readRpMessage(r: StreamReader): Promise<RpMessage> {
  if (!r.has(4)) await r.ensure(4);
  const type = r.get16();
  const len = r.get16();
  checkRpHeader(type, len);
  if (!r.has(len)) await r.ensure(len);
  return decodeRpBody(type, Buffer.from(r.getBytes(len)));
}
