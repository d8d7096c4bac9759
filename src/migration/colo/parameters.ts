/**
 * Ferry's COLO settings (x-colo-set-parameters, x-query-colo-parameters;
 * qapi/colo.json ColoParameters). QEMU keeps the comparison in a
 * colo-compare object and has no heartbeat timeout or witness at all; the
 * 2.10 interval, x-checkpoint-delay, stays a migration parameter.
 * Changes are checked on a copy and applied all or nothing.
 */
import { statSync } from 'node:fs';
import type { ColoCompareMode, ColoParameters as ColoParams } from '../../generated/qapi-types.js';
import { MigrationError } from '../errors.js';

export const DEFAULT_COLO_PARAMETERS: Readonly<ColoParams> = Object.freeze({
  compare: 'off',
  'compare-timeout': 3000,
  'heartbeat-timeout': 0,
  witness: '',
});

export const COMPARE_TIMEOUT_RANGE = [100, 3_600_000] as const;
export const HEARTBEAT_TIMEOUT_RANGE = [500, 3_600_000] as const;

export interface ColoParameterChange {
  compare?: ColoCompareMode;
  'compare-timeout'?: number;
  'heartbeat-timeout'?: number;
  witness?: string | null;
}

export class ColoParameters {
  private p: ColoParams = { ...DEFAULT_COLO_PARAMETERS };
  private readonly listeners: Array<(p: Readonly<ColoParams>) => void> = [];

  get(): Readonly<ColoParams> {
    return this.p;
  }

  /** Called after every change (a running session picks the new values up). */
  onChange(fn: (p: Readonly<ColoParams>) => void): () => void {
    this.listeners.push(fn);
    return () => {
      const i = this.listeners.indexOf(fn);
      if (i >= 0) this.listeners.splice(i, 1);
    };
  }

  set(c: ColoParameterChange): void {
    const next: ColoParams = { ...this.p };
    if (c.compare !== undefined) next.compare = c.compare;
    if (c['compare-timeout'] !== undefined) next['compare-timeout'] = c['compare-timeout'];
    if (c['heartbeat-timeout'] !== undefined) next['heartbeat-timeout'] = c['heartbeat-timeout'];
    if (c.witness !== undefined) next.witness = c.witness ?? '';
    const [ct0, ct1] = COMPARE_TIMEOUT_RANGE;
    if (!(next['compare-timeout'] >= ct0 && next['compare-timeout'] <= ct1)) {
      throw new MigrationError(`Parameter 'compare-timeout' expects a value between ${ct0} and ${ct1}`);
    }
    const [hb0, hb1] = HEARTBEAT_TIMEOUT_RANGE;
    const hb = next['heartbeat-timeout'];
    if (hb !== 0 && !(hb >= hb0 && hb <= hb1)) {
      throw new MigrationError(`Parameter 'heartbeat-timeout' expects 0 or a value between ${hb0} and ${hb1}`);
    }
    if (next.witness !== '' && next.witness !== this.p.witness) {
      let dir = false;
      try {
        dir = statSync(next.witness).isDirectory();
      } catch {
        /* reported below */
      }
      if (!dir) throw new MigrationError(`Parameter 'witness' expects a directory, '${next.witness}' is not one`);
    }
    this.p = next;
    for (const fn of [...this.listeners]) fn(this.p);
  }
}
