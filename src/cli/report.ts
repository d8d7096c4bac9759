/**
 * `ferry report INPUT.json [-o OUT.html]`: draw one migration as a
 * self-contained HTML page (src/report/). INPUT is what the demo,
 * `ferry migrate --report` and the benches write beside their pages: the
 * traces of both sides (x-query-migration-trace) and the integrity check.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { renderReport } from '../report/html.js';
import { checkReportInput } from '../report/types.js';

const USAGE = `usage: ferry report INPUT.json [-o OUT.html]
  Draws a migration (its trace, recorded with x-trace-migration) as one HTML
  page with charts; OUT defaults to INPUT with .html instead of .json.
`;

export async function main(argv: string[]): Promise<number> {
  let input: string | undefined;
  let out: string | undefined;
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === '-h' || a === '--help') {
      process.stdout.write(USAGE);
      return 0;
    } else if (a === '-o' || a === '--output') {
      out = argv[++i];
      if (out === undefined) {
        process.stderr.write(`ferry report: ${a} requires a file name\n${USAGE}`);
        return 2;
      }
    } else if (a.startsWith('-')) {
      process.stderr.write(`ferry report: ${a}: unknown option\n${USAGE}`);
      return 2;
    } else if (input === undefined) input = a;
    else {
      process.stderr.write(`ferry report: one input file only\n${USAGE}`);
      return 2;
    }
  }
  if (input === undefined) {
    process.stderr.write(USAGE);
    return 2;
  }
  let r;
  try {
    r = checkReportInput(JSON.parse(readFileSync(input, 'utf8')));
  } catch (e) {
    process.stderr.write(`ferry report: ${input}: ${(e as Error).message}\n`);
    return 1;
  }
  const path = out ?? input.replace(/\.json$/i, '') + '.html';
  writeFileSync(path, renderReport(r));
  process.stdout.write(`${path}\n`);
  return 0;
}
