/**
 * The device-only stream of xen-save-devices-state (docs/spec/qmp.md B.16):
 * magic, version 3, one FULL section per device, EOF. No configuration
 * record and no vmdesc trailer.
 */
import type { MigratableDevice } from '../../machine/types.js';
import { writeDeviceSections } from '../sections/device-sections.js';
import { BufferSink } from '../stream/writer.js';
import { putEof, putHeader } from '../wire/records.js';

export function saveDevicesOnly(devices: readonly MigratableDevice[]): Buffer {
  const w = new BufferSink();
  putHeader(w);
  writeDeviceSections(w, devices, 0);
  putEof(w);
  return w.toBuffer();
}
