/**
 * The codec of the vCPU state slots: a WorkloadConfig to the Float64 slots of
 * every vCPU (layout.ts VS_*), the validation of slots received from a
 * migration source, and slots back to the workload description.
 *
 *   resolveWorkload  config -> the workload with its defaults filled in, checked against the RAM size
 *   encodeWorkload   resolved workload -> each vCPU's slots (parameters, stripe, fresh PRNG state)
 *   validateSlots    slots of one vCPU from a stream -> throws on anything a worker must not run
 *   decodeWorkload   slots -> the resolved workload they were encoded from
 *
 * decodeWorkload(encodeWorkload(resolveWorkload(w))[i]) equals
 * resolveWorkload(w) for every vCPU i. The vCPU worker reads the slots by
 * their layout.ts indices itself (its inner loop).
 */
import {
  KIND_IDLE,
  KIND_STRESS,
  KIND_SWEEP,
  VS_ACTIVE,
  VS_INDEX,
  VS_KIND,
  VS_NACTIVE,
  VS_NSLOTS,
  VS_POS,
  VS_RATE,
  VS_READ,
  VS_RNG0,
  VS_ROUND,
  VS_SEED,
  VS_SMP,
  VS_STEPS,
  VS_STEPS_LIMIT,
  VS_STRIPE_END,
  VS_STRIPE_START,
  VS_SUM,
  VS_WRITE,
  VS_WS_END,
  VS_WS_START,
} from './layout.js';
import { seedXorshift } from './workload.js';
import { TARGET_PAGE_SIZE, type WorkloadConfig } from './types.js';

/** A workload with its defaults filled in: what the slots describe (and `Machine.workload` reports). */
export type ResolvedWorkload =
  | { kind: 'idle' }
  | { kind: 'sweep'; start: number; end: number; steps?: number }
  | { kind: 'stress'; start: number; wss: number; write: number; rate: number; seed: number; steps?: number; read?: boolean };

/** Page of a page-aligned guest address (a workload bound). */
function pageOf(v: number, what: string): number {
  if (!Number.isSafeInteger(v) || v < 0) throw new Error(`workload ${what} ${v} is not a valid address`);
  if (v % TARGET_PAGE_SIZE !== 0) throw new Error(`workload ${what} 0x${v.toString(16)} is not page aligned`);
  return v / TARGET_PAGE_SIZE;
}

function checkSteps(s: number | undefined): void {
  if (s === undefined) return;
  if (!Number.isSafeInteger(s) || s < 0) throw new Error(`workload steps ${s} must be a non-negative integer`);
}

/** `{ steps }` when a step limit is set, else nothing (so the description has no `steps: undefined`). */
function stepsField(steps: number | undefined): { steps?: number } {
  return steps !== undefined ? { steps } : {};
}

/** Fills in a workload's defaults and checks it against the RAM size (throws Error with the reason). */
export function resolveWorkload(w: WorkloadConfig, ramSize: number): ResolvedWorkload {
  const pages = ramSize / TARGET_PAGE_SIZE;
  if (w.kind === 'idle') return { kind: 'idle' };
  if (w.kind === 'sweep') {
    const start = w.start ?? Math.min(1 << 20, ramSize - TARGET_PAGE_SIZE);
    const end = w.end ?? ramSize;
    const sp = pageOf(start, 'sweep start');
    const ep = pageOf(end, 'sweep end');
    if (ep > pages) throw new Error(`sweep end 0x${end.toString(16)} is beyond RAM size 0x${ramSize.toString(16)}`);
    if (sp >= ep) throw new Error(`sweep range [0x${start.toString(16)}, 0x${end.toString(16)}) is empty`);
    checkSteps(w.steps);
    return { kind: 'sweep', start, end, ...stepsField(w.steps) };
  }
  if (w.kind === 'stress') {
    const start = w.start ?? 0;
    const sp = pageOf(start, 'stress start');
    if (sp >= pages) throw new Error(`stress start 0x${start.toString(16)} is beyond RAM size`);
    const wss = w.wss ?? ramSize - start;
    if (!Number.isSafeInteger(wss) || wss < TARGET_PAGE_SIZE) throw new Error(`stress wss ${wss} must be at least one page`);
    const np = Math.floor(wss / TARGET_PAGE_SIZE);
    if (sp + np > pages) {
      throw new Error(
        `stress working set [0x${start.toString(16)}, +0x${wss.toString(16)}) is beyond RAM size 0x${ramSize.toString(16)}`,
      );
    }
    const write = w.write ?? 8;
    if (!Number.isInteger(write) || write < 1 || write > 4096) throw new Error(`stress write ${write} must be 1..4096 bytes`);
    const rate = w.rate ?? 0;
    if (!Number.isFinite(rate) || rate < 0) throw new Error(`stress rate ${rate} must be >= 0`);
    const seed = w.seed ?? 0;
    if (!Number.isInteger(seed) || seed < 0 || seed > 0xffffffff) throw new Error(`stress seed ${seed} must be 0..4294967295`);
    checkSteps(w.steps);
    return {
      kind: 'stress',
      start,
      wss: np * TARGET_PAGE_SIZE,
      write,
      rate,
      seed,
      ...stepsField(w.steps),
      ...(w.read ? { read: true } : {}),
    };
  }
  throw new Error(`Unknown workload kind '${(w as { kind: string }).kind}'`);
}

