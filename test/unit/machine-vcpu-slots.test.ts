import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  decodeWorkload,
  encodeWorkload,
  resolveWorkload,
  validateSlots,
} from '../../src/machine/vcpu-slots.js';
import { seedXorshift } from '../../src/machine/workload.js';
import {
  KIND_STRESS,
  KIND_SWEEP,
  VS_ACTIVE,
  VS_INDEX,
  VS_NSLOTS,
  VS_POS,
  VS_READ,
  VS_RNG0,
  VS_SMP,
  VS_STEPS,
  VS_STEPS_LIMIT,
  VS_STRIPE_END,
  VS_STRIPE_START,
  VS_WRITE,
} from '../../src/machine/layout.js';
import type { WorkloadConfig } from '../../src/machine/types.js';

const M = 1 << 20;

test('vCPU slots: decode(encode(w)) is the resolved workload, on every vCPU, and the slots validate', () => {
  const ram = 16 * M;
  const cases: WorkloadConfig[] = [
    { kind: 'idle' },
    { kind: 'sweep' },
    { kind: 'sweep', start: 0, end: 8 * M, steps: 5000 },
    { kind: 'stress' },
    { kind: 'stress', start: 4 * M, wss: 3 * M + 100, write: 1, rate: 2.5 * M, seed: 0xffffffff, steps: 0, read: true },
    { kind: 'stress', start: ram - 4096 * 2, wss: 8192, seed: 3 }, // fewer pages than vCPUs
  ];
  for (const w of cases) {
    const resolved = resolveWorkload(w, ram);
    for (const smp of [1, 3, 4]) {
      const slots = encodeWorkload(resolved, smp);
      assert.equal(slots.length, smp);
      slots.forEach((s, i) => {
        assert.equal(s.length, VS_NSLOTS);
        validateSlots(i, s, smp, ram / 4096);
        assert.deepEqual(decodeWorkload(s), resolved, `${JSON.stringify(w)} smp=${smp} vCPU ${i}`);
      });
    }
  }
  assert.deepEqual(resolveWorkload({ kind: 'stress', start: 4 * M, wss: 3 * M + 100 }, ram), {
    kind: 'stress',
    start: 4 * M,
    wss: 3 * M,
    write: 8,
    rate: 0,
    seed: 0,
  });
  assert.deepEqual(resolveWorkload({ kind: 'sweep' }, ram), { kind: 'sweep', start: M, end: ram });
});

test('vCPU slots: the encoding of stripes, PRNG state and limits', () => {
  const stress = encodeWorkload(resolveWorkload({ kind: 'stress', start: 8192, wss: 10 * 4096, seed: 5, steps: 7, write: 16 }, M), 3);
  assert.deepEqual(
    stress.map((s) => [s[VS_SMP], s[VS_INDEX], s[VS_ACTIVE], s[VS_STRIPE_START], s[VS_STRIPE_END], s[VS_STEPS_LIMIT], s[VS_WRITE]]),
    [
      [3, 0, 1, 2, 5, 7, 16],
      [3, 1, 1, 5, 8, 7, 16],
      [3, 2, 1, 8, 12, 7, 16],
    ],
  );
  stress.forEach((s, i) => assert.deepEqual([...s.subarray(VS_RNG0, VS_RNG0 + 4)], seedXorshift(5, i)));
  assert.ok(stress.every((s) => s[0] === KIND_STRESS && s[VS_READ] === 0 && s[VS_STEPS] === 0));
  // one page, two vCPUs: the second is idle
  const one = encodeWorkload(resolveWorkload({ kind: 'stress', wss: 4096 }, M), 2);
  assert.deepEqual(one.map((s) => s[VS_ACTIVE]), [1, 0]);
  assert.deepEqual([...one[1]!.subarray(VS_RNG0, VS_RNG0 + 4)], [0, 0, 0, 0]);
  // sweep: vCPU 0 sweeps everything from the start, no limit
  const sweep = encodeWorkload(resolveWorkload({ kind: 'sweep', start: 4096, end: 5 * 4096 }, M), 2);
  assert.deepEqual(
    sweep.map((s) => [s[0], s[VS_ACTIVE], s[VS_STRIPE_START], s[VS_STRIPE_END], s[VS_POS], s[VS_STEPS_LIMIT]]),
    [
      [KIND_SWEEP, 1, 1, 5, 1, -1],
      [KIND_SWEEP, 0, 0, 0, 0, -1],
    ],
  );
  // idle: nothing but the vCPU's place
  const idle = encodeWorkload(resolveWorkload({ kind: 'idle' }, M), 2)[1]!;
  assert.deepEqual([...idle].filter((v, k) => k !== VS_SMP && k !== VS_INDEX && v !== 0), []);
});

test('vCPU slots: resolve and validate refuse what a worker must not run', () => {
  assert.throws(() => resolveWorkload({ kind: 'sweep', start: 100 }, M), /not page aligned/);
  assert.throws(() => resolveWorkload({ kind: 'sweep', end: 2 * M }, M), /beyond RAM size/);
  assert.throws(() => resolveWorkload({ kind: 'stress', wss: 2 * M }, M), /beyond RAM size/);
  assert.throws(() => resolveWorkload({ kind: 'stress', write: 0 }, M), /must be 1..4096 bytes/);
  assert.throws(() => resolveWorkload({ kind: 'stress', steps: -1 }, M), /steps -1 must be a non-negative integer/);
  assert.throws(() => resolveWorkload({ kind: 'nope' } as unknown as WorkloadConfig, M), /Unknown workload kind 'nope'/);
  const good = encodeWorkload(resolveWorkload({ kind: 'stress', seed: 1 }, M), 2)[1]!;
  const bad = (k: number, v: number): Float64Array => {
    const s = good.slice();
    s[k] = v;
    return s;
  };
  assert.throws(() => validateSlots(2, good, 2, 256), /ferry-vcpu 2: no such vCPU \(smp=2\)/);
  assert.throws(() => validateSlots(1, good.subarray(0, 20), 2, 256), /20 state slots, expected 22/);
  assert.throws(() => validateSlots(1, bad(VS_STEPS, 0.5), 2, 256), /state slot 12 is not an integer/);
  assert.throws(() => validateSlots(1, good, 2, 100), /does not fit in 100 pages/);
  assert.throws(() => validateSlots(1, bad(VS_STRIPE_END, 300), 2, 256), /outside the workload range/);
  assert.throws(() => validateSlots(1, bad(VS_READ, 2), 2, 256), /bad read flag 2/);
  assert.throws(() => validateSlots(1, bad(VS_ACTIVE, 3), 2, 256), /bad active flag 3/);
  const zero = good.slice();
  zero.fill(0, VS_RNG0, VS_RNG0 + 4);
  assert.throws(() => validateSlots(1, zero, 2, 256), /PRNG state is all zero/);
});
