/**
 * QEMU 7.2's multifd wire format (docs/spec/multifd.md): the initial packet
 * each extra channel starts with, and the packets that carry RAM pages.
 * Every field is big-endian.
 *
 *   initial packet (64 bytes): magic, version, uuid[16], channel id (u8),
 *                              7 unused bytes, 4 unused u64
 *   packet header (1344 bytes): magic, version, flags, pages_alloc,
 *                              normal_pages, next_packet_size (u32 each),
 *                              packet_num (u64), 4 unused u64,
 *                              ramblock[256] (NUL-terminated),
 *                              offset[pages_alloc] (u64)
 *   then normal_pages pages of 4096 bytes, in offset order.
 *
 * A packet with the SYNC flag ends a channel's share of a RAM section: the
 * destination reads no further on that channel until its main stream has
 * reached the section's EOS.
 */
import { TARGET_PAGE_SIZE } from '../../machine/types.js';

export const MULTIFD_MAGIC = 0x11223344;
export const MULTIFD_VERSION = 1;
export const MULTIFD_FLAG_SYNC = 1;
/** Bytes of the initial packet. */
export const INIT_SIZE = 64;
/** Pages a packet holds at most (QEMU: 512 KiB of 4 KiB pages). */
export const PACKET_PAGES = (512 * 1024) / TARGET_PAGE_SIZE;
/** Where the offsets start in a packet header. */
export const OFFSETS_AT = 320;
/** Bytes of a packet header (the offsets of PACKET_PAGES pages included). */
export const HEADER_SIZE = OFFSETS_AT + 8 * PACKET_PAGES;
/** Bytes of the ramblock name field. */
const RAMBLOCK_FIELD = 256;
/** Default of multifd-channels (QEMU 7.2). */
export const DEFAULT_CHANNELS = 2;

/** The initial packet of channel `id`. */
export function encodeInit(id: number, uuid: Uint8Array): Buffer {
  const b = Buffer.alloc(INIT_SIZE);
  b.writeUInt32BE(MULTIFD_MAGIC, 0);
  b.writeUInt32BE(MULTIFD_VERSION, 4);
  b.set(uuid.subarray(0, 16), 8);
  b.writeUInt8(id, 24);
  return b;
}

export interface InitPacket {
  magic: number;
  version: number;
  uuid: Uint8Array;
  id: number;
}

export function decodeInit(b: Uint8Array): InitPacket {
  const v = new DataView(b.buffer, b.byteOffset, b.byteLength);
  return { magic: v.getUint32(0), version: v.getUint32(4), uuid: b.slice(8, 24), id: b[24]! };
}

/** Writes a packet header's fixed fields (the offsets are written by the walk). */
export function putHeader(h: Uint8Array, flags: number, pages: number, packetNum: number, blockName: string): void {
  const v = new DataView(h.buffer, h.byteOffset, h.byteLength);
  v.setUint32(0, MULTIFD_MAGIC);
  v.setUint32(4, MULTIFD_VERSION);
  v.setUint32(8, flags);
  v.setUint32(12, PACKET_PAGES);
  v.setUint32(16, pages);
  v.setUint32(20, 0);
  v.setBigUint64(24, BigInt(packetNum));
  h.fill(0, 32, OFFSETS_AT);
  if (pages > 0) h.set(Buffer.from(blockName, 'latin1').subarray(0, RAMBLOCK_FIELD - 1), 64);
}

export interface PacketHeader {
  magic: number;
  version: number;
  flags: number;
  pagesAlloc: number;
  normalPages: number;
  packetNum: number;
  /** The ramblock field up to its first NUL (byte 255 counts as one). */
  block: string;
}

export function decodeHeader(h: Uint8Array): PacketHeader {
  const v = new DataView(h.buffer, h.byteOffset, h.byteLength);
  let end = 64;
  while (end < 64 + RAMBLOCK_FIELD - 1 && h[end] !== 0) end++;
  return {
    magic: v.getUint32(0),
    version: v.getUint32(4),
    flags: v.getUint32(8),
    pagesAlloc: v.getUint32(12),
    normalPages: v.getUint32(16),
    packetNum: Number(v.getBigUint64(24)),
    block: Buffer.from(h.subarray(64, end)).toString('latin1'),
  };
}

/** The offset of page i of a packet header. */
export function packetOffset(h: Uint8Array, i: number): number {
  const v = new DataView(h.buffer, h.byteOffset, h.byteLength);
  return Number(v.getBigUint64(OFFSETS_AT + 8 * i));
}

/** A QEMU UUID as text (8-4-4-4-12 lowercase hex). */
export function uuidText(u: Uint8Array): string {
  const x = Buffer.from(u).toString('hex');
  return `${x.slice(0, 8)}-${x.slice(8, 12)}-${x.slice(12, 16)}-${x.slice(16, 20)}-${x.slice(20, 32)}`;
}

/** QEMU 7.2's texts for a channel or packet that does not check out. */
export const MULTIFD_ERR = {
  initialPacket: (channel: number, why: string) => `failed to receive packet via multifd channel ${channel}: ${why}`,
  initMagic: (got: number) => `multifd: received packet magic ${got.toString(16)} expected ${MULTIFD_MAGIC.toString(16)}`,
  initVersion: (got: number) => `multifd: received packet version ${got} expected ${MULTIFD_VERSION}`,
  uuid: (got: Uint8Array, want: Uint8Array, id: number) =>
    `multifd: received uuid '${uuidText(got)}' and expected uuid '${uuidText(want)}' for channel ${id}`,
  // (QEMU 7.2 words a channel id out of range this way)
  channelId: (version: number) => `multifd: received channel version ${version} expected ${MULTIFD_VERSION}`,
  packetMagic: (got: number) => `multifd: received packet magic ${got.toString(16)} and expected magic ${MULTIFD_MAGIC.toString(16)}`,
  packetVersion: (got: number) => `multifd: received packet version ${got} and expected version ${MULTIFD_VERSION}`,
  tooManyPages: (got: number, max: number) => `multifd: received packet with ${got} pages and expected maximum pages are ${max}`,
  unknownBlock: (name: string) => `multifd: unknown ram block ${name}`,
  offset: (offset: number, length: number) => `multifd: offset too long ${offset} (max ${length.toString(16)})`,
} as const;
