/**
 * The guest every reliability cell migrates, the phases a fault is aimed
 * at, and the reference its memory is checked against.
 *
 * The guest: 16 MiB of random RAM and one vCPU running a seeded stress
 * workload over the first 2 MiB for a fixed number of steps, then idle. Its
 * memory at the end of those steps does not depend on when it was paused,
 * migrated or throttled, so one reference digest (a machine that ran the
 * same steps without migrating) checks any side that ran the guest to the end:
 * a source that ran on after a fault, or a destination that took over.
 *
 * The block row's guest adds a raw drive of DISK_SIZE (its content fixed by
 * a seed, see baseImage) and a disk workload of DISK_STEPS steps over all of
 * it, that runs on while the disk is copied; its drive's digest at the end
 * is checked against a reference the same way (referenceDiskDigest).
 */
import { copyFileSync, truncateSync, writeFileSync } from 'node:fs';
import { Machine, type MachineConfig } from '../../src/machine/index.js';
import type { SourceTracePoint } from '../../src/migration/core/outgoing.js';
import type { MigrationInfo } from '../../src/generated/qapi-types.js';

export const STEPS = 2500;

export const GUEST: MachineConfig = {
  ramSize: 16 << 20,
  smp: 1,
  fill: { kind: 'random', seed: 14 },
  workload: { kind: 'stress', rate: 16 << 20, wss: 2 << 20, start: 0, seed: 7, steps: STEPS },
};

/**
 * Source parameters: a bandwidth that makes the first pass take ~1/8 s and
 * a downtime limit that cannot be met while the workload writes, so every
 * migration has a dirty pass and completes once the steps are done.
 */
export const SOURCE_PARAMS = { 'max-bandwidth': 128 << 20, 'downtime-limit': 1 };

/**
 * The postcopy row's parameters. The switch happens at the first decision
 * point where what must go before it (here only the bytes still queued in
 * the writer, up to a 2 MiB staging buffer) fits the downtime budget. With
 * SOURCE_PARAMS that budget is a few KiB, so a destination slower than the
 * rate limit (a loaded machine) kept the queue full until the first pass
 * was out and the workload done, and the migration completed in precopy
 * without ever switching. Here the budget (~3.5 MB at 32 MiB/s) holds a
 * full staging buffer, and the first pass (16 MiB) cannot fit it: the
 * switch comes at the first measured window, in the bulk pass.
 */
export const POSTCOPY_PARAMS = { 'max-bandwidth': 32 << 20, 'downtime-limit': 150 };

/** The block row's drive: 8 MiB, eight chunks of the bulk walk. */
export const DISK_SIZE = 8 << 20;
export const DISK_STEPS = 400;

/** The source's drive and disk workload (2 MiB/s of 4 KiB writes over the whole drive: done after ~0.8 s of guest time). */
export function blockGuest(image: string): Pick<MachineConfig, 'drives' | 'diskWorkload'> {
  return {
    drives: [{ file: image, format: 'raw', interface: 'none', id: 'd0' }],
    diskWorkload: { drive: 'd0', rate: 2 << 20, write: 4096, seed: 11, steps: DISK_STEPS },
  };
}

/** The destination's drive: an empty image of the same size (the workload comes with the migration). */
export function blockDestination(image: string): Pick<MachineConfig, 'drives' | 'diskWorkload'> {
  writeFileSync(image, '');
  truncateSync(image, DISK_SIZE);
  return { drives: [{ file: image, format: 'raw', interface: 'none', id: 'd0' }], diskWorkload: undefined };
}

/** Writes the block guest's starting image (its content a function of a seed, no zero chunks). */
export function baseImage(path: string): void {
  const b = Buffer.alloc(DISK_SIZE);
  let x = 0x9e3779b9;
  for (let i = 0; i < DISK_SIZE; i += 4) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    b.writeUInt32LE(x >>> 0, i);
  }
  writeFileSync(path, b);
}

