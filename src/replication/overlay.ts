/**
 * The secondary's overlays, the active and the hidden disk: qcow2 images
 * whose backing is set by the replication drive (not by their headers),
 * emptied at every checkpoint, and the read-only view of the secondary
 * disk that the hidden disk reads through.
 *
 * Emptying is QEMU's make_completely_empty done the simple way: the image is
 * created anew in place (same virtual size, cluster size and version) and
 * opened again. What a header may add beyond that (a backing file name,
 * extensions) is not kept: Ferry never follows an overlay's own backing
 * name anyway.
 */
import { BlockError, createImage, openImage, type BlockImage, type BlockStatus } from '../block/index.js';
import { Qcow2Image } from '../block/qcow2.js';
import type { SecondaryDisk } from './node.js';

export interface Overlay {
  readonly path: string;
  readonly image: Qcow2Image;
}

/** Open an overlay: qcow2, read-write, without barriers (scratch); a backing named in its header is dropped. */
export async function openOverlay(path: string): Promise<Overlay> {
  const img = await openImage(path, { format: 'qcow2', barriers: false });
  if (!(img instanceof Qcow2Image)) {
    await img.close();
    throw new BlockError("Active disk or hidden disk doesn't support make_empty");
  }
  const b = img.backing;
  img.backing = null;
  if (b !== null) await b.close();
  return { path, image: img };
}

/** Set the overlay's backing (null before a close, so that the close stays inside the overlay). */
export function linkBacking(o: Overlay, backing: BlockImage | null): void {
  o.image.backing = backing;
}

/** Make the overlay empty: every cluster unallocated again. Returns the reopened overlay. */
export async function emptyOverlay(o: Overlay): Promise<Overlay> {
  const img = o.image;
  const facts = { format: 'qcow2' as const, size: img.virtualSize, clusterSize: img.clusterSize, version: img.header.version === 2 ? (2 as const) : (3 as const) };
  img.backing = null;
  await img.close();
  await createImage(o.path, facts);
  return openOverlay(o.path);
}

/** The secondary disk as the hidden disk's backing: reads through the drive's current image; never closed through it. */
export function secondaryView(disk: SecondaryDisk): BlockImage {
  return {
    get format() {
      return disk.image.format;
    },
    get filename() {
      return disk.image.filename;
    },
    get virtualSize() {
      return disk.size;
    },
    get backing() {
      return disk.image.backing;
    },
    readOnly: true,
    get clusterSize() {
      return disk.image.clusterSize;
    },
    read: (o: number, b: Uint8Array) => disk.image.read(o, b),
    write: () => Promise.reject(new BlockError(`the secondary disk '${disk.name}' is written only through its drive`)),
    writeZeroes: () => Promise.reject(new BlockError(`the secondary disk '${disk.name}' is written only through its drive`)),
    blockStatus: (o: number, n: number): Promise<BlockStatus> => disk.image.blockStatus(o, n),
    flush: () => Promise.resolve(),
    close: () => Promise.resolve(),
  };
}
