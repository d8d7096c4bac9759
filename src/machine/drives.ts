/**
 * The machine's drives (`-drive`): where each one sits (interface, index,
 * bus, unit), its block backend name, its open image (src/block/), the
 * guest's reads and writes with the cache mode's flushes, its dirty-chunk
 * log for block migration, its digest and the facts query-block reports.
 *
 * Names and slots follow QEMU 7.2's `-drive` on a pc machine:
 * - `if=ide` (the default): 2 buses of 2 units; index = bus * 2 + unit;
 *   the backend is `ide<bus>-hd<unit>`. An index of 4 or more has no
 *   controller: "machine type does not support if=ide,bus=2,unit=0". An IDE
 *   hard disk cannot be read-only: "Block node is read-only".
 * - `if=virtio`: one device per index, `virtio<index>`, any index.
 * - `if=none`: no device, `none<index>` (QEMU 7.2 names an if=none drive
 *   without id so; it does not require an id).
 * - An omitted index is the interface's first free one; an explicit `id`
 *   is the backend name instead of the generated one.
 * The order of the checks is QEMU's: identifiers and duplicate ids for all
 * drives first, then drive by drive the slot, the name and the image, and
 * once every image is open the checks of the machine's devices.
 *
 * Cache modes (`cache=`), as Ferry carries them out. Ferry's I/O always
 * goes through the host page cache (it never opens O_DIRECT), so `direct`
 * is never on:
 * - writeback (default), none: a guest write is done when it is in the page
 *   cache; stop, quit and destroy flush (QEMU's vm_stop flushes all drives).
 * - writethrough, directsync: every guest write is followed by a flush.
 * - unsafe: no flush ever (stop, quit, writethrough) and the qcow2 driver
 *   runs without its allocation barriers.
 */
import { createHash } from 'node:crypto';
import { stat } from 'node:fs/promises';
import { BlockError, openImage, type BlockImage, type ImageFormat } from '../block/index.js';
import { Qcow2Image } from '../block/qcow2.js';
import { ReplicationPrimary, ReplicationSecondary, ReplicationSet, type FailureSink, type ReplicationConfig, type WriteHook } from '../replication/index.js';
import { DirtyChunks } from './dirty-chunks.js';

export type DriveInterface = 'ide' | 'virtio' | 'none';
export const DRIVE_INTERFACES: readonly DriveInterface[] = ['ide', 'virtio', 'none'];

export type CacheMode = 'writeback' | 'writethrough' | 'none' | 'directsync' | 'unsafe';
export const CACHE_MODES: readonly CacheMode[] = ['none', 'writeback', 'writethrough', 'directsync', 'unsafe'];

/** One `-drive`. */
export interface DriveConfig {
  /** The image file, as given (relative to the working directory). */
  file: string;
  /** Omitted: probed (the qcow2 magic, else raw). */
  format?: ImageFormat;
  /** Default 'ide'. */
  interface?: DriveInterface;
  /** Omitted: the interface's first free index. */
  index?: number;
  /** The block backend name instead of the generated one. */
  id?: string;
  readOnly?: boolean;
  /** Default 'writeback'. */
  cache?: CacheMode;
  /** A replicated drive (driver=quorum / driver=replication, src/replication/): `file` is its local or active image. */
  replication?: ReplicationConfig;
}

/** A drive the machine cannot have; `drive` is the position of its config (the CLI names the option). */
export class DriveError extends Error {
  override name = 'DriveError';
  constructor(
    readonly drive: number,
    message: string,
  ) {
    super(message);
  }
}

/** QEMU's pc machine: two IDE buses of two units each. */
const IDE_BUSES = 2;
const IDE_UNITS = 2;

/** Where a drive sits and what it is called. */
export interface DriveSlot {
  interface: DriveInterface;
  index: number;
  bus: number;
  unit: number;
  /** The block backend name (query-block's `device`). */
  name: string;
}

