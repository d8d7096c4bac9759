/**
 * Layout of the shared control block and per-vCPU workload state.
 * Shared by the main thread (vcpus.ts, demand-paging.ts, vcpu-slots.ts)
 * and the vCPU workers (vcpu-worker.ts).
 *
 * ctl: Int32Array over a SharedArrayBuffer
 *   [CTL_CMD]       command: CMD_RUN / CMD_PAUSE / CMD_EXIT
 *   [CTL_SEQ]       bumped (and notified) on every command or throttle change;
 *                   sleeping workers Atomics.wait on it
 *   [CTL_THROTTLE]  throttle percentage 0..99
 *   [CTL_DEMAND]    1 = demand paging on: a vCPU checks a page's `present`
 *                   bit (Atomics.load) before touching it and blocks on a
 *                   missing page until the bit is set
 *   [CTL_FAULT_WAITERS] number of vCPUs now blocked on a missing page
 *   [CTL_FAULT_COUNT]   faults resolved since beginDemandPaging (the slot
 *                   of the next latency sample is this % FAULT_RING)
 *   [CTL_ACK + i]   vCPU i's acknowledged state (ACK_*; 0 until its first
 *                   acknowledgement), notified on change
 *   [CTL_BLOCKED + i] 1 while vCPU i waits for a missing page
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
export const CTL_DEMAND = 3;
export const CTL_FAULT_WAITERS = 4;
export const CTL_FAULT_COUNT = 5;
export const CTL_ACK = 16;
/** CTL_BLOCKED + i: 1 while vCPU i waits for a missing page */
export const CTL_BLOCKED = CTL_ACK + MAX_VCPUS;
export const CTL_LENGTH = CTL_BLOCKED + MAX_VCPUS;

/** Fault latency samples kept (a ring of Float64 µs values). */
export const FAULT_RING = 65536;

export const CMD_RUN = 1;
export const CMD_PAUSE = 2;
export const CMD_EXIT = 3;

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
/** stress read=on: 1 when every step also reads a byte of another page of the stripe */
export const VS_READ = 20;
/** stress read=on: 32-bit checksum of the bytes read, sum = (sum*31 + byte) >>> 0 */
export const VS_SUM = 21;
export const VS_NSLOTS = 22;
/** slot count of ferry-vcpu version 1 (before VS_READ / VS_SUM) */
export const VS_NSLOTS_V1 = 20;
export const VS_STRIDE = 32;

/** RAM blocks are cut at 2 GiB: physical page p lives in block p >>> BLOCK_PAGE_BITS. */
export const BLOCK_PAGE_BITS = 19;
export const BLOCK_PAGES = 1 << BLOCK_PAGE_BITS;
export const BLOCK_PAGE_MASK = BLOCK_PAGES - 1;
export const MAX_BLOCK_SIZE = BLOCK_PAGES * 4096; // 2 GiB
