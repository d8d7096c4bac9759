/**
 * The replicated drives' `-drive` options, modelled on QEMU's block
 * replication command lines (docs/block-replication.txt in QEMU; Ferry's
 * differences are in docs/replication.md):
 *
 * Primary: a quorum over the local image and a replication child whose
 * file is the secondary's NBD export.
 *   driver=quorum,vote-threshold=1,read-pattern=fifo,
 *   children.0.driver=raw|qcow2,children.0.file.filename=PATH,
 *   children.1.driver=replication,children.1.mode=primary,
 *   children.1.file.driver=nbd,children.1.file.path=SOCKET | .host=H,.port=P
 *     | .server.type=unix,.server.path=SOCKET | .server.type=inet,.server.host=H,.server.port=P
 *     | .filename=nbd://... ,children.1.file.export=NAME
 * (QEMU opens the quorum with one child and attaches the replication
 * child at run time with drive_add and x-blockdev-change; Ferry takes it on
 * the command line and connects when replication starts.)
 *
 * Secondary: the replication filter over the active disk, whose backing
 * is the hidden disk, whose backing is the secondary disk (another drive,
 * the one exported over NBD).
 *   driver=replication,mode=secondary,top-id=ID,
 *   file.driver=qcow2,file.file.filename=ACTIVE,
 *   file.backing.driver=qcow2,file.backing.file.filename=HIDDEN,
 *   file.backing.backing=SECONDARY-DRIVE-ID
 *
 * Parsing is pure: the checks against other drives and files happen when
 * the machine opens its drives.
 */
import type { ImageFormat } from '../block/index.js';
import { parseNbdUri, type NbdAddress } from '../nbd/index.js';

export interface PrimaryConfig {
  mode: 'primary';
  /** The local image (children.0). */
  file: string;
  format?: ImageFormat;
  /** Where the secondary's export is (children.1.file). */
  nbd: NbdAddress;
  exportName: string;
}

export interface SecondaryConfig {
  mode: 'secondary';
  topId: string;
  active: string;
  hidden: string;
  /** The block backend name of the secondary disk (file.backing.backing). */
  secondary: string;
}

export type ReplicationConfig = PrimaryConfig | SecondaryConfig;

/** What a replicated -drive is: the image file the drive names (query-block's file), and the replication part. */
export interface ReplicatedDriveSpec {
  file: string;
  format?: ImageFormat;
  replication: ReplicationConfig;
}

/** A -drive option Ferry's replicated drives do not take. */
export class ReplicationConfigError extends Error {
  override name = 'ReplicationConfigError';
}

const fail = (m: string) => new ReplicationConfigError(m);

function format(v: string | undefined, what: string): ImageFormat | undefined {
  if (v === undefined) return undefined;
  if (v === 'raw' || v === 'qcow2') return v;
  throw fail(`${what}: Ferry opens raw and qcow2 images only, not '${v}'`);
}

/** The keys under `prefix` (without it), e.g. sub(o, 'children.1.') */
function sub(o: Record<string, string>, prefix: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(o)) if (k.startsWith(prefix)) out[k.slice(prefix.length)] = v;
  return out;
}

function only(o: Record<string, string>, allowed: readonly string[], what: string): void {
  for (const k of Object.keys(o)) {
    if (!allowed.includes(k)) throw fail(`Ferry's ${what} does not take the option '${k}'`);
  }
}

/** QEMU's nbd block driver options: host/port/path/export, server.*, or a filename URI. */
function nbdAddress(f: Record<string, string>): { address: NbdAddress; exportName: string } {
  only(f, ['driver', 'host', 'port', 'path', 'export', 'filename', 'server.type', 'server.host', 'server.port', 'server.path', 'node-name'], 'NBD replication child');
  if (f.driver !== 'nbd') throw fail("the primary's replication child needs file.driver=nbd (the secondary's NBD export)");
  if (f.filename !== undefined) {
    try {
      const t = parseNbdUri(f.filename);
      return { address: t.address, exportName: f.export ?? t.exportName };
    } catch (e) {
      throw fail((e as Error).message);
    }
  }
  const port = (p: string | undefined): number => {
    if (p === undefined) return 10809;
    if (!/^\d+$/.test(p) || Number(p) > 65535) throw fail(`Parameter 'port' expects a port number, not '${p}'`);
    return Number(p);
  };
  const type = f['server.type'];
  const exportName = f.export ?? '';
  if (type === 'unix' || (type === undefined && (f['server.path'] !== undefined || f.path !== undefined))) {
    const path = f['server.path'] ?? f.path;
    if (path === undefined || path === '') throw fail("Parameter 'server.path' is missing");
    return { address: { kind: 'unix', path }, exportName };
  }
  if (type === 'inet' || type === undefined) {
    const host = f['server.host'] ?? f.host;
    if (host === undefined) throw fail('NBD server address missing');
    return { address: { kind: 'inet', host, port: port(f['server.port'] ?? f.port) }, exportName };
  }
  throw fail(`Parameter 'server.type' does not accept value '${type}' (Ferry's NBD client connects to inet and unix)`);
}

/** A -drive with driver=quorum or driver=replication (`o` is the whole option map). */
export function parseReplicatedDrive(o: Record<string, string>): ReplicatedDriveSpec {
  if (o.driver === 'replication') return parseSecondary(o);
  if (o.driver === 'quorum') return parsePrimary(o);
  throw fail(`not a replicated drive: driver=${o.driver ?? ''}`);
}

