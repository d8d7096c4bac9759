/**
 * Gather a report's input from the two monitors after a migration (the
 * traces, and the memory digests when both sides can give them), and write
 * the JSON and the HTML page side by side.
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { dirname } from 'node:path';
import type { QmpApi } from '../generated/qapi-client.js';
import { renderReport } from './html.js';
import { REPORT_FORMAT, REPORT_VERSION, type IntegrityCheck, type ReportInput } from './types.js';

export interface CollectOptions {
  title: string;
  setup?: string;
  /** digests already taken (the demo takes them itself, at the right moment) */
  integrity?: IntegrityCheck;
}

/** The traces of both sides (the destination's when it has one). */
export async function collectReport(src: QmpApi, dst: QmpApi | undefined, o: CollectOptions): Promise<ReportInput> {
  const source = await src.xQueryMigrationTrace();
  const destination = dst ? await dst.xQueryMigrationTrace().catch(() => undefined) : undefined;
  const r: ReportInput = {
    format: REPORT_FORMAT,
    version: REPORT_VERSION,
    title: o.title,
    created: new Date(source.start).toISOString(),
    source,
  };
  if (o.setup) r.setup = o.setup;
  if (destination) r.destination = destination;
  if (o.integrity) r.integrity = o.integrity;
  return r;
}

/** Write PATH.json (the input) and PATH.html (the page); returns the page's path. */
export function writeReport(r: ReportInput, htmlPath: string): { html: string; json: string } {
  const json = htmlPath.replace(/\.html?$/i, '') + '.json';
  mkdirSync(dirname(htmlPath), { recursive: true });
  writeFileSync(json, JSON.stringify(r, null, 1) + '\n');
  writeFileSync(htmlPath, renderReport(r));
  return { html: htmlPath, json };
}
