/** COLO (x-colo): checkpoints to a hot standby, and failover. docs/colo.md. */
export { ColoService, type ColoReplication, type ReplicationEvent } from './service.js';
export { ColoPrimary, type PrimaryContext } from './primary.js';
export { ColoSecondary, type SecondaryContext } from './secondary.js';
export { ColoRequest } from './devices.js';
export { COLO_ERR } from './wire.js';
export { FAILOVER_ERR } from './failover.js';
export { checkColoMigrate } from './checks.js';