/**
 * The slots of each of `smp` vCPUs for a workload from resolveWorkload:
 * the workload parameters (the same in every vCPU), the vCPU's stripe of
 * the workload range, zero steps and a fresh PRNG state.
 */
export function encodeWorkload(w: ResolvedWorkload, smp: number): Float64Array[] {
  const out: Float64Array[] = [];
  for (let i = 0; i < smp; i++) {
    const s = new Float64Array(VS_NSLOTS);
    s[VS_SMP] = smp;
    s[VS_INDEX] = i;
    out.push(s);
  }
  if (w.kind === 'idle') return out;
  const sp = w.start / TARGET_PAGE_SIZE;
  const ep = w.kind === 'sweep' ? w.end / TARGET_PAGE_SIZE : sp + w.wss / TARGET_PAGE_SIZE;
  const limit = w.steps ?? -1;
  for (const s of out) {
    s[VS_WS_START] = sp;
    s[VS_WS_END] = ep;
    s[VS_STEPS_LIMIT] = limit;
  }
  if (w.kind === 'sweep') {
    // one vCPU sweeps the whole range
    for (const s of out) {
      s[VS_KIND] = KIND_SWEEP;
      s[VS_NACTIVE] = 1;
    }
    const s0 = out[0]!;
    s0[VS_ACTIVE] = 1;
    s0[VS_STRIPE_START] = sp;
    s0[VS_STRIPE_END] = ep;
    s0[VS_POS] = sp;
    return out;
  }
  // stress: one disjoint stripe per vCPU, as many vCPUs as there are pages at most
  const np = ep - sp;
  const nActive = Math.min(smp, np);
  const seed = w.seed;
  for (let i = 0; i < smp; i++) {
    const s = out[i]!;
    s[VS_KIND] = KIND_STRESS;
    s[VS_SEED] = seed;
    s[VS_WRITE] = w.write;
    s[VS_RATE] = w.rate;
    s[VS_NACTIVE] = nActive;
    s[VS_READ] = w.read ? 1 : 0;
    if (i < nActive) {
      s[VS_ACTIVE] = 1;
      s[VS_STRIPE_START] = sp + Math.floor((i * np) / nActive);
      s[VS_STRIPE_END] = sp + Math.floor(((i + 1) * np) / nActive);
      const r = seedXorshift(seed, i);
      for (let k = 0; k < 4; k++) s[VS_RNG0 + k] = r[k]!;
    }
  }
  return out;
}

/**
 * Checks the slots of vCPU `index` received from a migration source against
 * this machine (`smp` vCPUs, `pages` pages of RAM): everything a worker
 * relies on. Throws Error with `ferry-vcpu <index>: <reason>`.
 */
