/**
 * The input of `ferry report`: one migration seen from both ends, as the
 * demo, `ferry migrate` and the benches write it (a JSON file). The traces
 * are what x-query-migration-trace answered on each side.
 */
import type { MigrationTrace } from '../generated/qapi-types.js';

export const REPORT_FORMAT = 'ferry-migration-report';
export const REPORT_VERSION = 1;

/** The memory digests taken after the migration, on both sides. */
export interface IntegrityCheck {
  /** what was compared, e.g. "x-query-memory-digest" */
  method: string;
  source: string;
  destination: string;
  equal: boolean;
  /** further checks (heartbeat continued, …) with their verdicts */
  checks?: { name: string; ok: boolean; detail: string }[];
}

export interface ReportInput {
  format: typeof REPORT_FORMAT;
  version: number;
  /** a title for the page */
  title: string;
  /** when the migration ran, ISO 8601 */
  created: string;
  /** how it was run (URI, options), in words */
  setup?: string;
  source: MigrationTrace;
  destination?: MigrationTrace;
  integrity?: IntegrityCheck;
}

/** Throws unless `v` looks like a report input (a clear message for a wrong file). */
export function checkReportInput(v: unknown): ReportInput {
  const o = v as Partial<ReportInput> | null;
  if (!o || typeof o !== 'object' || o.format !== REPORT_FORMAT) {
    throw new Error(`not a Ferry migration report input (expected "format": "${REPORT_FORMAT}")`);
  }
  if (o.version !== REPORT_VERSION) throw new Error(`report input version ${String(o.version)} is not supported (expected ${REPORT_VERSION})`);
  if (!o.source || !Array.isArray(o.source.samples) || !Array.isArray(o.source.events)) {
    throw new Error('report input has no source trace (x-query-migration-trace of the source)');
  }
  return o as ReportInput;
}
