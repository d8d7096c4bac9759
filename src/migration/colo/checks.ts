/**
 * What `migrate` refuses when x-colo is on (checked with the other
 * synchronous checks of MigrationSource.start, in QEMU's order).
 */
import type { MigrationOptions } from '../core/options.js';
import type { MachinePort } from '../core/port.js';
import { MigrationError } from '../errors.js';

export function checkColoMigrate(options: MigrationOptions, machine: MachinePort, flags: { blk?: boolean; inc?: boolean }): void {
  if (!options.capability('x-colo')) return;
  // QEMU 7.2's text (migrate_prepare); the block capability would send disks too
  if (flags.blk || flags.inc || options.capability('block')) throw new MigrationError('No disk migration is required in COLO mode');
  if (options.capability('postcopy-ram')) throw new MigrationError('COLO is not compatible with postcopy');
  // disks under COLO need block replication (docs/colo.md): a guest writing a shared image on both sides would corrupt it
  if (machine.devices.some((d) => d.idstr === 'ferry-disk-workload' && d.needed?.() !== false)) {
    throw new MigrationError('COLO cannot replicate the disk workload: disks under COLO are not supported yet');
  }
}