/** QEMU's id_wellformed: a letter, then letters, digits, '-', '.', '_'. */
const ID_RE = /^[A-Za-z][A-Za-z0-9_.-]*$/;

function slotOf(iface: DriveInterface, index: number): { bus: number; unit: number } {
  return iface === 'ide' ? { bus: Math.floor(index / IDE_UNITS), unit: index % IDE_UNITS } : { bus: 0, unit: index };
}

/**
 * The slot and name of every drive, or a DriveError with QEMU's text for
 * the first drive that cannot be placed.
 */
export function planDrives(cfgs: readonly DriveConfig[]): DriveSlot[] {
  const ids = new Set<string>();
  cfgs.forEach((c, i) => {
    if (c.id === undefined) return;
    if (!ID_RE.test(c.id)) {
      throw new DriveError(i, "Parameter 'id' expects an identifier\nIdentifiers consist of letters, digits, '-', '.', '_', starting with a letter.");
    }
    if (ids.has(c.id)) throw new DriveError(i, `Duplicate ID '${c.id}' for drive`);
    ids.add(c.id);
  });
  const slots: DriveSlot[] = [];
  cfgs.forEach((c, i) => {
    const iface = c.interface ?? 'ide';
    const taken = (n: number) => slots.some((s) => s.interface === iface && s.index === n);
    let index = c.index;
    if (index === undefined) {
      index = 0;
      while (taken(index)) index++;
    } else if (!Number.isSafeInteger(index) || index < 0) {
      throw new DriveError(i, "Parameter 'index' expects a number");
    }
    const { bus, unit } = slotOf(iface, index);
    if (taken(index)) throw new DriveError(i, `drive with bus=${bus}, unit=${unit} (index=${index}) exists`);
    const name = c.id ?? (iface === 'ide' ? `ide${bus}-hd${unit}` : `${iface}${index}`);
    if (slots.some((s) => s.name === name)) throw new DriveError(i, `Device with id '${name}' already exists`);
    slots.push({ interface: iface, index, bus, unit, name });
  });
  return slots;
}

/** What the machine's devices say about drives whose images are open (QEMU checks these at machine init). */
function checkDevices(cfgs: readonly DriveConfig[], slots: readonly DriveSlot[]): void {
  slots.forEach((s, i) => {
    if (s.interface !== 'ide') return;
    if (s.bus >= IDE_BUSES) throw new DriveError(i, `machine type does not support if=ide,bus=${s.bus},unit=${s.unit}`);
    if (cfgs[i]!.readOnly) throw new DriveError(i, 'Block node is read-only');
  });
}

const STRERROR: Record<string, string> = {
  ENOENT: 'No such file or directory',
  EACCES: 'Permission denied',
  EPERM: 'Operation not permitted',
  ENOTDIR: 'Not a directory',
  ELOOP: 'Too many levels of symbolic links',
  ENAMETOOLONG: 'File name too long',
  EROFS: 'Read-only file system',
  EMFILE: 'Too many open files',
};

function strerror(e: unknown): string {
  const code = (e as NodeJS.ErrnoException | null)?.code;
  return (code !== undefined ? STRERROR[code] : undefined) ?? (e instanceof Error ? e.message : String(e));
}

/**
 * The text QEMU's -drive prints for an image that does not open: the file
 * layer's "Could not open '<file>': <strerror>", but a format's own
 * complaint bare ("Image is not in qcow2 format", "Could not open backing
 * file: ..."). The block layer prefixes every reason with the first form.
 */
function openErrorText(file: string, e: BlockError): string {
  const prefix = `Could not open '${file}': `;
  if (!e.message.startsWith(prefix)) return e.message;
  const reason = e.message.slice(prefix.length);
  return Object.values(STRERROR).includes(reason) ? e.message : reason;
}

/* ------------------------------------------------------------------ */

