/**
 * Command line of `ferry vm`, modelled on qemu-system: single-dash options,
 * each taking at most one argument, with QEMU's "key=value,key=value" option
 * strings where QEMU has them.
 */
import { CACHE_MODES, DRIVE_INTERFACES, type CacheMode, type DriveConfig, type DriveInterface } from '../machine/index.js';
import { parseReplicatedDrive } from '../replication/index.js';

/** One -drive: the option text (error messages name it) and what it says. */
export interface DriveArg {
  spec: string;
  config: DriveConfig;
}

export interface ObjectSpec {
  qomType: string;
  id: string;
  props: Record<string, string>;
}

export interface VmArgs {
  ramSize: string;
  smp: number;
  name?: string;
  machineType: string;
  memoryBackend?: string;
  /** -machine ...,x-qemu-compat=on: send only the device sections QEMU knows (timer, globalstate) */
  qemuCompat: boolean;
  qmp: string[];
  incoming?: string;
  startPaused: boolean;
  /** -mem-prealloc */
  memPrealloc: boolean;
  objects: ObjectSpec[];
  workload: string;
  fill: string;
  serial: string;
  drives: DriveArg[];
  /** -disk-workload, unparsed (the machine checks it against the drives) */
  diskWorkload?: string;
  /** -metrics tcp:HOST:PORT: serve the migration statistics to Prometheus there (src/metrics/) */
  metrics?: string;
}

export class UsageError extends Error {}

/** Options that take an argument; the value is the canonical name. */
const WITH_ARG = new Map<string, string>([
  ['m', 'm'], ['smp', 'smp'], ['name', 'name'], ['qmp', 'qmp'], ['incoming', 'incoming'],
  ['object', 'object'], ['machine', 'machine'], ['M', 'machine'], ['workload', 'workload'],
  ['fill', 'fill'], ['serial', 'serial'], ['display', 'display'], ['accel', 'accel'],
  ['vga', 'vga'], ['monitor', 'monitor'], ['drive', 'drive'], ['disk-workload', 'disk-workload'],
  ['metrics', 'metrics'],
]);
const FLAGS = new Set(['S', 'mem-prealloc', 'nodefaults', 'no-user-config', 'no-shutdown', 'enable-kvm']);

/**
 * Split a QEMU option string: "a,b=c,d=e,,f" → first implied value and
 * key/value pairs (",," escapes a comma).
 */
export function parseOptString(s: string, impliedKey?: string): Record<string, string> {
  const parts: string[] = [];
  let cur = '';
  for (let i = 0; i < s.length; i++) {
    if (s[i] === ',') {
      if (s[i + 1] === ',') {
        cur += ',';
        i++;
        continue;
      }
      parts.push(cur);
      cur = '';
    } else cur += s[i];
  }
  parts.push(cur);
  const out: Record<string, string> = {};
  parts.forEach((p, idx) => {
    if (p === '') return;
    const eq = p.indexOf('=');
    if (eq < 0) {
      if (idx === 0 && impliedKey) out[impliedKey] = p;
      else out[p] = 'on';
    } else {
      out[p.slice(0, eq)] = p.slice(eq + 1);
    }
  });
  return out;
}