const DRIVE_KEYS = ['driver', 'if', 'index', 'id', 'cache', 'readonly', 'read-only', 'node-name'];

function parseSecondary(o: Record<string, string>): ReplicatedDriveSpec {
  const mode = o.mode;
  if (mode === undefined) throw fail('Missing the option mode');
  if (mode !== 'primary' && mode !== 'secondary') throw fail("The option mode's value should be primary or secondary");
  if (mode === 'primary') {
    if (o['top-id'] !== undefined) throw fail('The primary side does not support option top-id');
    throw fail(
      "Ferry's primary replication drive is a quorum: driver=quorum,vote-threshold=1,children.0.driver=raw,children.0.file.filename=DISK,children.1.driver=replication,children.1.mode=primary,children.1.file.driver=nbd,... (docs/replication.md)",
    );
  }
  const topId = o['top-id'];
  if (topId === undefined) throw fail('Missing the option top-id');
  only(
    o,
    [...DRIVE_KEYS, 'mode', 'top-id', 'file.driver', 'file.file.filename', 'file.file.driver', 'file.backing.driver', 'file.backing.file.filename', 'file.backing.file.driver', 'file.backing.backing'],
    'secondary replication drive',
  );
  const active = o['file.file.filename'];
  const hidden = o['file.backing.file.filename'];
  const secondary = o['file.backing.backing'];
  if (active === undefined) throw fail('A block device must be specified for "file"');
  if (hidden === undefined) throw fail("the active disk needs its hidden disk: file.backing.file.filename=HIDDEN,file.backing.driver=qcow2");
  if (secondary === undefined) throw fail("the hidden disk needs the secondary disk: file.backing.backing=DRIVE-ID");
  for (const [k, what] of [['file.driver', 'active disk'], ['file.backing.driver', 'hidden disk']] as const) {
    const f = format(o[k], what);
    if (f === 'raw') throw fail(`the ${what} must be qcow2 (it needs a backing file and make_empty)`);
  }
  for (const k of ['file.file.driver', 'file.backing.file.driver']) {
    if (o[k] !== undefined && o[k] !== 'file') throw fail(`Ferry's replication overlays are files: ${k}=file`);
  }
  return { file: active, format: 'qcow2', replication: { mode: 'secondary', topId, active, hidden, secondary } };
}

function parsePrimary(o: Record<string, string>): ReplicatedDriveSpec {
  const vt = o['vote-threshold'];
  if (vt === undefined || !/^\d+$/.test(vt) || Number(vt) < 1) throw fail("Parameter 'vote-threshold' expects a value >= 1");
  const rp = o['read-pattern'];
  if (rp !== undefined && rp !== 'fifo' && rp !== 'quorum') throw fail('Please set read-pattern as fifo or quorum');
  if (rp === 'quorum') throw fail("Ferry's quorum reads children.0 only: read-pattern=fifo");
  const c0 = sub(o, 'children.0.');
  const c1 = sub(o, 'children.1.');
  const children = Object.keys(o).filter((k) => k.startsWith('children.')).map((k) => k.split('.')[1]!);
  for (const n of children) if (n !== '0' && n !== '1') throw fail(`Ferry's quorum has two children (the local disk and the replication child), not children.${n}`);
  if (Number(vt) > (Object.keys(c1).length > 0 ? 2 : 1)) throw fail('threshold may not exceed children count');
  if (Number(vt) !== 1) throw fail("Ferry's replicated quorum writes the local disk and the secondary and reads the local disk: vote-threshold=1");
  only(
    o,
    [...DRIVE_KEYS, 'vote-threshold', 'read-pattern', 'rewrite-corrupted', 'blkverify', ...Object.keys(c0).map((k) => `children.0.${k}`), ...Object.keys(c1).map((k) => `children.1.${k}`)],
    'quorum drive',
  );
  only(c0, ['driver', 'file.filename', 'file.driver', 'file', 'node-name'], 'quorum child 0');
  const file = c0['file.filename'] ?? c0.file;
  if (file === undefined || file === '') throw fail('A block device must be specified for "file"');
  if (c0['file.driver'] !== undefined && c0['file.driver'] !== 'file') throw fail('children.0 is an image file: children.0.file.driver=file');
  const fmt = format(c0.driver, 'children.0.driver');
  if (Object.keys(c1).length === 0) {
    throw fail("Ferry's quorum is a primary replicated drive: children.1.driver=replication,children.1.mode=primary,children.1.file.driver=nbd,... (Ferry cannot attach it later with x-blockdev-change)");
  }
  if (c1.driver !== 'replication') throw fail("Ferry's quorum takes a replication child as children.1 (children.1.driver=replication)");
  if (c1.mode === undefined) throw fail('Missing the option mode');
  if (c1.mode !== 'primary' && c1.mode !== 'secondary') throw fail("The option mode's value should be primary or secondary");
  if (c1['top-id'] !== undefined) throw fail('The primary side does not support option top-id');
  if (c1.mode !== 'primary') throw fail("Ferry's quorum replication child is the primary's: children.1.mode=primary");
  only(c1, ['driver', 'mode', 'node-name', ...Object.keys(sub(c1, 'file.')).map((k) => `file.${k}`)], 'replication child');
  const { address, exportName } = nbdAddress(sub(c1, 'file.'));
  return { file, ...(fmt !== undefined ? { format: fmt } : {}), replication: { mode: 'primary', file, ...(fmt !== undefined ? { format: fmt } : {}), nbd: address, exportName } };
}
