/**
 * qapi-gen: `node dist-tools/qapi-gen/main.js SCHEMA OUTDIR [--doc FILE | --no-doc] [--check]`
 *
 * Reads the QAPI schema SCHEMA (following its includes), checks it, and
 * writes the TypeScript modules into OUTDIR and the Markdown reference to
 * FILE (default: docs/qapi.md next to the schema's directory). Files whose
 * contents did not change are left alone. With --check nothing is written
 * and the exit status says whether the outputs are up to date.
 * Errors are printed as `FILE:LINE: message` with exit status 1.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { QapiSchemaError } from './errors.js';
import { generate } from './generate.js';

function usage(): never {
  process.stderr.write('usage: qapi-gen SCHEMA OUTDIR [--doc FILE | --no-doc] [--check]\n');
  process.exit(2);
}

function main(argv: string[]): number {
  const pos: string[] = [];
  let doc: string | null | undefined;
  let check = false;
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === '--doc') doc = argv[++i] ?? usage();
    else if (a === '--no-doc') doc = null;
    else if (a === '--check') check = true;
    else if (a.startsWith('-')) usage();
    else pos.push(a);
  }
  if (pos.length !== 2) usage();
  const [schemaFile, outDir] = pos as [string, string];
  if (doc === undefined) doc = path.join(path.dirname(path.dirname(path.resolve(schemaFile))), 'docs', 'qapi.md');

  let result;
  try {
    result = generate(schemaFile);
  } catch (e) {
    if (e instanceof QapiSchemaError) {
      process.stderr.write(`${e.message}\n`);
      return 1;
    }
    throw e;
  }
  const outputs = new Map<string, string>();
  for (const [name, text] of result.files) outputs.set(path.join(outDir, name), text);
  if (doc !== null) outputs.set(doc, result.doc);

  let stale = 0;
  for (const [file, text] of outputs) {
    const old = fs.existsSync(file) ? fs.readFileSync(file, 'utf8') : undefined;
    if (old === text) continue;
    stale++;
    if (check) {
      process.stderr.write(`${file} is out of date\n`);
      continue;
    }
    fs.mkdirSync(path.dirname(file), { recursive: true });
    fs.writeFileSync(file, text);
    process.stdout.write(`wrote ${file}\n`);
  }
  return check && stale > 0 ? 1 : 0;
}

process.exitCode = main(process.argv.slice(2));
