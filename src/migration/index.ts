/** Public surface of the migration engine. */
export { MigrationSource, type MigrateFlags, type SourceDeps } from './core/source.js';
export { MigrationDestination, type DestinationDeps } from './core/destination.js';
export { MigrationOptions, CAPABILITIES, DEFAULT_PARAMETERS } from './core/options.js';
export { MigrationError, MigrationFailure, type FailureKind, type MigrationPhase } from './errors.js';
export { machinePort } from './core/machine-port.js';
export type { MachinePort, DrivePort } from './core/port.js';
export { saveDevicesOnly } from './core/devices-only.js';
export { SectionRegistry } from './sections/registry.js';
export type { SectionType, LiveSection, SectionLoader } from './sections/section.js';
export { RAM_SECTION } from './ram/section.js';
export { BLOCK_SECTION } from './block/section.js';
export { BLOCK_DRIVES_SECTION } from './block/drives-check.js';
export { TLS_HANDSHAKE_TIMEOUT_MS, type TlsDeps, type TlsCredsLookup } from './channel/tls.js';
export { inspectStream, formatInspection, type InspectedRecord, type InspectedSection, type RamRecord } from './inspect.js';
export { MigrationObserver, DirtyRateError, ForecastError, TraceError, type ObserverDeps } from './observe/index.js';
export { ColoService, type ColoReplication } from './colo/index.js';
export { MultifdWorkers } from './multifd/workers.js';
