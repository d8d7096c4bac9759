/**
 * What `migrate` refuses when x-colo is on (checked with the other
 * synchronous checks of MigrationSource.start, in QEMU's order).
 */
import type { MigrationOptions } from '../core/options.js';
import { MigrationError } from '../errors.js';
import type { ColoService } from './service.js';

export function checkColoMigrate(options: MigrationOptions, flags: { blk?: boolean; inc?: boolean }, colo: ColoService): void {
  if (!options.capability('x-colo')) return;
  // QEMU 7.2's text (migrate_prepare); the block capability would send disks too
  if (flags.blk || flags.inc || options.capability('block')) throw new MigrationError('No disk migration is required in COLO mode');
  if (options.capability('postcopy-ram')) throw new MigrationError('COLO is not compatible with postcopy');
  // disks under COLO need block replication (docs/colo.md): the registered layer says what it cannot replicate
  const why = colo.refusal();
  if (why !== null) throw new MigrationError(why);
}