/** Where in a migration a fault hits, as seen by the source's trace points. */
export interface PhaseDef {
  /** The row's name in docs/reliability.md. */
  name: string;
  what: string;
  /** Capabilities of both sides. */
  caps: ('return-path' | 'postcopy-ram' | 'block')[];
  /** The guest has a drive (blockGuest), migrated with the `block` capability. */
  block?: boolean;
  /** Ask for postcopy at the first iteration slice. */
  postcopy?: boolean;
  /** The source's parameters (SOURCE_PARAMS unless given). */
  params?: Record<string, number>;
  /** True at the trace point where the fault fires. */
  at(point: SourceTracePoint, info: MigrationInfo): boolean;
  /**
   * The trace point that ends the phase: stream faults (truncate, flip) hit
   * a random byte of what the source sent between `at` and this point.
   */
  until(point: SourceTracePoint, info: MigrationInfo): boolean;
}

const sync = (info: MigrationInfo): number => info.ram?.['dirty-sync-count'] ?? 0;
const disk = (info: MigrationInfo): { total: number; transferred: number; remaining: number } => info.disk ?? { total: 0, transferred: 0, remaining: 0 };

export const PHASES: PhaseDef[] = [
  {
    name: 'setup',
    what: 'connected, before the header, the configuration and the START sections are out',
    caps: ['return-path'],
    at: (p) => p === 'connected',
    until: (p) => p === 'setup-sent',
  },
  {
    name: 'first pass',
    what: 'the first iteration slice of the bulk pass (dirty-sync-count 1)',
    caps: ['return-path'],
    at: (p, i) => p === 'slice' && sync(i) === 1,
    until: (p, i) => p !== 'slice' || sync(i) > 1,
  },
  {
    name: 'dirty pass',
    what: 'the first slice after the first dirty-log sync (dirty-sync-count 2)',
    caps: ['return-path'],
    at: (p, i) => p === 'slice' && sync(i) >= 2,
    until: (p, i) => p !== 'slice' || sync(i) > 2,
  },
  {
    name: 'completion',
    what: 'after the last byte (EOF and vmdesc handed to the OS), before the close; stream faults hit the bytes sent after the stop',
    caps: ['return-path'],
    at: (p) => p === 'sent',
    until: (p) => p === 'sent',
  },
  {
    name: 'postcopy',
    what: 'the first background slice after the switch (guest running on the destination, pages missing)',
    caps: ['return-path', 'postcopy-ram'],
    postcopy: true,
    params: POSTCOPY_PARAMS,
    at: (p) => p === 'postcopy-slice',
    until: (p) => p === 'postcopy-sent',
  },
  {
    name: 'block bulk phase',
    what: `with an ${DISK_SIZE >> 20} MiB raw drive under a disk workload: the chunk record of the bulk walk that takes it to half the drive (block-bulk trace point); stream faults hit the bytes from there to the walk's last chunk`,
    caps: ['return-path', 'block'],
    block: true,
    at: (p, i) => p === 'block-bulk' && disk(i).transferred * 2 >= disk(i).total,
    until: (p, i) => (p === 'block-bulk' && disk(i).remaining === 0) || p === 'stopped',
  },
];

/** Stream faults start holding bytes here (completion: at the stop, so the tail can still be hit). */
export function holdFrom(phase: PhaseDef, point: SourceTracePoint, info: MigrationInfo): boolean {
  if (phase.name === 'completion') return point === 'stopped';
  return phase.at(point, info);
}

/** Resolves once every vCPU did its STEPS, and the disk workload (if any) its DISK_STEPS (bounded). */
export async function workloadDone(m: Machine, ms = 20000): Promise<void> {
  const t0 = Date.now();
  while (!m.workloadInfo().every((v) => v.steps >= STEPS) || !m.diskWorkloadInfo().every((w) => w.steps >= DISK_STEPS)) {
    if (Date.now() - t0 > ms)
      throw new Error(`the workload did not finish its ${STEPS} steps (disk: ${DISK_STEPS}): ${JSON.stringify([m.workloadInfo(), m.diskWorkloadInfo()])}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** The digest of GUEST after its steps, run without a migration. */
export async function referenceDigest(): Promise<string> {
  const m = await Machine.create({ ...GUEST });
  try {
    await workloadDone(m);
    return (await m.digest()).digest;
  } finally {
    await m.destroy();
  }
}

/** The block guest's drive digest after its disk steps, run without a migration (on a copy of `base`). */
export async function referenceDiskDigest(base: string, copy: string): Promise<string> {
  copyFileSync(base, copy);
  const m = await Machine.create({ ...GUEST, ...blockGuest(copy) });
  try {
    await workloadDone(m);
    return (await m.blockDigest()).digest;
  } finally {
    await m.destroy();
  }
}
