/**
 * The block commands' QMP shapes (qapi/block.json, the block parts of
 * qapi/ferry.json) from the machine's drive facts. What QEMU 7.2 reports
 * and Ferry does not: `qdev` (Ferry has no QOM device tree to name),
 * `node-name` (Ferry has no block graph to address), `tray_open` (no
 * removable media), the throttling maxima and group, `dirty-bitmaps`,
 * `snapshots` (internal snapshots are never listed) and `encrypted`/
 * `compressed` in the image info (Ferry opens neither kind).
 */
import type { BlockDigest, DiskWorkloadInfo, DriveInfo, ImageInfoData } from '../machine/index.js';
import type * as T from '../generated/qapi-types.js';

function imageInfo(i: ImageInfoData): T.ImageInfo {
  const out: T.ImageInfo = { filename: i.filename, format: i.format, 'virtual-size': i.virtualSize, 'dirty-flag': i.dirtyFlag };
  if (i.actualSize !== undefined) out['actual-size'] = i.actualSize;
  if (i.clusterSize !== undefined) out['cluster-size'] = i.clusterSize;
  if (i.backingFilename !== undefined) out['backing-filename'] = i.backingFilename;
  if (i.fullBackingFilename !== undefined) out['full-backing-filename'] = i.fullBackingFilename;
  if (i.backingFormat !== undefined) out['backing-filename-format'] = i.backingFormat;
  if (i.backing !== undefined) out['backing-image'] = imageInfo(i.backing);
  if (i.qcow2 !== undefined) {
    const q = i.qcow2;
    // qemu-img's member order
    const data: T.ImageInfoSpecificQCow2 = {
      compat: q.compat,
      'compression-type': q.compressionType,
      ...(q.v3 !== undefined ? { 'lazy-refcounts': q.v3.lazyRefcounts } : {}),
      'refcount-bits': q.refcountBits,
      ...(q.v3 !== undefined ? { corrupt: q.v3.corrupt, 'extended-l2': q.v3.extendedL2 } : {}),
    };
    out['format-specific'] = { type: 'qcow2', data };
  }
  return out;
}

export function blockInfo(d: DriveInfo): T.BlockInfo {
  const inserted: T.BlockDeviceInfo = {
    file: d.file,
    ro: d.readOnly,
    drv: d.format,
    backing_file_depth: d.backingDepth,
    encrypted: false,
    detect_zeroes: 'off',
    bps: 0,
    bps_rd: 0,
    bps_wr: 0,
    iops: 0,
    iops_rd: 0,
    iops_wr: 0,
    image: imageInfo(d.image),
    cache: {
      writeback: d.cache !== 'writethrough' && d.cache !== 'directsync',
      direct: false,
      'no-flush': d.cache === 'unsafe',
    },
    write_threshold: 0,
  };
  if (d.backingFile !== undefined) inserted.backing_file = d.backingFile;
  const info: T.BlockInfo = { device: d.name, type: 'unknown', removable: !d.attached, locked: false, inserted };
  if (d.attached) info['io-status'] = d.ioStatus;
  return info;
}

export function blockDigest(b: BlockDigest): T.BlockDigest {
  return { digest: b.digest, drives: b.drives.map((d) => ({ device: d.name, size: d.size, digest: d.digest })) };
}

export function diskWorkloadInfo(w: DiskWorkloadInfo): T.DiskWorkloadInfo {
  const out: T.DiskWorkloadInfo = {
    device: w.drive,
    steps: w.steps,
    'bytes-written': w.bytesWritten,
    sum: w.sum,
    running: w.running,
    done: w.done,
  };
  if (w.error !== undefined) out.error = w.error;
  return out;
}