/** query-block's `image`: what Ferry knows of one image of a chain. */
export interface ImageInfoData {
  filename: string;
  format: ImageFormat;
  virtualSize: number;
  /** Bytes the file takes on the host (st_blocks * 512); absent if stat fails. */
  actualSize?: number;
  /** qcow2 only. */
  clusterSize?: number;
  dirtyFlag: boolean;
  /** The backing file name as the image stores it. */
  backingFilename?: string;
  /** The backing file's path, resolved as QEMU does. */
  fullBackingFilename?: string;
  /** The backing format the image names, if it names one. */
  backingFormat?: string;
  qcow2?: {
    compat: '0.10' | '1.1';
    refcountBits: number;
    compressionType: 'zlib' | 'zstd';
    /** Version 3 only, as qemu-img prints. */
    v3?: { lazyRefcounts: boolean; corrupt: boolean; extendedL2: boolean };
  };
  backing?: ImageInfoData;
}

/** One drive as query-block reports it (the QMP shape is the commands layer's). */
export interface DriveInfo {
  name: string;
  interface: DriveInterface;
  index: number;
  /** A guest device uses it (if=ide, if=virtio): not removable, has an I/O status. */
  attached: boolean;
  file: string;
  format: ImageFormat;
  readOnly: boolean;
  cache: CacheMode;
  /** The backing image's path (QEMU's inserted.backing_file), if there is one. */
  backingFile?: string;
  backingDepth: number;
  ioStatus: IoStatus;
  image: ImageInfoData;
}

/** QEMU's BlockDeviceIoStatus. */
export type IoStatus = 'ok' | 'failed' | 'nospace';

export interface DriveDigest {
  name: string;
  size: number;
  digest: string;
}

/** Digests of every drive's guest-visible content (x-query-block-digest). */
export interface BlockDigest {
  /** sha256 over `name\0size\0digest\0` of every drive, in drive order. */
  digest: string;
  drives: DriveDigest[];
}

const QCOW2_INCOMPAT_DIRTY = 1n;
const QCOW2_INCOMPAT_CORRUPT = 2n;
const QCOW2_INCOMPAT_EXTL2 = 16n;
const QCOW2_COMPAT_LAZY_REFCOUNTS = 1n;

async function imageInfo(img: BlockImage): Promise<ImageInfoData> {
  const info: ImageInfoData = { filename: img.filename, format: img.format, virtualSize: img.virtualSize, dirtyFlag: false };
  try {
    info.actualSize = (await stat(img.filename)).blocks * 512;
  } catch {
    /* the file went away under us: no size to report */
  }
  // The stored backing name and the qcow2 header are not part of BlockImage: read them from the driver.
  if (img instanceof Qcow2Image) {
    const h = img.header;
    info.clusterSize = img.clusterSize;
    info.dirtyFlag = (h.incompatible & QCOW2_INCOMPAT_DIRTY) !== 0n;
    info.qcow2 = {
      compat: h.version >= 3 ? '1.1' : '0.10',
      refcountBits: 2 ** h.refcountOrder,
      compressionType: h.compressionType === 1 ? 'zstd' : 'zlib',
    };
    if (h.version >= 3) {
      info.qcow2.v3 = {
        lazyRefcounts: (h.compatible & QCOW2_COMPAT_LAZY_REFCOUNTS) !== 0n,
        corrupt: (h.incompatible & QCOW2_INCOMPAT_CORRUPT) !== 0n,
        extendedL2: (h.incompatible & QCOW2_INCOMPAT_EXTL2) !== 0n,
      };
    }
    if (h.backingFile !== null) info.backingFilename = h.backingFile;
    if (h.backingFormat !== null) info.backingFormat = h.backingFormat;
  }
  if (img.backing !== null) {
    info.fullBackingFilename = img.backing.filename;
    info.backing = await imageInfo(img.backing);
  }
  return info;
}

/** Bytes read per request by digest(). */
const DIGEST_CHUNK = 1 << 20;

