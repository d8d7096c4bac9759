/**
 * Block replication (QEMU's docs/block-replication.txt): the primary's
 * drive mirrors its writes to the secondary's NBD export; the secondary's
 * drive keeps its own guest's writes and the old data under the primary's
 * in overlays, so that checkpoints and failovers leave defined disks.
 * Imports nbd/, block/ and base/.
 */
export { parseReplicatedDrive, ReplicationConfigError, type PrimaryConfig, type ReplicatedDriveSpec, type ReplicationConfig, type SecondaryConfig } from './config.js';
export { ReplicationError, type FailureSink, type ReplicationMode, type ReplicationNode, type ReplicationStage, type SecondaryDisk, type WriteHook } from './node.js';
export { ReplicationPrimary } from './primary.js';
export { ReplicationSecondary } from './secondary.js';
export { ReplicationSet } from './set.js';
