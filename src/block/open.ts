/**
 * Opening an image and its backing chain, probing the format, and creating
 * new images (what `qemu-img create` does for raw and qcow2).
 */
import { open, type FileHandle } from 'node:fs/promises';
import { errnoText, ImageFile } from './io.js';
import { buildHeader, MAX_CLUSTER_BITS, MAX_L1_BYTES, MIN_CLUSTER_BITS, QCOW2_MAGIC } from './qcow2-header.js';
import { Qcow2Image } from './qcow2.js';
import { RawImage } from './raw.js';
import { BlockError, IMAGE_FORMATS, type BlockImage, type CreateOptions, type ImageFormat, type OpenOptions } from './types.js';

/**
 * Where QEMU looks for a backing file: an absolute name as it is, a
 * relative one in the directory of the image that names it (the image's
 * path up to its last '/', taken as given: no symlinks resolved, no '..'
 * folded).
 */
export function backingPath(imageFilename: string, backingFile: string): string {
  if (backingFile.startsWith('/')) return backingFile;
  const slash = imageFilename.lastIndexOf('/');
  return slash < 0 ? backingFile : imageFilename.slice(0, slash + 1) + backingFile;
}

function checkFormat(name: string, what: string): ImageFormat {
  if (!(IMAGE_FORMATS as readonly string[]).includes(name)) {
    throw new BlockError(`Unsupported ${what} '${name}' (Ferry opens ${IMAGE_FORMATS.join(' and ')})`);
  }
  return name as ImageFormat;
}

/** 'qcow2' when the file starts with the qcow2 magic, else 'raw'. */
async function probe(fh: FileHandle, size: number): Promise<ImageFormat> {
  if (size < 4) return 'raw';
  const b = Buffer.alloc(4);
  await new ImageFile(fh, size, false).read(b, 0);
  return b.readUInt32BE(0) === QCOW2_MAGIC ? 'qcow2' : 'raw';
}

interface ChainLink {
  /** st_dev:st_ino, so that a loop is seen whatever path names the file. */
  id: string;
}

/**
 * Open an image (and, for qcow2, its backing chain, read-only, each with
 * its backing_fmt or probed). Every failure is a BlockError
 * "Could not open '<file>': <reason>", where the reason of a backing file
 * that fails is "Could not open backing file: <its own error>", as in
 * qemu-img.
 */
export async function openImage(filename: string, opts: OpenOptions = {}): Promise<BlockImage> {
  if (opts.format !== undefined) checkFormat(opts.format, 'image format');
  return openLink(filename, opts.format, opts.readOnly ?? false, opts, []);
}

async function openLink(filename: string, format: ImageFormat | undefined, readOnly: boolean, opts: OpenOptions, chain: ChainLink[]): Promise<BlockImage> {
  const fail = (reason: string) => new BlockError(`Could not open '${filename}': ${reason}`);
  let fh: FileHandle;
  try {
    fh = await open(filename, readOnly ? 'r' : 'r+');
  } catch (e) {
    throw fail(errnoText(e));
  }
  let image: BlockImage | null = null;
  try {
    const st = await fh.stat();
    if (st.isDirectory()) throw new BlockError('Is a directory');
    if (!st.isFile()) throw new BlockError('not a regular file (Ferry opens image files only)');
    const id = `${st.dev}:${st.ino}`;
    if (chain.some((l) => l.id === id)) throw new BlockError('this image is already in the backing chain (a loop)');
    const fmt = format ?? (await probe(fh, st.size));
    if (fmt === 'raw') return (image = new RawImage(fh, filename, st.size, readOnly));

    const q = await Qcow2Image.open(fh, filename, st.size, readOnly, opts);
    image = q;
    const { backingFile, backingFormat } = q.header;
    if (backingFile !== null) {
      try {
        const bfmt = backingFormat === null ? undefined : checkFormat(backingFormat, 'backing file format');
        q.backing = await openLink(backingPath(filename, backingFile), bfmt, true, opts, [...chain, { id }]);
      } catch (e) {
        throw new BlockError(`Could not open backing file: ${e instanceof Error ? e.message : String(e)}`);
      }
    }
    return q;
  } catch (e) {
    if (image !== null) await image.close().catch(() => undefined);
    else await fh.close().catch(() => undefined);
    throw fail(e instanceof BlockError ? e.message : errnoText(e));
  }
}