export class Drive {
  readonly name: string;
  readonly interface: DriveInterface;
  readonly index: number;
  readonly bus: number;
  readonly unit: number;
  readonly file: string;
  readonly readOnly: boolean;
  readonly cache: CacheMode;
  /** No format= was given: the format was probed. */
  readonly probed: boolean;
  /** The dirty-chunk log (block migration): start/stop/take through the drive's methods. */
  readonly dirty: DirtyChunks;
  /** The I/O status of the guest device (set by a failed guest write). */
  ioStatus: IoStatus = 'ok';
  /** Sees every write before it happens (block replication's copy-before-write on a secondary disk); null normally. */
  writeHook: WriteHook | null = null;
  private closed = false;
  private _image: BlockImage;

  constructor(
    slot: DriveSlot,
    cfg: DriveConfig,
    image: BlockImage,
  ) {
    this._image = image;
    this.name = slot.name;
    this.interface = slot.interface;
    this.index = slot.index;
    this.bus = slot.bus;
    this.unit = slot.unit;
    this.file = cfg.file;
    this.readOnly = image.readOnly;
    this.cache = cfg.cache ?? 'writeback';
    this.probed = cfg.format === undefined;
    this.dirty = new DirtyChunks(image.virtualSize);
  }

  /** The open image; use it directly only for what must not count as a guest access. */
  get image(): BlockImage {
    return this._image;
  }

  /** Guest-visible bytes. */
  get size(): number {
    return this.image.virtualSize;
  }

  /** A guest device uses the drive (if=ide, if=virtio). */
  get attached(): boolean {
    return this.interface !== 'none';
  }

  private get noFlush(): boolean {
    return this.cache === 'unsafe';
  }

  private get writethrough(): boolean {
    return this.cache === 'writethrough' || this.cache === 'directsync';
  }

  /** Read guest-visible bytes (through the backing chain). */
  read(offset: number, buf: Uint8Array): Promise<void> {
    return this.image.read(offset, buf);
  }

  /**
   * Write bytes: marks the dirty chunks they touch (while tracking is on),
   * then writes; writethrough modes flush before the write counts as done.
   * Requests run in issue order (the image's queue), so a read issued after
   * this write, e.g. by a block migration that took the dirty log in
   * between, sees the new bytes.
   */
  async write(offset: number, data: Uint8Array): Promise<void> {
    this.dirty.mark(offset, data.length);
    if (this.writeHook !== null) await this.writeHook(offset, data.length, () => this.image.write(offset, data));
    else await this.image.write(offset, data);
    if (this.writethrough) await this.image.flush();
  }

  /** Make bytes read as zeros; marks the dirty chunks like write(). */
  async writeZeroes(offset: number, length: number): Promise<void> {
    this.dirty.mark(offset, length);
    if (this.writeHook !== null) await this.writeHook(offset, length, () => this.image.writeZeroes(offset, length));
    else await this.image.writeZeroes(offset, length);
    if (this.writethrough) await this.image.flush();
  }

  /** Make completed writes durable (nothing with cache=unsafe). */
  async flush(): Promise<void> {
    if (!this.noFlush) await this.image.flush();
  }

  /* ------------------------------------------------ dirty chunks */

  /** Start logging the 1 MiB chunks that writes touch, all clean. */
  startDirtyTracking(): void {
    this.dirty.start();
  }

  stopDirtyTracking(): void {
    this.dirty.stop();
  }

  get dirtyTracking(): boolean {
    return this.dirty.tracking;
  }

  /** The chunks written since the start or the last take, as a bitmap (bit i = chunk i); the log is clean after. */
  takeDirtyChunks(): Uint32Array {
    return this.dirty.take();
  }

  dirtyChunkCount(): number {
    return this.dirty.count();
  }

  /* ------------------------------------------------------ queries */

  /** sha256 of the guest-visible content, read 1 MiB at a time through one buffer. */
  async digest(): Promise<DriveDigest> {
    const h = createHash('sha256');
    const size = this.size;
    const buf = new Uint8Array(Math.min(DIGEST_CHUNK, Math.max(size, 1)));
    for (let off = 0; off < size; off += DIGEST_CHUNK) {
      const part = size - off >= buf.length ? buf : buf.subarray(0, size - off);
      await this.image.read(off, part);
      h.update(part);
    }
    return { name: this.name, size, digest: h.digest('hex') };
  }