export function validateSlots(index: number, s: Float64Array, smp: number, pages: number): void {
  const p = `ferry-vcpu ${index}`;
  if (index < 0 || index >= smp) throw new Error(`${p}: no such vCPU (smp=${smp})`);
  if (s.length !== VS_NSLOTS) throw new Error(`${p}: ${s.length} state slots, expected ${VS_NSLOTS}`);
  for (let k = 0; k < s.length; k++) {
    if (!Number.isSafeInteger(s[k]!) && !(k === VS_RATE && Number.isFinite(s[k]!))) {
      throw new Error(`${p}: state slot ${k} is not an integer (${s[k]})`);
    }
  }
  if (s[VS_SMP] !== smp) throw new Error(`${p}: source has ${s[VS_SMP]} vCPUs, this machine has ${smp}`);
  if (s[VS_INDEX] !== index) throw new Error(`${p}: state is for vCPU ${s[VS_INDEX]}`);
  const kind = s[VS_KIND]!;
  if (kind !== KIND_IDLE && kind !== KIND_SWEEP && kind !== KIND_STRESS) throw new Error(`${p}: unknown workload kind ${kind}`);
  const inRam = (a: number, b: number): boolean => a >= 0 && a <= b && b <= pages;
  if (!inRam(s[VS_WS_START]!, s[VS_WS_END]!)) {
    throw new Error(`${p}: workload range pages [${s[VS_WS_START]}, ${s[VS_WS_END]}) does not fit in ${pages} pages of RAM`);
  }
  if (s[VS_STEPS]! < 0 || s[VS_STEPS_LIMIT]! < -1 || s[VS_RATE]! < 0 || s[VS_SEED]! < 0 || s[VS_SEED]! > 0xffffffff) {
    throw new Error(`${p}: negative steps, limit, rate or bad seed`);
  }
  if (s[VS_ACTIVE] === 1) {
    if (kind === KIND_IDLE) throw new Error(`${p}: idle vCPU marked active`);
    const a = s[VS_STRIPE_START]!;
    const b = s[VS_STRIPE_END]!;
    if (!(a >= s[VS_WS_START]! && a < b && b <= s[VS_WS_END]!)) throw new Error(`${p}: stripe [${a}, ${b}) outside the workload range`);
    if (kind === KIND_STRESS) {
      const w = s[VS_WRITE]!;
      if (w < 1 || w > 4096) throw new Error(`${p}: write size ${w} out of range 1..4096`);
      let any = 0;
      for (let k = 0; k < 4; k++) {
        const v = s[VS_RNG0 + k]!;
        if (v < 0 || v > 0xffffffff) throw new Error(`${p}: PRNG word ${v} out of range`);
        any += v;
      }
      if (any === 0) throw new Error(`${p}: PRNG state is all zero`);
      if (s[VS_READ] !== 0 && s[VS_READ] !== 1) throw new Error(`${p}: bad read flag ${s[VS_READ]}`);
      if (s[VS_SUM]! < 0 || s[VS_SUM]! > 0xffffffff) throw new Error(`${p}: read checksum ${s[VS_SUM]} out of range`);
    } else {
      if (s[VS_POS]! < a || s[VS_POS]! >= b) throw new Error(`${p}: sweep position ${s[VS_POS]} outside [${a}, ${b})`);
      if (s[VS_ROUND]! < 0) throw new Error(`${p}: negative sweep round`);
    }
  } else if (s[VS_ACTIVE] !== 0) {
    throw new Error(`${p}: bad active flag ${s[VS_ACTIVE]}`);
  }
}

/** The workload description that (validated) slots were encoded from; every vCPU's slots give the same. */
export function decodeWorkload(s: Float64Array): ResolvedWorkload {
  const kind = s[VS_KIND]!;
  if (kind === KIND_IDLE) return { kind: 'idle' };
  const start = s[VS_WS_START]! * TARGET_PAGE_SIZE;
  const end = s[VS_WS_END]! * TARGET_PAGE_SIZE;
  const steps = stepsField(s[VS_STEPS_LIMIT]! >= 0 ? s[VS_STEPS_LIMIT]! : undefined);
  if (kind === KIND_SWEEP) return { kind: 'sweep', start, end, ...steps };
  return {
    kind: 'stress',
    start,
    wss: end - start,
    write: s[VS_WRITE]!,
    rate: s[VS_RATE]!,
    seed: s[VS_SEED]!,
    ...steps,
    ...(s[VS_READ] === 1 ? { read: true } : {}),
  };
}
