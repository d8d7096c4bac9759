/**
 * One-shot sections: one FULL section per MigratableDevice
 * (docs/spec/stream-format.md §5, §7) with the payload framing rule of
 * machine/types.ts, the loader that reads one back, and the vmdesc trailer
 * JSON (§8).
 */
import type { MigratableDevice } from '../../machine/types.js';
import { classifyLoadError } from '../errors.js';
import { StreamReader } from '../stream/reader.js';
import type { ByteSink } from '../stream/writer.js';
import { WIRE } from '../wire/constants.js';
import { MigrationStreamError } from '../wire/errors.js';
import { putFooter, putSectionStartFull } from '../wire/records.js';
import type { SectionLoader } from './section.js';

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

/** The device with this (idstr, instance), if any. */
export function findDevice(devices: readonly MigratableDevice[], idstr: string, instanceId: number): MigratableDevice | undefined {
  return devices.find((d) => d.idstr === idstr && d.instanceId === instanceId);
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
 * The loader of a device's FULL section: reads the payload (raw when the
 * device has a fixed size for that version, else be32-framed) and hands a
 * copy to the device. A plain Error from the device's load() (its own
 * validation) fails the migration as a bad stream; anything else is a bug.
 */
export function deviceLoader(device: MigratableDevice, opts: { maxPayload?: number } = {}): SectionLoader {
  return {
    async load(r: StreamReader, _kind, version: number): Promise<void> {
      let len = fixedSize(device, version);
      if (len === undefined) {
        if (!r.has(4)) await r.ensure(4);
        len = StreamReader.checkLength(r.get32(), opts.maxPayload ?? WIRE.LIMITS.DEVICE_PAYLOAD_MAX, `the '${device.idstr}' payload`);
      }
      if (!r.has(len)) await r.ensure(len);
      const data = Buffer.from(r.getBytes(len)); // a copy the device may keep
      try {
        device.load(data, version);
      } catch (e) {
        throw classifyLoadError(e, (msg, cause) => new MigrationStreamError(msg, { cause }));
      }
    },
  };
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