  async info(): Promise<DriveInfo> {
    let depth = 0;
    for (let b = this.image.backing; b !== null; b = b.backing) depth++;
    const info: DriveInfo = {
      name: this.name,
      interface: this.interface,
      index: this.index,
      attached: this.attached,
      file: this.file,
      format: this.image.format,
      readOnly: this.readOnly,
      cache: this.cache,
      backingDepth: depth,
      ioStatus: this.ioStatus,
      image: await imageInfo(this.image),
    };
    if (this.image.backing !== null) info.backingFile = this.image.backing.filename;
    return info;
  }

  /**
   * Close the image and open it again (same format and mode), so that
   * nothing cached of its metadata survives: another process may have
   * written it (shared storage across a migration; QEMU's image
   * inactivation and activation).
   */
  async reopen(): Promise<void> {
    if (this.closed) throw new Error(`drive ${this.name} is closed`);
    // a replicated drive reopens the files below it and keeps its replication state
    if (this._image instanceof ReplicationPrimary || this._image instanceof ReplicationSecondary) return this._image.reopen();
    const old = this._image;
    await this.flush();
    await old.close();
    try {
      this._image = await openImage(this.file, { format: old.format, readOnly: this.readOnly, barriers: this.cache !== 'unsafe' });
    } catch (e) {
      this.closed = true;
      throw e;
    }
    if (this._image.virtualSize !== old.virtualSize) {
      const now = this._image.virtualSize;
      await this._image.close(); // every request fails from now on
      this.closed = true;
      throw new Error(`drive ${this.name}: '${this.file}' changed size (${old.virtualSize} to ${now} bytes)`);
    }
  }

  /** Flush (unless cache=unsafe) and close the image; idempotent. A flush error is thrown after the close. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    let err: unknown;
    try {
      await this.flush();
    } catch (e) {
      err = e;
    }
    await this.image.close();
    if (err !== undefined) throw err;
  }
}

/** Every drive of a machine, in command-line order. */
export class Drives {
  /** The replicated drives (QEMU's replication states), in drive order. */
  readonly replication: ReplicationSet;

  private constructor(readonly list: readonly Drive[]) {
    this.replication = new ReplicationSet(list.map((d) => d.image).filter((i) => i instanceof ReplicationPrimary || i instanceof ReplicationSecondary));
  }

  static none(): Drives {
    return new Drives([]);
  }

  /** The primary's NBD connection to the export of secondary disk `name` ended without a goodbye. */
  replicationPeerLost(name: string, detail: string): void {
    for (const n of this.replication.list()) if (n instanceof ReplicationSecondary && n.diskName === name) n.peerLost(detail);
  }

  /**
   * Place and open the drives (read-write unless readOnly). The first
   * failure closes what was opened and throws a DriveError with QEMU's text.
   */
  static async open(cfgs: readonly DriveConfig[], onReplicationFailure: FailureSink = () => undefined): Promise<Drives> {
    const slots = planDrives(cfgs);
    const opened: Drive[] = [];
    try {
      for (let i = 0; i < cfgs.length; i++) opened.push(await openDrive(i, cfgs[i]!, slots[i]!, opened, onReplicationFailure));
      checkDevices(cfgs, slots);
    } catch (e) {
      await Promise.all(opened.map((d) => d.close().catch(() => undefined)));
      throw e;
    }
    return new Drives(opened);
  }

  get(name: string): Drive | undefined {
    return this.list.find((d) => d.name === name);
  }

  /** Flush every drive; returns the failures (a failed drive's I/O status records them too). */
  async flushAll(): Promise<DriveFailure[]> {
    const failed: DriveFailure[] = [];
    await Promise.all(
      this.list.map((d) =>
        d.flush().catch((e: unknown) => {
          d.ioStatus = isNoSpace(e) ? 'nospace' : 'failed';
          failed.push({ drive: d.name, error: asError(e) });
        }),
      ),
    );
    return failed;
  }