export function parseVmArgs(argv: readonly string[]): VmArgs {
  const a: VmArgs = {
    ramSize: '128M',
    smp: 1,
    machineType: 'none',
    qemuCompat: false,
    qmp: [],
    startPaused: false,
    memPrealloc: false,
    objects: [],
    workload: 'idle',
    fill: 'zero',
    serial: 'none',
    drives: [],
  };
  for (let i = 0; i < argv.length; i++) {
    const raw = argv[i]!;
    if (!raw.startsWith('-')) throw new UsageError(`${raw}: invalid option`);
    const opt = raw.replace(/^--?/, '');
    if (FLAGS.has(opt)) {
      if (opt === 'S') a.startPaused = true;
      if (opt === 'mem-prealloc') a.memPrealloc = true;
      continue;
    }
    const canon = WITH_ARG.get(opt);
    if (!canon) throw new UsageError(`-${opt}: invalid option`);
    const val = argv[++i];
    if (val === undefined) throw new UsageError(`-${opt}: requires an argument`);
    switch (canon) {
      case 'm': {
        const o = parseOptString(val, 'size');
        if (!o.size) throw new UsageError(`-m ${val}: missing 'size'`);
        a.ramSize = o.size;
        break;
      }
      case 'smp': {
        const o = parseOptString(val, 'cpus');
        const n = Number(o.cpus ?? '1');
        if (!Number.isInteger(n) || n < 1 || n > 64) {
          throw new UsageError(`-smp ${val}: Invalid CPU topology: cpus must be between 1 and 64`);
        }
        a.smp = n;
        break;
      }
      case 'name': {
        const o = parseOptString(val, 'guest');
        a.name = o.guest;
        break;
      }
      case 'qmp':
        a.qmp.push(val);
        break;
      case 'monitor':
        // -monitor is the HMP monitor in QEMU; we only speak QMP there too if asked with mode=control
        a.qmp.push(val);
        break;
      case 'incoming':
        a.incoming = val;
        break;
      case 'object': {
        const o = parseOptString(val, 'qom-type');
        const qomType = o['qom-type'];
        const id = o.id;
        if (!qomType) throw new UsageError(`-object ${val}: Parameter 'qom-type' is missing`);
        if (!id) throw new UsageError(`-object ${val}: Parameter 'id' is missing`);
        delete o['qom-type'];
        delete o.id;
        a.objects.push({ qomType, id, props: o });
        break;
      }
      case 'machine': {
        const o = parseOptString(val, 'type');
        if (o.type) a.machineType = o.type;
        if (o['memory-backend']) a.memoryBackend = o['memory-backend'];
        if (o['x-qemu-compat'] !== undefined) a.qemuCompat = o['x-qemu-compat'] === 'on';
        break;
      }
      case 'workload':
        a.workload = val;
        break;
      case 'fill':
        a.fill = val;
        break;
      case 'serial':
        a.serial = val;
        break;
      case 'drive':
        try {
          a.drives.push({ spec: val, config: parseDrive(val) });
        } catch (e) {
          throw new UsageError(`-drive ${val}: ${(e as Error).message}`);
        }
        break;
      case 'metrics':
        if (a.metrics !== undefined) throw new UsageError(`-metrics ${val}: only one metrics endpoint per VM`);
        a.metrics = val;
        break;
      case 'disk-workload':
        if (a.diskWorkload !== undefined) throw new UsageError(`-disk-workload ${val}: only one disk workload per VM`);
        a.diskWorkload = val;
        break;
      default:
        // -display, -accel, -vga: accepted for command-line compatibility, no effect
        break;
    }
  }
  return a;
}

/** -drive options QEMU has that Ferry does not carry out. */
const QEMU_DRIVE_OPTIONS = new Set([
  'bus', 'unit', 'media', 'snapshot', 'aio', 'discard', 'werror', 'rerror', 'serial', 'addr', 'cyls', 'heads', 'secs',
  'trans', 'copy-on-read', 'detect-zeroes', 'node-name', 'auto-read-only', 'force-share', 'boot', 'cache.direct',
  'cache.no-flush', 'cache.writeback', 'bps', 'bps_rd', 'bps_wr', 'iops', 'iops_rd', 'iops_wr', 'iops_size', 'group',
]);
/** Image formats QEMU has that Ferry does not open. */
const QEMU_FORMATS = new Set([
  'bochs', 'cloop', 'dmg', 'file', 'host_device', 'luks', 'nbd', 'parallels', 'qcow', 'qed', 'vdi', 'vhdx', 'vmdk', 'vpc', 'vvfat',
]);
/** Interfaces QEMU has that Ferry's machine does not. */
const QEMU_INTERFACES = new Set(['scsi', 'floppy', 'pflash', 'mtd', 'sd', 'xen']);

/** QEMU's boolean option values. */
function parseBool(v: string, name: string): boolean {
  if (['on', 'yes', 'true', 'y'].includes(v)) return true;
  if (['off', 'no', 'false', 'n'].includes(v)) return false;
  throw new Error(`Parameter '${name}' expects 'on' or 'off'`);
}

