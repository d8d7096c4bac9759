/**
 * The disk image layer's public types: one interface that every format
 * driver (raw, qcow2) implements, the options of openImage/createImage, and
 * the one error class the layer throws on purpose.
 */

/** The image formats Ferry reads and writes. */
export type ImageFormat = 'raw' | 'qcow2';

export const IMAGE_FORMATS: readonly ImageFormat[] = ['raw', 'qcow2'];

/**
 * What the top image itself says about a byte range (QEMU's
 * bdrv_is_allocated plus the zero bit of bdrv_block_status). Block
 * migration's incremental mode sends only what is allocated.
 */
export interface BlockStatus {
  /**
   * The top image defines these bytes (data, compressed data or a qcow2
   * zero cluster). False: they come from the backing chain, or read as zeros
   * when there is none.
   */
  allocated: boolean;
  /** The top image says they read as zeros (qcow2 zero clusters). False says nothing either way. */
  zero: boolean;
  /** Bytes from the queried offset that share this status: at least 1, at most the queried length. */
  length: number;
}

/**
 * An open disk image: the guest-visible bytes [0, virtualSize). Requests of
 * one image run one at a time, in the order they were made (a request may
 * be issued while another is running; it waits). Offsets and lengths are
 * byte granular: no alignment is required.
 */
export interface BlockImage {
  readonly format: ImageFormat;
  /** The path the image was opened by (for a backing file, the path resolved as QEMU does). */
  readonly filename: string;
  /** Bytes the guest sees. */
  readonly virtualSize: number;
  /** The opened backing image (always read-only), or null. */
  readonly backing: BlockImage | null;
  readonly readOnly: boolean;
  /** Bytes per allocation unit: the qcow2 cluster size; 512 for raw. */
  readonly clusterSize: number;
  /** Fill `buf` with the guest-visible bytes at `offset`, through the backing chain (zeros beyond it). */
  read(offset: number, buf: Uint8Array): Promise<void>;
  /** Write `data` at `offset` (copy-on-write from the backing chain where a cluster is new). */
  write(offset: number, data: Uint8Array): Promise<void>;
  /**
   * Write the buffers back to back from `offset`, as one request (one
   * pwritev), without joining them first. Optional: the formats that have it
   * (raw) save a copy; callers fall back to write().
   */
  writev?(offset: number, bufs: readonly Uint8Array[]): Promise<void>;
  /** Make [offset, offset + length) read as zeros (qcow2 v3: zero clusters where whole clusters are covered). */
  writeZeroes(offset: number, length: number): Promise<void>;
  /** What the top image holds at `offset`, and for how many bytes that stays the same. */
  blockStatus(offset: number, length: number): Promise<BlockStatus>;
  /** Make every completed write durable (fdatasync). */
  flush(): Promise<void>;
  /** Close the image and its backing chain. Waits for running requests; idempotent. */
  close(): Promise<void>;
}

export interface OpenOptions {
  /** The format; omitted: probed (the qcow2 magic, else raw). */
  format?: ImageFormat;
  /** Open read-only (backing files always are). Default false. */
  readOnly?: boolean;
  /**
   * qcow2: fdatasync between the stages of an allocating write (see the
   * write order in qcow2.ts), so that a host crash leaves at worst leaked
   * clusters. Default true. False is for scratch images (tests, a
   * migration destination that is thrown away when the migration fails):
   * the order of the writes is kept but the disk may reorder them.
   */
  barriers?: boolean;
  /** qcow2: bytes of L2 tables kept in memory (default 4 MiB, at least 16 tables). */
  l2CacheBytes?: number;
}

export interface CreateOptions {
  format: ImageFormat;
  /** Virtual size in bytes, rounded up to 512 for qcow2. May be omitted with a backing file: its size is taken. */
  size?: number;
  /** qcow2: a power of two from 512 to 2 MiB. Default 64 KiB. */
  clusterSize?: number;
  /** qcow2: 2 (QEMU's compat=0.10) or 3 (compat=1.1, the default). */
  version?: 2 | 3;
  /** qcow2: the backing file name, stored as given (a relative name is relative to the new image's directory). */
  backingFile?: string;
  /** qcow2: the backing file's format; omitted: probed. */
  backingFormat?: ImageFormat;
}

/**
 * The error the block layer throws on purpose: an image it cannot open, a
 * corruption found in an image's metadata, a request it refuses. Anything
 * else (a TypeError, an fs error during I/O) is not a BlockError.
 */
export class BlockError extends Error {
  override name = 'BlockError';
}