  /** Reopen every drive (see Drive.reopen). */
  async reopenAll(): Promise<void> {
    for (const d of this.list) await d.reopen();
  }

  /** Flush and close every drive; returns the failures. */
  async closeAll(): Promise<DriveFailure[]> {
    const failed: DriveFailure[] = [];
    await Promise.all(this.list.map((d) => d.close().catch((e: unknown) => void failed.push({ drive: d.name, error: asError(e) }))));
    return failed;
  }

  async digest(): Promise<BlockDigest> {
    const drives: DriveDigest[] = [];
    for (const d of this.list) drives.push(await d.digest());
    const top = createHash('sha256');
    for (const d of drives) top.update(`${d.name}\0${d.size}\0${d.digest}\0`);
    return { digest: top.digest('hex'), drives };
  }

  info(): Promise<DriveInfo[]> {
    return Promise.all(this.list.map((d) => d.info()));
  }
}

export interface DriveFailure {
  drive: string;
  error: Error;
}

function asError(e: unknown): Error {
  return e instanceof Error ? e : new Error(String(e));
}

export function isNoSpace(e: unknown): boolean {
  return (e as NodeJS.ErrnoException | null)?.code === 'ENOSPC';
}

async function openDrive(i: number, cfg: DriveConfig, slot: DriveSlot, opened: readonly Drive[], onFailure: FailureSink): Promise<Drive> {
  if (cfg.file === '') throw new DriveError(i, 'A block device must be specified for "file"');
  // QEMU's file driver first: the path must name a regular file
  let st;
  try {
    st = await stat(cfg.file);
  } catch (e) {
    throw new DriveError(i, `Could not open '${cfg.file}': ${strerror(e)}`);
  }
  if (!st.isFile()) throw new DriveError(i, `'file' driver requires '${cfg.file}' to be a regular file`);
  let image: BlockImage;
  try {
    image = await openImage(cfg.file, {
      ...(cfg.format !== undefined ? { format: cfg.format } : {}),
      readOnly: cfg.readOnly ?? false,
      barriers: cfg.cache !== 'unsafe',
    });
  } catch (e) {
    if (e instanceof BlockError) throw new DriveError(i, openErrorText(cfg.file, e));
    throw e;
  }
  if (cfg.replication !== undefined) image = await replicated(i, cfg, cfg.replication, slot, image, opened, onFailure);
  return new Drive(slot, cfg, image);
}

/** The replication layer over a replicated drive's image (src/replication/). */
async function replicated(i: number, cfg: DriveConfig, r: ReplicationConfig, slot: DriveSlot, image: BlockImage, opened: readonly Drive[], onFailure: FailureSink): Promise<BlockImage> {
  if (r.mode === 'primary') {
    const reopenLocal = async (old: BlockImage) => {
      await old.close();
      return openImage(cfg.file, { format: old.format, readOnly: old.readOnly, barriers: cfg.cache !== 'unsafe' });
    };
    return new ReplicationPrimary(image, r, slot.name, reopenLocal, onFailure);
  }
  // the active disk opens as the replication layer's overlay
  await image.close();
  const disk = opened.find((d) => d.name === r.secondary);
  if (disk === undefined) {
    throw new DriveError(i, `Could not open backing file: Could not open backing file: Cannot find device='${r.secondary}' nor node-name='${r.secondary}'`);
  }
  if (disk.readOnly) throw new DriveError(i, `the secondary disk '${r.secondary}' is read-only: the primary's writes go there`);
  try {
    return await ReplicationSecondary.open(r, slot.name, disk, (top) => top === slot.name, onFailure);
  } catch (e) {
    if (e instanceof BlockError) throw new DriveError(i, openErrorText(cfg.file, e));
    throw e;
  }
}
