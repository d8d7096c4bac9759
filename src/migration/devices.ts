/**
 * Device sections: one FULL section per MigratableDevice (stream-format.md
 * §5, §7), the payload framing rule of machine/types.ts, and the vmdesc
 * trailer JSON (§8).
 */
import type { MigratableDevice } from '../machine/types.js';
import { StreamReader } from './stream/reader.js';
import type { ByteSink } from './stream/writer.js';
import { WIRE } from './wire/constants.js';
import { ERR, MigrationStreamError } from './wire/errors.js';
import { checkSectionVersion, putFooter, putSectionStartFull, readFooter, readSectionStartFull } from './wire/records.js';

export interface VmdescField {
  name: string;
  type: string;
  size: number;
}

export interface VmdescEntry {
  name: string;
  instance_id: number;
  vmsd_name: string;
  version: number;
  fields: VmdescField[];
}

/** Key of devicesByKey maps: `${idstr}:${instanceId}`. */
export function deviceKey(idstr: string, instanceId: number): string {
  return `${idstr}:${instanceId}`;
}

/** Map devices by (idstr, instance) for readDeviceSection. */
export function devicesByKey(devices: readonly MigratableDevice[]): Map<string, MigratableDevice> {
  const m = new Map<string, MigratableDevice>();
  for (const d of devices) m.set(deviceKey(d.idstr, d.instanceId), d);
  return m;
}

/** QEMU's own field lists for the fixed layouts we share with it. */
const KNOWN_FIELDS: Record<string, { version: number; size: number; fields: VmdescField[] }> = {
  timer: {
    version: 2,
    size: 24,
    fields: [
      { name: 'cpu_ticks_offset', type: 'int64', size: 8 },
      { name: 'unused', type: 'unused_buffer', size: 8 },
      { name: 'cpu_clock_offset', type: 'int64', size: 8 },
    ],
  },
  globalstate: {
    version: 1,
    size: 104,
    fields: [
      { name: 'size', type: 'uint32', size: 4 },
      { name: 'runstate', type: 'buffer', size: 100 },
    ],
  },
};

function fixedSize(d: MigratableDevice, version: number): number | undefined {
  const n = d.payloadSize?.(version);
  return typeof n === 'number' ? n : undefined;
}

/**
 * Write one FULL section per device whose needed() is not false, with
 * consecutive section ids from nextSectionId. Returns the vmdesc entries
 * and the next free section id.
 */
export function writeDeviceSections(
  w: ByteSink,
  devices: readonly MigratableDevice[],
  nextSectionId: number,
): { entries: VmdescEntry[]; nextSectionId: number } {
  const entries: VmdescEntry[] = [];
  let id = nextSectionId;
  for (const d of devices) {
    if (d.needed && d.needed() === false) continue;
    const payload = d.save();
    const fixed = fixedSize(d, d.version);
    if (fixed !== undefined && payload.length !== fixed) {
      throw new MigrationStreamError(`Device '${d.idstr}' saved ${payload.length} bytes, its layout has ${fixed}`);
    }
    putSectionStartFull(w, WIRE.SECTION.FULL, id, d.idstr, d.instanceId, d.version);
    let size = payload.length;
    if (fixed === undefined) {
      w.put32(payload.length);
      size += 4;
    }
    w.putBytes(payload);
    putFooter(w, id);
    const known = KNOWN_FIELDS[d.idstr];
    const fields =
      known && known.version === d.version && known.size === size && fixed !== undefined
        ? known.fields.map((f) => ({ ...f }))
        : [{ name: 'data', type: 'buffer', size }];
    entries.push({ name: d.idstr, instance_id: d.instanceId, vmsd_name: d.idstr, version: d.version, fields });
    id++;
  }
  return { entries, nextSectionId: id };
}

/**
 * After the 0x04 (FULL) type byte: read the section header, find the device
 * by (idstr, instance), check versions, read the payload (raw when the device
 * has a fixed size for that version, else be32-framed), load it, check the
 * footer.
 */
export async function readDeviceSection(
  r: StreamReader,
  byKey: ReadonlyMap<string, MigratableDevice>,
  opts: { maxPayload?: number } = {},
): Promise<{ device: MigratableDevice; sectionId: number; versionId: number; size: number }> {
  const h = await readSectionStartFull(r);
  const device = byKey.get(deviceKey(h.idstr, h.instanceId));
  if (!device) throw new MigrationStreamError(ERR.unknownSection(h.idstr, h.instanceId));
  checkSectionVersion(h.idstr, h.versionId, device.version, device.minVersion);
  let len = fixedSize(device, h.versionId);
  if (len === undefined) {
    if (!r.has(4)) await r.ensure(4);
    len = StreamReader.checkLength(r.get32(), opts.maxPayload ?? WIRE.LIMITS.DEVICE_PAYLOAD_MAX, `the '${h.idstr}' payload`);
  }
  if (!r.has(len)) await r.ensure(len);
  const data = Buffer.from(r.getBytes(len)); // a copy the device may keep
  device.load(data, h.versionId);
  await readFooter(r, h.idstr, h.sectionId);
  return { device, sectionId: h.sectionId, versionId: h.versionId, size: len };
}

/** JSON text the way QEMU's JSON writer spaces it (", " and ": "). */
function qjson(v: unknown): string {
  if (Array.isArray(v)) return '[' + v.map(qjson).join(', ') + ']';
  if (v !== null && typeof v === 'object') {
    return (
      '{' +
      Object.entries(v as Record<string, unknown>)
        .filter(([, x]) => x !== undefined)
        .map(([k, x]) => JSON.stringify(k) + ': ' + qjson(x))
        .join(', ') +
      '}'
    );
  }
  return JSON.stringify(v);
}

/** The vmdesc trailer JSON: {"page_size": 4096, "devices": [...]}. */
export function buildVmdesc(entries: readonly VmdescEntry[], pageSize = WIRE.LIMITS.TARGET_PAGE_SIZE): string {
  return qjson({ page_size: pageSize, devices: entries });
}
