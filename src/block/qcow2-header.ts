/**
 * The qcow2 header: field offsets, constants, parsing with QEMU's checks
 * and texts, and the bytes of a new image's first cluster. Facts from
 * QEMU's docs/interop/qcow2.txt (versions 2 and 3).
 */
import { BlockError } from './types.js';
import { hex } from './io.js';

export const QCOW2_MAGIC = 0x514649fb; // "QFI\xfb"

// Header field offsets (big endian).
export const H_MAGIC = 0;
export const H_VERSION = 4;
export const H_BACKING_FILE_OFFSET = 8;
export const H_BACKING_FILE_SIZE = 16;
export const H_CLUSTER_BITS = 20;
export const H_SIZE = 24;
export const H_CRYPT_METHOD = 32;
export const H_L1_SIZE = 36;
export const H_L1_TABLE_OFFSET = 40;
export const H_REFCOUNT_TABLE_OFFSET = 48;
export const H_REFCOUNT_TABLE_CLUSTERS = 56;
export const H_NB_SNAPSHOTS = 60;
export const H_SNAPSHOTS_OFFSET = 64;
export const V2_HEADER_LENGTH = 72;
// version 3
export const H_INCOMPATIBLE = 72;
export const H_COMPATIBLE = 80;
export const H_AUTOCLEAR = 88;
export const H_REFCOUNT_ORDER = 96;
export const H_HEADER_LENGTH = 100;
export const V3_MIN_HEADER_LENGTH = 104;
export const H_COMPRESSION_TYPE = 104;
/** What QEMU 7.2 writes: the compression_type byte and its padding. */
export const V3_HEADER_LENGTH = 112;

// Header extension types.
export const EXT_END = 0x00000000;
export const EXT_BACKING_FORMAT = 0xe2792aca;
export const EXT_FEATURE_TABLE = 0x6803f857;
export const EXT_BITMAPS = 0x23852875;
export const EXT_CRYPTO = 0x0537be77;
export const EXT_DATA_FILE = 0x44415441;

// Incompatible feature bits.
export const INCOMPAT_DIRTY = 1n << 0n;
export const INCOMPAT_CORRUPT = 1n << 1n;
export const INCOMPAT_DATA_FILE = 1n << 2n;
export const INCOMPAT_COMPRESSION = 1n << 3n;
export const INCOMPAT_EXTL2 = 1n << 4n;
/** The incompatible bits Ferry understands (dirty and corrupt, with the rules of openQcow2). */
export const INCOMPAT_SUPPORTED = INCOMPAT_DIRTY | INCOMPAT_CORRUPT;

export const MIN_CLUSTER_BITS = 9;
export const MAX_CLUSTER_BITS = 21;
/** QEMU's implementation limits (QCOW_MAX_L1_SIZE, QCOW_MAX_REFTABLE_SIZE). */
export const MAX_L1_BYTES = 32 * 1024 * 1024;
export const MAX_REFTABLE_BYTES = 8 * 1024 * 1024;
export const MAX_BACKING_NAME = 1023;

export type FeatureType = 0 | 1 | 2; // incompatible, compatible, autoclear

export interface FeatureName {
  type: number;
  bit: number;
  name: string;
}

/** The names QEMU 7.2 writes into its feature name table. */
export const QEMU_FEATURE_NAMES: readonly FeatureName[] = [
  { type: 0, bit: 0, name: 'dirty bit' },
  { type: 0, bit: 1, name: 'corrupt bit' },
  { type: 0, bit: 2, name: 'external data file' },
  { type: 0, bit: 3, name: 'compression type' },
  { type: 0, bit: 4, name: 'extended L2 entries' },
  { type: 1, bit: 0, name: 'lazy refcounts' },
  { type: 2, bit: 0, name: 'bitmaps' },
  { type: 2, bit: 1, name: 'raw external data' },
];

export interface Qcow2Header {
  version: number;
  backingFileOffset: number;
  backingFileSize: number;
  clusterBits: number;
  size: number;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  incompatible: bigint;
  compatible: bigint;
  autoclear: bigint;
  refcountOrder: number;
  headerLength: number;
  compressionType: number;
  /** From the backing format extension, or null. */
  backingFormat: string | null;
  /** The image's feature name table (empty without one). */
  featureNames: FeatureName[];
  /** The backing file name as stored, or null. */
  backingFile: string | null;
  /** Header extension types present (unknown ones included). */
  extensions: number[];
}

/** A be64 that must fit a JavaScript number. */
function u64(buf: Buffer, at: number, what: string): number {
  const hi = buf.readUInt32BE(at);
  if (hi >= 0x200000) throw new BlockError(`Invalid ${what} ${hex(Number(buf.readBigUInt64BE(at)))}: too large`);
  return hi * 4294967296 + buf.readUInt32BE(at + 4);
}

/**
 * The fixed fields before the cluster size is known: `buf` holds the
 * file's first min(file size, 4 KiB) bytes. Returns the header length and
 * the cluster bits, or throws QEMU's first complaint.
 */
