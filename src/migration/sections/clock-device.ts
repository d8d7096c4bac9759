/**
 * `ferry-migration`: a device section of our own that carries the source's
 * wall-clock time at the moment its vCPUs stopped for switchover, so that the
 * destination can report the real downtime (source stop → destination guest
 * running). Both ends read the same host clock when they run on one machine;
 * across hosts the figure includes the clock offset between them.
 */
import type { MigratableDevice } from '../../machine/types.js';

/** Wall-clock time in microseconds. */
export function wallClockUs(): number {
  return Math.round((performance.timeOrigin + performance.now()) * 1000);
}

export class MigrationClockDevice implements MigratableDevice {
  readonly idstr = 'ferry-migration';
  readonly instanceId = 0;
  readonly version = 1;
  readonly minVersion = 1;

  constructor(public stopWallUs = 0) {}

  save(): Uint8Array {
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(BigInt(this.stopWallUs));
    return b;
  }

  load(data: Uint8Array, version: number): void {
    if (version !== 1 || data.length !== 8) {
      throw new Error(`ferry-migration: bad payload (${data.length} bytes, version ${version})`);
    }
    this.stopWallUs = Number(Buffer.from(data.buffer, data.byteOffset, 8).readBigUInt64BE());
  }
}
