/**
 * The COLO checkpoint row of the fault matrix: how a cell brings a COLO
 * pair to a known last checkpoint and aims its fault at the next one
 * (shared by matrix.test.ts and side-child.ts, which runs the primary when
 * it is the one killed).
 *
 * The primary is GUEST, paused before its migration starts, with a
 * checkpoint delay too long to fire by itself: checkpoints come only when
 * asked for (a new x-checkpoint-delay asks for one at once, QEMU's rule).
 *
 *   1. migrate with x-colo; the pair enters COLO;
 *   2. one checkpoint, the guest still paused: its memory (digest D1, taken
 *      from the paused primary) is the secondary's last complete checkpoint;
 *   3. the guest runs until its workload wrote at least 50 pages more (so
 *      the next checkpoint differs from D1);
 *   4. a checkpoint is asked for: the fault hits it, at the primary's
 *      `colo-checkpoint` trace point (built, its bytes go next) and
 *      `colo-checkpoint-sent` (they were handed to the channel, the
 *      primary waits for vmstate-received).
 */
import type { Machine } from '../../src/machine/index.js';
import type { MigrationSource } from '../../src/migration/index.js';
import type { SourceTracePoint } from '../../src/migration/core/outgoing.js';

/** The row's name in docs/reliability.md. */
export const COLO_ROW = 'COLO checkpoint';
export const COLO_CAPS = ['x-colo'];
/** Checkpoints only when asked for; the first migration at full speed. */
export const COLO_PARAMS = { 'max-bandwidth': 0, 'x-checkpoint-delay': 600_000 };
/** Pages the guest writes between the last checkpoint and the faulted one (at least). */
const DIVERGE_STEPS = 50;

/** Polls `pred` every 5 ms, at most `ms`. */
export async function until(pred: () => boolean, ms: number, what: () => string): Promise<void> {
  const t0 = Date.now();
  while (!pred()) {
    if (Date.now() - t0 > ms) throw new Error(`timed out waiting for ${what()}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

const steps = (m: Machine): number => m.workloadInfo()[0]!.steps;

/** Where the fault's checkpoint is, as seen by the primary's trace points. */
export class ColoAim {
  private armed = false;
  /** the fault's checkpoint reached `colo-checkpoint` / `colo-checkpoint-sent` */
  started = false;
  sent = false;

  /** 'start' and 'sent' at the fault's checkpoint, null at every other point. */
  step(point: SourceTracePoint): 'start' | 'sent' | null {
    if (!this.armed) return null;
    if (point === 'colo-checkpoint' && !this.started) {
      this.started = true;
      return 'start';
    }
    if (point === 'colo-checkpoint-sent' && this.started && !this.sent) {
      this.sent = true;
      return 'sent';
    }
    return null;
  }

  /**
   * Steps 2 to 4 above, once the migration was started on the paused
   * `machine`; resolves with D1 when the fault's checkpoint was asked for.
   * `between` runs after D1, before the guest runs on.
   */
  async prelude(machine: Machine, source: MigrationSource, between?: () => Promise<void>): Promise<{ d1: string; steps1: number }> {
    const primary = (): number => source.colo.primary?.checkpoints ?? -1;
    await until(() => source.colo.primary?.started === true, 30000, () => `the pair in COLO (source ${source.status})`);
    source.colo.checkpointDelayChanged();
    await until(() => primary() >= 1, 20000, () => `the first checkpoint (source ${source.status})`);
    const d1 = (await machine.digest()).digest;
    const steps1 = steps(machine);
    await between?.();
    await machine.start();
    await until(() => steps(machine) >= steps1 + DIVERGE_STEPS, 20000, () => `the guest to run on (${steps(machine)} steps)`);
    this.armed = true;
    source.colo.checkpointDelayChanged();
    return { d1, steps1 };
  }
}

/** Bytes the source has put on its connection: the first migration's, then COLO's. */
export function bytesOut(source: MigrationSource): number {
  const s = source.current!;
  return s.writer!.bytesWritten + (s.colo?.bytesSent ?? 0);
}