export function probeHeader(buf: Buffer, fileSize: number): { version: number; clusterBits: number; headerLength: number } {
  if (fileSize < 4 || buf.readUInt32BE(H_MAGIC) !== QCOW2_MAGIC) throw new BlockError('Image is not in qcow2 format');
  const truncated = (need: number) =>
    new BlockError(`Could not read qcow2 header: the file has ${fileSize} bytes, the header needs ${need}`);
  if (fileSize < V2_HEADER_LENGTH) throw truncated(V2_HEADER_LENGTH);
  const version = buf.readUInt32BE(H_VERSION);
  if (version !== 2 && version !== 3) throw new BlockError(`Unsupported qcow2 version ${version}`);
  const clusterBits = buf.readUInt32BE(H_CLUSTER_BITS);
  if (clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    throw new BlockError(`Unsupported cluster size: 2^${clusterBits}`);
  }
  let headerLength = V2_HEADER_LENGTH;
  if (version === 3) {
    if (fileSize < V3_MIN_HEADER_LENGTH) throw truncated(V3_MIN_HEADER_LENGTH);
    headerLength = buf.readUInt32BE(H_HEADER_LENGTH);
    if (headerLength < V3_MIN_HEADER_LENGTH) throw new BlockError('qcow2 header too short');
    if (headerLength > 2 ** clusterBits) throw new BlockError('qcow2 header exceeds cluster size');
    if (headerLength % 8 !== 0) throw new BlockError(`qcow2 header length ${headerLength} is not a multiple of 8`);
    if (fileSize < headerLength) throw truncated(headerLength);
  }
  return { version, clusterBits, headerLength };
}

/**
 * The whole header from the image's first cluster (`cluster`: cluster size
 * bytes, zeros past the end of the file). Checks the header's own
 * consistency; the tables' places in the file are checked by the opener.
 */
export function parseHeader(cluster: Buffer, fileSize: number): Qcow2Header {
  const { version, clusterBits, headerLength } = probeHeader(cluster, fileSize);
  const clusterSize = 2 ** clusterBits;
  const v3 = version === 3;
  const h: Qcow2Header = {
    version,
    backingFileOffset: u64(cluster, H_BACKING_FILE_OFFSET, 'backing file offset'),
    backingFileSize: cluster.readUInt32BE(H_BACKING_FILE_SIZE),
    clusterBits,
    size: u64(cluster, H_SIZE, 'image size'),
    cryptMethod: cluster.readUInt32BE(H_CRYPT_METHOD),
    l1Size: cluster.readUInt32BE(H_L1_SIZE),
    l1TableOffset: u64(cluster, H_L1_TABLE_OFFSET, 'L1 table offset'),
    refcountTableOffset: u64(cluster, H_REFCOUNT_TABLE_OFFSET, 'reference count table offset'),
    refcountTableClusters: cluster.readUInt32BE(H_REFCOUNT_TABLE_CLUSTERS),
    nbSnapshots: cluster.readUInt32BE(H_NB_SNAPSHOTS),
    snapshotsOffset: u64(cluster, H_SNAPSHOTS_OFFSET, 'snapshot table offset'),
    incompatible: v3 ? cluster.readBigUInt64BE(H_INCOMPATIBLE) : 0n,
    compatible: v3 ? cluster.readBigUInt64BE(H_COMPATIBLE) : 0n,
    autoclear: v3 ? cluster.readBigUInt64BE(H_AUTOCLEAR) : 0n,
    refcountOrder: v3 ? cluster.readUInt32BE(H_REFCOUNT_ORDER) : 4,
    headerLength,
    compressionType: v3 && headerLength > H_COMPRESSION_TYPE ? cluster[H_COMPRESSION_TYPE]! : 0,
    backingFormat: null,
    featureNames: [],
    backingFile: null,
    extensions: [],
  };

  if (h.backingFileOffset !== 0) {
    if (h.backingFileOffset > clusterSize || h.backingFileSize > MAX_BACKING_NAME || h.backingFileOffset + h.backingFileSize > clusterSize) {
      throw new BlockError('Backing file name too long');
    }
  }

  // Header extensions: from the end of the header to the backing file name
  // (or the end of the first cluster), each padded to 8 bytes.
  const extEnd = h.backingFileOffset !== 0 && h.backingFileOffset > headerLength ? h.backingFileOffset : clusterSize;
  for (let at = headerLength; at + 8 <= extEnd; ) {
    const type = cluster.readUInt32BE(at);
    const len = cluster.readUInt32BE(at + 4);
    if (type === EXT_END) break;
    const data = at + 8;
    if (len > extEnd - data) {
      throw new BlockError(`Invalid qcow2 header extension ${hex(type)} at offset ${at}: its ${len} bytes run past offset ${extEnd}`);
    }
    h.extensions.push(type);
    if (type === EXT_BACKING_FORMAT) {
      h.backingFormat = cluster.toString('latin1', data, data + len);
    } else if (type === EXT_FEATURE_TABLE) {
      for (let e = data; e + 48 <= data + len; e += 48) {
        const raw = cluster.subarray(e + 2, e + 48);
        const nul = raw.indexOf(0);
        h.featureNames.push({ type: cluster[e]!, bit: cluster[e + 1]!, name: raw.toString('utf8', 0, nul < 0 ? raw.length : nul) });
      }
    }
    at = data + Math.ceil(len / 8) * 8;
  }

  if (h.backingFileOffset !== 0) {
    h.backingFile = cluster.toString('utf8', h.backingFileOffset, h.backingFileOffset + h.backingFileSize);
  }
  return h;
}

