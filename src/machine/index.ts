export * from './types.js';
export { Machine } from './machine.js';
export { countDirty, clearDirty, type MemoryDigest } from './ram.js';
export { DEMAND_PAGING_RAM_ERROR } from './demand-paging.js';
export type { VcpuWorkloadInfo } from './vcpus.js';
export { checkSweep, type SweepMismatch } from './sweep-check.js';
export { parseWorkload, parseFill, formatWorkload } from './config.js';
export { encodeGlobalState, decodeGlobalState } from './device-state.js';
export { QAPI_RUN_STATES, canTransition, isRunState } from './run-state.js';
