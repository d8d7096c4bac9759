/**
 * Errors of the byte-level migration layer. Messages are QEMU's texts where
 * QEMU has one, so the commands layer can pass them through as GenericError.
 */
import { MigrationFailure } from '../errors.js';

/** The bytes are not a valid migration stream (or return-path message). */
export class MigrationStreamError extends MigrationFailure {
  readonly kind = 'stream';
  override readonly name = 'MigrationStreamError';
}

/** Lower-case hex without prefix (QEMU's %x / PRIx64). */
export function hex(n: number): string {
  return n.toString(16);
}

/** C's %#x: "0" for zero, else "0x..." */
export function hexAlt(n: number): string {
  return n === 0 ? '0' : '0x' + n.toString(16);
}

export const ERR = {
  /** A TLS record header (handshake, version 3.x) gets a hint: the peer has tls-creds set, this side not. */
  notAStream: (first32?: number) =>
    first32 !== undefined && first32 >>> 16 === 0x1603 ? 'Not a migration stream: the peer starts a TLS handshake (set tls-creds here too)' : 'Not a migration stream',
  obsoleteV2: () => "SaveVM v2 format is obsolete and don't work anymore",
  unsupportedVersion: () => 'Unsupported migration stream version',
  configMissing: () => 'Configuration section missing',
  machineMismatch: (received: string, local: string) =>
    `Machine type received is '${received}' and local is '${local}'`,
  pageBitsMismatch: (received: number, local: number) =>
    `Received TARGET_PAGE_BITS is ${received} but local is ${local}`,
  unknownSectionType: (t: number) => `Unknown savevm section type ${t}`,
  unknownSection: (idstr: string, instance: number) =>
    `Unknown savevm section or instance '${idstr}' ${instance}`,
  unknownSectionId: (id: number) => `Unknown savevm section ${id}`,
  missingFooter: (idstr: string) => `Missing section footer for ${idstr}`,
  mismatchedFooter: (idstr: string, read: number, expected: number) =>
    `Mismatched section id in footer for ${idstr} - read 0x${hex(read)} expected 0x${hex(expected)}`,
  unsupportedSectionVersion: (version: number, idstr: string, local: number) =>
    `savevm: unsupported version ${version} for '${idstr}' v${local}`,
  versionTooOld: (name: string, version: number, min: number) =>
    `${name}: incoming version_id ${version} is too old for local minimum version_id ${min}`,
  cmdUnknown: (cmd: number, len: number) => `MIG_CMD 0x${hex(cmd)} unknown (len 0x${hex(len)})`,
  cmdBadLength: (name: string, expected: number, got: number) =>
    `${name} received with bad length - expecting ${expected}, got ${got}`,
  packagedTooLarge: (len: number) => `Unreasonably large packaged state: ${len}`,
  discardInvalidLength: (len: number) => `CMD_POSTCOPY_RAM_DISCARD invalid length (${len})`,
  discardInvalidVersion: (v: number) => `CMD_POSTCOPY_RAM_DISCARD invalid version (${v})`,
  discardMissingNil: (v: number) => `CMD_POSTCOPY_RAM_DISCARD missing nil (${v})`,
  unknownRamFlags: (flags: number) => `Unknown combination of migration flags: ${hexAlt(flags)}`,
  unknownRamFlagsPostcopy: (flags: number) =>
    `Unknown combination of migration flags: ${hexAlt(flags)} (postcopy mode)`,
  illegalRamOffset: (offset: number) => `Illegal RAM offset ${hex(offset)}`,
  unknownRamBlock: (name: string) => `Unknown ramblock "${name}", cannot accept migration`,
  cantFindBlock: (name: string) => `Can't find block ${name}`,
  sizeMismatch: (name: string, received: number, local: number) =>
    `Size mismatch: ${name}: 0x${hex(received)} != 0x${hex(local)}: Invalid argument`,
  ramBlockListOverrun: (name: string) => `RAM block list overruns the total size at "${name}"`,
  unexpectedCompressed: () => 'Received an unexpected compressed page',
  invalidCompressedLength: (len: number) => `Invalid compressed data length: ${len}`,
  decompressFailed: () => 'decompress data failed',
  badStream: () => 'Ack, bad migration stream!',
  xbzrleWrongEncoding: () => 'Failed to load XBZRLE page - wrong compression!',
  xbzrleLenOverflow: () => 'Failed to load XBZRLE page - len overflow!',
  xbzrleDecode: (offset: number) =>
    `Failed to load XBZRLE page - decode error! Failed to decompress XBZRLE page at ${hex(offset)}`,
  ramVersion: (v: number) => `savevm: unsupported version ${v} for 'ram' v4`,
  truncated: () => 'Unexpected end of migration stream',
  readFailed: (msg: string) => `Migration stream read failed: ${msg}`,
  writeFailed: (msg: string) => `Migration stream write failed: ${msg}`,
  lengthTooLarge: (what: string, len: number, max: number) =>
    `Length ${len} of ${what} exceeds the limit ${max}`,
  rpInvalid: (type: number, len: number) =>
    `RP: Received invalid message 0x${hex(type).padStart(4, '0')} length 0x${hex(len).padStart(4, '0')}`,
  // QEMU 2.10's format string really lacks the space in "withincorrect".
  rpBadLength: (name: string, type: number, len: number, expected: number) =>
    `RP: Received '${name}' message (0x${hex(type).padStart(4, '0')}) withincorrect length ${len} expecting ${expected}`,
  rpReqPagesIdLength: (len: number, expected: number) =>
    `RP: Req_Page_id with length ${len} expecting ${expected}`,
  postcopyWrongState: (cmd: string, state: number) => `${cmd} in wrong postcopy state (${state})`,
  postcopyPageSizes: (src: number, dst: number) =>
    `Postcopy needs matching RAM page sizes (s=${hex(src)} d=${hex(dst)})`,
  postcopyTargetPageSizes: (src: number, dst: number) =>
    `Postcopy needs matching target page sizes (s=${src} d=${dst})`,
  discardNoBlock: (name: string) => `ram_discard_range: Failed to find block '${name}'`,
  discardOverrun: (name: string, start: number, len: number) =>
    `ram_discard_range: Overrun block '${name}' (${hex(start)}/${hex(len)})`,
  postcopyPagesMissing: (n: number) => `Postcopy stream ended with ${n} pages never received`,
  rpMisaligned: (start: number, len: number) =>
    `migrate_handle_rp_req_pages: Misaligned page request, start: ${hex(start)} len: ${len}`,
  rpNoPreviousBlock: () => 'ram_save_queue_pages no previous block',
  rpNoBlock: (name: string) => `ram_save_queue_pages no block '${name}'`,
  rpOverrun: (start: number, len: number, blockLen: number) =>
    `ram_save_queue_pages request overrun start=${hex(start)} len=${hex(len)} blocklen=${hex(blockLen)}`,
  noVmdesc: (got: number) => `Expected vmdescription section, but got ${got}`,
} as const;