/**
 * Create an image, replacing any file of that name: raw (a sparse file of
 * the size) or qcow2 laid out as qemu-img 7.2 lays it out (header, refcount
 * table, refcount block, L1 table; refcount_order 4). Returns when the file
 * is complete and synced.
 */
export async function createImage(filename: string, opts: CreateOptions): Promise<void> {
  const format = checkFormat(opts.format, 'image format');
  let size = opts.size;
  if (format === 'raw') {
    if (opts.backingFile !== undefined) throw new BlockError("'backing_file' is not supported by the raw format");
    if (size === undefined) throw new BlockError('Image creation needs a size parameter');
  }
  if (opts.backingFile !== undefined) {
    let b: BlockImage;
    try {
      const bfmt = opts.backingFormat === undefined ? undefined : checkFormat(opts.backingFormat, 'backing file format');
      b = await openImage(backingPath(filename, opts.backingFile), { format: bfmt, readOnly: true });
    } catch (e) {
      throw new BlockError(`Could not open backing file: ${(e as Error).message}`);
    }
    size ??= b.virtualSize;
    await b.close();
  }
  if (size === undefined) throw new BlockError('Image creation needs a size parameter');
  if (!Number.isSafeInteger(size) || size < 0) throw new BlockError(`Invalid image size ${size}`);

  if (format === 'raw') {
    const fh = await open(filename, 'w');
    try {
      await fh.truncate(size);
      await fh.datasync();
    } finally {
      await fh.close();
    }
    return;
  }

  const clusterSize = opts.clusterSize ?? 65536;
  const clusterBits = Math.log2(clusterSize);
  if (!Number.isInteger(clusterBits) || clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    throw new BlockError('Cluster size must be a power of two between 512 and 2048k');
  }
  const version = opts.version ?? 3;
  if (version !== 2 && version !== 3) throw new BlockError(`Unsupported qcow2 version ${String(version)}`);
  size = Math.ceil(size / 512) * 512;
  const cs = clusterSize;
  const l1Size = Math.ceil(size / (cs * (cs / 8)));
  if (l1Size * 8 > MAX_L1_BYTES) throw new BlockError("The image size is too large for file format 'qcow2' (try using a larger cluster size)");
  const l1Clusters = Math.max(1, Math.ceil((l1Size * 8) / cs));
  // [header][refcount table: T][refcount blocks: B][L1], all counted by the blocks.
  const perBlock = cs / 2;
  let tableClusters = 1;
  let blocks = 1;
  for (;;) {
    const used = 1 + tableClusters + blocks + l1Clusters;
    const b = Math.ceil(used / perBlock);
    const t = Math.ceil((b * 8) / cs);
    if (b === blocks && t === tableClusters) break;
    blocks = b;
    tableClusters = t;
  }
  const used = 1 + tableClusters + blocks + l1Clusters;
  const meta = Buffer.alloc((1 + tableClusters + blocks) * cs);
  buildHeader({
    version,
    clusterBits,
    size,
    l1Size,
    l1TableOffset: (1 + tableClusters + blocks) * cs,
    refcountTableOffset: cs,
    refcountTableClusters: tableClusters,
    ...(opts.backingFile !== undefined ? { backingFile: opts.backingFile } : {}),
    ...(opts.backingFormat !== undefined ? { backingFormat: opts.backingFormat } : {}),
  }).copy(meta, 0);
  for (let j = 0; j < blocks; j++) {
    const off = (1 + tableClusters + j) * cs;
    meta.writeUInt32BE(Math.floor(off / 4294967296), cs + j * 8);
    meta.writeUInt32BE(off >>> 0, cs + j * 8 + 4);
  }
  const blockBase = (1 + tableClusters) * cs;
  for (let c = 0; c < used; c++) meta.writeUInt16BE(1, blockBase + c * 2);

  const fh = await open(filename, 'w');
  try {
    await fh.truncate(used * cs);
    await new ImageFile(fh, 0, false).write(meta, 0);
    await fh.datasync();
  } finally {
    await fh.close();
  }
}