/**
 * One -drive option string: file=PATH[,format=raw|qcow2][,if=ide|virtio|none][,index=N][,id=ID][,readonly=on][,cache=MODE]
 * (",," is a comma in a value); QEMU's spelling driver=FORMAT,file.filename=PATH
 * too; and the replicated drives (driver=quorum, driver=replication:
 * src/replication/config.ts). Throws with QEMU's text where QEMU has one;
 * the slot, the name and the image are the machine's checks (drives.ts).
 */
export function parseDrive(spec: string): DriveConfig {
  const o = parseOptString(spec);
  if (o.driver === 'quorum' || o.driver === 'replication') {
    const r = parseReplicatedDrive(o);
    if (o['read-only'] !== undefined || o.readonly !== undefined) throw new Error('a replicated drive is written: it cannot be read-only');
    return placement(o, { file: r.file, ...(r.format !== undefined ? { format: r.format } : {}), replication: r.replication });
  }
  if (o.driver !== undefined) {
    if (o.format !== undefined) throw new Error("Cannot specify both 'driver' and 'format'");
    o.format = o.driver;
    delete o.driver;
  }
  if (o['file.filename'] !== undefined) {
    if (o.file !== undefined) throw new Error("Cannot specify both 'file' and 'file.filename'");
    if (o['file.driver'] !== undefined && o['file.driver'] !== 'file') throw new Error(`Ferry opens image files only (file.driver=file), not '${o['file.driver']}'`);
    o.file = o['file.filename'];
    delete o['file.filename'];
    delete o['file.driver'];
  }
  for (const k of Object.keys(o)) {
    if (['file', 'format', 'if', 'index', 'id', 'readonly', 'read-only', 'cache'].includes(k)) continue;
    if (QEMU_DRIVE_OPTIONS.has(k) || k.startsWith('throttling.') || k.startsWith('file.')) {
      throw new Error(`Ferry does not support the drive option '${k}'`);
    }
    if (o.format !== undefined) throw new Error(`Block format '${o.format}' does not support the option '${k}'`);
    throw new Error(`Invalid drive option '${k}' (Ferry's are file, format, if, index, id, readonly, cache)`);
  }
  if (o.file === undefined) throw new Error('Ferry needs file= (drives without a medium are not supported)');
  if (o.file === '') throw new Error('A block device must be specified for "file"');
  const cfg: DriveConfig = { file: o.file };
  if (o.format !== undefined) {
    if (o.format === 'raw' || o.format === 'qcow2') cfg.format = o.format;
    else if (QEMU_FORMATS.has(o.format)) throw new Error(`Ferry opens raw and qcow2 images only, not '${o.format}'`);
    else throw new Error(`Unknown driver '${o.format}'`);
  }
  if (o.readonly !== undefined && o['read-only'] !== undefined) {
    throw new Error("'read-only' and its alias 'readonly' can't be used at the same time");
  }
  const ro = o['read-only'] ?? o.readonly;
  if (ro !== undefined) cfg.readOnly = parseBool(ro, 'read-only');
  return placement(o, cfg);
}

/** The options every drive has: if, index, id, cache. */
function placement(o: Record<string, string>, cfg: DriveConfig): DriveConfig {
  if (o.if !== undefined) {
    if ((DRIVE_INTERFACES as readonly string[]).includes(o.if)) cfg.interface = o.if as DriveInterface;
    else if (QEMU_INTERFACES.has(o.if)) throw new Error(`machine type does not support if=${o.if} (Ferry has if=ide, if=virtio and if=none)`);
    else throw new Error(`unsupported bus type '${o.if}'`);
  }
  if (o.index !== undefined) {
    if (!/^\d+$/.test(o.index)) throw new Error("Parameter 'index' expects a number");
    const n = Number(o.index);
    if (!Number.isSafeInteger(n)) throw new Error(`Value '${o.index}' is too large for parameter 'index'`);
    cfg.index = n;
  }
  if (o.id !== undefined) cfg.id = o.id;
  if (o.cache !== undefined) {
    if (!(CACHE_MODES as readonly string[]).includes(o.cache)) throw new Error('invalid cache option');
    cfg.cache = o.cache as CacheMode;
  }
  return cfg;
}
