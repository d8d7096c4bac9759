/**
 * The NBD protocol's numbers and byte layouts (the protocol document of
 * NetworkBlockDevice/nbd, doc/proto.md, and QEMU's include/block/nbd.h):
 * the fixed newstyle handshake, options and their replies, requests,
 * simple and structured replies, and the error values. Everything is big
 * endian on the wire.
 */

/** "NBDMAGIC": the first 8 bytes a server sends. */
export const NBD_INIT_MAGIC = 0x4e42444d41474943n;
/** "IHAVEOPT": newstyle negotiation; also the magic of every option the client sends. */
export const NBD_OPTS_MAGIC = 0x49484156454f5054n;
/** The magic of every option reply. */
export const NBD_REP_MAGIC = 0x3e889045565a9n;
export const NBD_REQUEST_MAGIC = 0x25609513;
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;

// Handshake flags (server) and client flags.
export const NBD_FLAG_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_NO_ZEROES = 1 << 1;
export const NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_C_NO_ZEROES = 1 << 1;

// Transmission flags.
export const NBD_FLAG_HAS_FLAGS = 1 << 0;
export const NBD_FLAG_READ_ONLY = 1 << 1;
export const NBD_FLAG_SEND_FLUSH = 1 << 2;
export const NBD_FLAG_SEND_FUA = 1 << 3;
export const NBD_FLAG_ROTATIONAL = 1 << 4;
export const NBD_FLAG_SEND_TRIM = 1 << 5;
export const NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6;
export const NBD_FLAG_SEND_DF = 1 << 7;
export const NBD_FLAG_CAN_MULTI_CONN = 1 << 8;
export const NBD_FLAG_SEND_RESIZE = 1 << 9;
export const NBD_FLAG_SEND_CACHE = 1 << 10;
export const NBD_FLAG_SEND_FAST_ZERO = 1 << 11;

// Options.
export const NBD_OPT_EXPORT_NAME = 1;
export const NBD_OPT_ABORT = 2;
export const NBD_OPT_LIST = 3;
export const NBD_OPT_STARTTLS = 5;
export const NBD_OPT_INFO = 6;
export const NBD_OPT_GO = 7;
export const NBD_OPT_STRUCTURED_REPLY = 8;
export const NBD_OPT_LIST_META_CONTEXT = 9;
export const NBD_OPT_SET_META_CONTEXT = 10;

// Option reply types; errors have bit 31 set.
export const NBD_REP_ACK = 1;
export const NBD_REP_SERVER = 2;
export const NBD_REP_INFO = 3;
export const NBD_REP_META_CONTEXT = 4;
const REP_ERR = 0x80000000;
export const NBD_REP_ERR_UNSUP = REP_ERR + 1;
export const NBD_REP_ERR_POLICY = REP_ERR + 2;
export const NBD_REP_ERR_INVALID = REP_ERR + 3;
export const NBD_REP_ERR_PLATFORM = REP_ERR + 4;
export const NBD_REP_ERR_TLS_REQD = REP_ERR + 5;
export const NBD_REP_ERR_UNKNOWN = REP_ERR + 6;
export const NBD_REP_ERR_SHUTDOWN = REP_ERR + 7;
export const NBD_REP_ERR_BLOCK_SIZE_REQD = REP_ERR + 8;

export function isRepError(type: number): boolean {
  return type >= REP_ERR;
}

// NBD_REP_INFO types.
export const NBD_INFO_EXPORT = 0;
export const NBD_INFO_NAME = 1;
export const NBD_INFO_DESCRIPTION = 2;
export const NBD_INFO_BLOCK_SIZE = 3;

// Commands and their flags.
export const NBD_CMD_READ = 0;
export const NBD_CMD_WRITE = 1;
export const NBD_CMD_DISC = 2;
export const NBD_CMD_FLUSH = 3;
export const NBD_CMD_TRIM = 4;
export const NBD_CMD_CACHE = 5;
export const NBD_CMD_WRITE_ZEROES = 6;
export const NBD_CMD_BLOCK_STATUS = 7;
export const NBD_CMD_FLAG_FUA = 1 << 0;
export const NBD_CMD_FLAG_NO_HOLE = 1 << 1;
export const NBD_CMD_FLAG_DF = 1 << 2;
export const NBD_CMD_FLAG_REQ_ONE = 1 << 3;
export const NBD_CMD_FLAG_FAST_ZERO = 1 << 4;

/** QEMU's names of the commands (its error texts use them). */
export const CMD_NAMES: Record<number, string> = {
  [NBD_CMD_READ]: 'read',
  [NBD_CMD_WRITE]: 'write',
  [NBD_CMD_DISC]: 'disconnect',
  [NBD_CMD_FLUSH]: 'flush',
  [NBD_CMD_TRIM]: 'trim',
  [NBD_CMD_CACHE]: 'cache',
  [NBD_CMD_WRITE_ZEROES]: 'write zeroes',
  [NBD_CMD_BLOCK_STATUS]: 'block status',
};

// Structured reply flags and chunk types; error chunks have bit 15 set.
export const NBD_REPLY_FLAG_DONE = 1 << 0;
export const NBD_REPLY_TYPE_NONE = 0;
export const NBD_REPLY_TYPE_OFFSET_DATA = 1;
export const NBD_REPLY_TYPE_OFFSET_HOLE = 2;
export const NBD_REPLY_TYPE_BLOCK_STATUS = 5;
export const NBD_REPLY_TYPE_ERROR = 0x8001;
export const NBD_REPLY_TYPE_ERROR_OFFSET = 0x8002;

export function isReplyError(type: number): boolean {
  return (type & 0x8000) !== 0;
}

// base:allocation extent flags.
export const NBD_STATE_HOLE = 1 << 0;
export const NBD_STATE_ZERO = 1 << 1;
export const BASE_ALLOCATION = 'base:allocation';