/** "Unsupported qcow2 feature(s): ..." for incompatible bits Ferry does not know, named from the image's table (else QEMU's names). */
export function unsupportedFeatures(h: Qcow2Header): string | null {
  let mask = h.incompatible & ~INCOMPAT_SUPPORTED;
  if (mask === 0n) return null;
  const names: string[] = [];
  for (let bit = 0n; bit < 64n; bit++) {
    if ((mask & (1n << bit)) === 0n) continue;
    const named =
      h.featureNames.find((f) => f.type === 0 && BigInt(f.bit) === bit) ??
      QEMU_FEATURE_NAMES.find((f) => f.type === 0 && BigInt(f.bit) === bit);
    if (named !== undefined) {
      names.push(named.name);
      mask &= ~(1n << bit);
    }
  }
  if (mask !== 0n) names.push(`Unknown incompatible feature: ${mask.toString(16)}`);
  return `Unsupported qcow2 feature(s): ${names.join(', ')}`;
}

export interface NewHeader {
  version: 2 | 3;
  clusterBits: number;
  size: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  backingFile?: string;
  backingFormat?: string;
}

function putU64(buf: Buffer, at: number, v: number): void {
  buf.writeUInt32BE(Math.floor(v / 4294967296), at);
  buf.writeUInt32BE(v >>> 0, at + 4);
}

/**
 * The first cluster of a new image: the header, the header extensions
 * (backing format; for version 3 the feature name table), the end marker,
 * then the backing file name.
 */
export function buildHeader(n: NewHeader): Buffer {
  const clusterSize = 2 ** n.clusterBits;
  const buf = Buffer.alloc(clusterSize);
  const headerLength = n.version === 3 ? V3_HEADER_LENGTH : V2_HEADER_LENGTH;
  buf.writeUInt32BE(QCOW2_MAGIC, H_MAGIC);
  buf.writeUInt32BE(n.version, H_VERSION);
  buf.writeUInt32BE(n.clusterBits, H_CLUSTER_BITS);
  putU64(buf, H_SIZE, n.size);
  buf.writeUInt32BE(n.l1Size, H_L1_SIZE);
  putU64(buf, H_L1_TABLE_OFFSET, n.l1TableOffset);
  putU64(buf, H_REFCOUNT_TABLE_OFFSET, n.refcountTableOffset);
  buf.writeUInt32BE(n.refcountTableClusters, H_REFCOUNT_TABLE_CLUSTERS);
  if (n.version === 3) {
    buf.writeUInt32BE(4, H_REFCOUNT_ORDER);
    buf.writeUInt32BE(headerLength, H_HEADER_LENGTH);
  }
  let at = headerLength;
  const ext = (type: number, data: Buffer) => {
    const padded = Math.ceil(data.length / 8) * 8;
    if (at + 8 + padded + 8 > clusterSize) throw new BlockError('qcow2 header extensions do not fit in the first cluster');
    buf.writeUInt32BE(type, at);
    buf.writeUInt32BE(data.length, at + 4);
    data.copy(buf, at + 8);
    at += 8 + padded;
  };
  if (n.backingFormat !== undefined) ext(EXT_BACKING_FORMAT, Buffer.from(n.backingFormat, 'latin1'));
  if (n.version === 3) {
    const table = Buffer.alloc(48 * QEMU_FEATURE_NAMES.length);
    QEMU_FEATURE_NAMES.forEach((f, i) => {
      table[i * 48] = f.type;
      table[i * 48 + 1] = f.bit;
      table.write(f.name, i * 48 + 2, 46, 'utf8');
    });
    // the feature name table is optional: as qemu-img does, it is left out
    // when it would not leave room for the end marker and the backing name
    // (a 512-byte cluster with a backing file)
    const backingLength = n.backingFile === undefined ? 0 : Buffer.byteLength(n.backingFile, 'utf8');
    if (at + 8 + table.length + 8 + backingLength <= clusterSize) ext(EXT_FEATURE_TABLE, table);
  }
  at += 8; // the end marker (zeros)
  if (n.backingFile !== undefined) {
    const name = Buffer.from(n.backingFile, 'utf8');
    if (name.length > MAX_BACKING_NAME || at + name.length > clusterSize) throw new BlockError('Backing file name too long');
    name.copy(buf, at);
    putU64(buf, H_BACKING_FILE_OFFSET, at);
    buf.writeUInt32BE(name.length, H_BACKING_FILE_SIZE);
  }
  return buf;
}
