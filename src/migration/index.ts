/** Public surface of the migration engine. */
export { MigrationSource, type MigrateFlags } from './core/source.js';
export { MigrationDestination } from './core/destination.js';
export { MigrationOptions, CAPABILITIES, DEFAULT_PARAMETERS } from './core/options.js';
export { MigrationError } from './core/errors.js';
export { machinePort } from './core/machine-port.js';
export type { MachinePort } from './core/port.js';
export { saveDevicesOnly } from './core/devices-only.js';