// Error values (the protocol's subset of errno).
export const NBD_SUCCESS = 0;
export const NBD_EPERM = 1;
export const NBD_EIO = 5;
export const NBD_ENOMEM = 12;
export const NBD_EINVAL = 22;
export const NBD_ENOSPC = 28;
export const NBD_EOVERFLOW = 75;
export const NBD_ENOTSUP = 95;
export const NBD_ESHUTDOWN = 108;

/** strerror of the protocol's error values (what a client shows). */
export const NBD_ERROR_TEXT: Record<number, string> = {
  [NBD_EPERM]: 'Operation not permitted',
  [NBD_EIO]: 'Input/output error',
  [NBD_ENOMEM]: 'Cannot allocate memory',
  [NBD_EINVAL]: 'Invalid argument',
  [NBD_ENOSPC]: 'No space left on device',
  [NBD_EOVERFLOW]: 'Value too large for defined data type',
  [NBD_ENOTSUP]: 'Operation not supported',
  [NBD_ESHUTDOWN]: 'Cannot send after transport endpoint shutdown',
};

/** The IANA port. */
export const NBD_DEFAULT_PORT = 10809;
/** QEMU's largest READ or WRITE payload (NBD_MAX_BUFFER_SIZE). */
export const NBD_MAX_BUFFER_SIZE = 32 * 1024 * 1024;
/** The protocol's longest string (export names, descriptions, messages). */
export const NBD_MAX_STRING_SIZE = 4096;

/** Bytes of the fixed parts. */
export const HANDSHAKE_SIZE = 18; // NBDMAGIC, IHAVEOPT, 16-bit flags
export const OPTION_HEADER_SIZE = 16; // IHAVEOPT, option, length
export const OPTION_REPLY_HEADER_SIZE = 20; // magic, option, type, length
export const REQUEST_SIZE = 28;
export const SIMPLE_REPLY_SIZE = 16;
export const CHUNK_HEADER_SIZE = 20;
/** The zeroes after NBD_OPT_EXPORT_NAME's answer, unless NO_ZEROES was agreed. */
export const EXPORT_NAME_PADDING = 124;

export interface NbdRequest {
  flags: number;
  type: number;
  /** The client's cookie, echoed in every reply (8 opaque bytes). */
  handle: bigint;
  offset: bigint;
  length: number;
}

export function encodeRequest(r: NbdRequest): Buffer {
  const b = Buffer.allocUnsafe(REQUEST_SIZE);
  b.writeUInt32BE(NBD_REQUEST_MAGIC, 0);
  b.writeUInt16BE(r.flags, 4);
  b.writeUInt16BE(r.type, 6);
  b.writeBigUInt64BE(r.handle, 8);
  b.writeBigUInt64BE(r.offset, 16);
  b.writeUInt32BE(r.length, 24);
  return b;
}

/** A request header; `magic` is returned as read (the caller checks it). */
export function decodeRequest(b: Buffer): NbdRequest & { magic: number } {
  return {
    magic: b.readUInt32BE(0),
    flags: b.readUInt16BE(4),
    type: b.readUInt16BE(6),
    handle: b.readBigUInt64BE(8),
    offset: b.readBigUInt64BE(16),
    length: b.readUInt32BE(24),
  };
}

export function encodeOption(option: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.allocUnsafe(OPTION_HEADER_SIZE + data.length);
  b.writeBigUInt64BE(NBD_OPTS_MAGIC, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(data.length, 12);
  data.copy(b, OPTION_HEADER_SIZE);
  return b;
}

export function encodeOptionReply(option: number, type: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.allocUnsafe(OPTION_REPLY_HEADER_SIZE + data.length);
  b.writeBigUInt64BE(NBD_REP_MAGIC, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(type >>> 0, 12);
  b.writeUInt32BE(data.length, 16);
  data.copy(b, OPTION_REPLY_HEADER_SIZE);
  return b;
}

export function encodeSimpleReply(error: number, handle: bigint): Buffer {
  const b = Buffer.allocUnsafe(SIMPLE_REPLY_SIZE);
  b.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(error, 4);
  b.writeBigUInt64BE(handle, 8);
  return b;
}

export function encodeChunkHeader(flags: number, type: number, handle: bigint, length: number): Buffer {
  const b = Buffer.allocUnsafe(CHUNK_HEADER_SIZE);
  b.writeUInt32BE(NBD_STRUCTURED_REPLY_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  b.writeBigUInt64BE(handle, 8);
  b.writeUInt32BE(length, 16);
  return b;
}

/** An NBD_REPLY_TYPE_ERROR chunk (header and payload), final. */
export function encodeErrorChunk(handle: bigint, error: number, message: string): Buffer {
  const msg = Buffer.from(message, 'utf8').subarray(0, NBD_MAX_STRING_SIZE);
  const payload = Buffer.allocUnsafe(6 + msg.length);
  payload.writeUInt32BE(error, 0);
  payload.writeUInt16BE(msg.length, 4);
  msg.copy(payload, 6);
  return Buffer.concat([encodeChunkHeader(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, handle, payload.length), payload]);
}

/** A 32-bit length followed by the string (NBD_OPT_GO/INFO names, NBD_REP_SERVER). */
export function lengthPrefixed(s: string): Buffer {
  const v = Buffer.from(s, 'utf8');
  const b = Buffer.allocUnsafe(4 + v.length);
  b.writeUInt32BE(v.length, 0);
  v.copy(b, 4);
  return b;
}

/** The errno text of an NBD error value ("error 42" for one the protocol does not define). */
export function nbdErrorText(error: number): string {
  return NBD_ERROR_TEXT[error] ?? `error ${error}`;
}
