/**
 * Layout of the shared control block and per-vCPU workload state.
 * Shared by the main thread (machine.ts) and the vCPU workers.
 *
 * ctl: Int32Array over a SharedArrayBuffer
 *   [CTL_CMD]       command: CMD_RUN / CMD_PAUSE / CMD_EXIT
 *   [CTL_SEQ]       bumped (and notified) on every command or throttle change;
 *                   sleeping workers Atomics.wait on it
 *   [CTL_THROTTLE]  throttle percentage 0..99
 *   [CTL_ACK + i]   vCPU i's acknowledged state (ACK_*), notified on change
 *
 * vstate: Float64Array over a SharedArrayBuffer, VS_STRIDE slots per vCPU.
 *   Written by the main thread only while the vCPU is paused (or before it
 *   started); written back by the worker when it pauses. VS_STEPS is also
 *   published by the running worker after every batch (for statistics).
 */

export const MAX_VCPUS = 64;

export const CTL_CMD = 0;
export const CTL_SEQ = 1;
export const CTL_THROTTLE = 2;
export const CTL_ACK = 16;
export const CTL_LENGTH = CTL_ACK + MAX_VCPUS;

export const CMD_RUN = 1;
export const CMD_PAUSE = 2;
export const CMD_EXIT = 3;

export const ACK_STARTING = 0;
export const ACK_RUNNING = 1;
export const ACK_PAUSED = 2;
export const ACK_EXITED = 3;

export const KIND_IDLE = 0;
export const KIND_SWEEP = 1;
export const KIND_STRESS = 2;

/* per-vCPU slots (Float64, integers stored exactly) */
export const VS_KIND = 0;
export const VS_SEED = 1;
/** workload range [WS_START, WS_END) in pages (sweep range / stress working set) */
export const VS_WS_START = 2;
export const VS_WS_END = 3;
export const VS_WRITE = 4;
/** bytes of pages per second, whole machine; 0 = unlimited */
export const VS_RATE = 5;
/** -1 = no limit */
export const VS_STEPS_LIMIT = 6;
export const VS_SMP = 7;
export const VS_INDEX = 8;
/** 1 when this vCPU writes at all */
export const VS_ACTIVE = 9;
/** this vCPU's stripe [STRIPE_START, STRIPE_END) in pages */
export const VS_STRIPE_START = 10;
export const VS_STRIPE_END = 11;
export const VS_STEPS = 12;
export const VS_RNG0 = 13; // ..16: xorshift128 state words (uint32)
export const VS_POS = 17;
export const VS_ROUND = 18;
/** number of active vCPUs sharing the rate */
export const VS_NACTIVE = 19;
export const VS_NSLOTS = 20;
export const VS_STRIDE = 32;

/** RAM blocks are cut at 2 GiB: physical page p lives in block p >>> BLOCK_PAGE_BITS. */
export const BLOCK_PAGE_BITS = 19;
export const BLOCK_PAGES = 1 << BLOCK_PAGE_BITS;
export const BLOCK_PAGE_MASK = BLOCK_PAGES - 1;
export const MAX_BLOCK_SIZE = BLOCK_PAGES * 4096; // 2 GiB
