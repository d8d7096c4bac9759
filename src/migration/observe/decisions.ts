/**
 * The switchover decision log (`x-query-migrate-decisions`): what the
 * outgoing migration decided each time it knew its whole dirty set, with
 * the figures it decided on. The session (core/outgoing.ts) records at its
 * decision points, with the numbers of core/switchover.ts; nothing here
 * decides or recomputes anything, it only keeps and words the record.
 */
import type { SwitchoverDecision, SwitchoverDecisionKind } from '../../generated/qapi-types.js';

/** At most this many decisions are kept (the oldest go). */
export const MAX_DECISIONS = 1000;

/** Why the decision went the way it did. */
export type DecisionWhy =
  /** nothing was left to send */
  | 'empty'
  /** the rest fits the downtime budget */
  | 'fits'
  /** the rest does not fit */
  | 'too-much'
  /** postcopy was requested and what must go before the switch fits */
  | 'postcopy-fits'
  /** postcopy was requested but what must go before the switch does not fit yet */
  | 'postcopy-waits';

/** What the session knew at a decision point. */
export interface DecisionPoint {
  timeMs: number;
  pass: number;
  dirtyBytes: number;
  precopyBytes: number;
  queuedBytes: number;
  /** bytes per ms measured (the lowest of the last two windows) */
  bandwidth: number;
  /** bytes per ms the final transfer is planned with (a share of `bandwidth`) */
  plannedBandwidth: number;
  expectedDowntimeMs: number;
  limitMs: number;
  reserveMs: number;
  thresholdBytes: number;
  decision: SwitchoverDecisionKind;
  why: DecisionWhy;
}

export class DecisionLog {
  private readonly entries: SwitchoverDecision[] = [];
  /** Decisions recorded in all (the log keeps the last MAX_DECISIONS). */
  count = 0;

  record(d: DecisionPoint): void {
    this.count++;
    const e: SwitchoverDecision = {
      time: Math.round(d.timeMs),
      pass: d.pass,
      'dirty-bytes': Math.round(d.dirtyBytes),
      'precopy-bytes': Math.round(d.precopyBytes),
      'queued-bytes': Math.round(d.queuedBytes),
      bandwidth: Math.round(d.bandwidth * 1000),
      'expected-downtime': Number.isFinite(d.expectedDowntimeMs) ? Math.round(d.expectedDowntimeMs) : -1,
      'downtime-limit': d.limitMs,
      reserve: Math.round(d.reserveMs),
      threshold: Math.round(d.thresholdBytes),
      decision: d.decision,
      reason: reason(d),
    };
    this.entries.push(e);
    if (this.entries.length > MAX_DECISIONS) this.entries.shift();
  }

  list(): SwitchoverDecision[] {
    return this.entries.slice();
  }

  get last(): SwitchoverDecision | undefined {
    return this.entries[this.entries.length - 1];
  }
}

function reason(d: DecisionPoint): string {
  const left = `${bytes(d.dirtyBytes + d.queuedBytes)} left`;
  const cost = Number.isFinite(d.expectedDowntimeMs)
    ? `needs ${Math.round(d.expectedDowntimeMs - d.reserveMs)} ms at ${mbs(d.plannedBandwidth)} + ${Math.round(d.reserveMs)} ms reserve`
    : 'bandwidth not measured yet';
  switch (d.why) {
    case 'empty':
      return 'nothing left to send';
    case 'fits':
      return `${left} ${cost} = ${Math.round(d.expectedDowntimeMs)} ms <= limit ${d.limitMs} ms`;
    case 'too-much':
      return `${left} ${cost}${Number.isFinite(d.expectedDowntimeMs) ? ` = ${Math.round(d.expectedDowntimeMs)} ms` : ''} > limit ${d.limitMs} ms`;
    case 'postcopy-fits':
      return `postcopy requested; ${bytes(d.precopyBytes + d.queuedBytes)} must go before the switch and fit the budget of ${bytes(d.thresholdBytes)}`;
    case 'postcopy-waits':
      return `postcopy requested; ${bytes(d.precopyBytes + d.queuedBytes)} must go before the switch, more than the budget of ${bytes(d.thresholdBytes)}`;
  }
}

function bytes(n: number): string {
  if (n >= 1 << 30) return `${(n / (1 << 30)).toFixed(2)} GiB`;
  if (n >= 1 << 20) return `${(n / (1 << 20)).toFixed(1)} MiB`;
  if (n >= 1 << 10) return `${(n / (1 << 10)).toFixed(1)} KiB`;
  return `${Math.round(n)} B`;
}

/** bytes per ms as MB/s */
function mbs(bpms: number): string {
  return `${(bpms / 1000).toFixed(1)} MB/s`;
}
