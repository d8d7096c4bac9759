/** Runs the whole pipeline: load, check, and render every output in memory. */
import * as path from 'node:path';
import { loadSchema } from './parser.js';
import { buildSchema, type Schema } from './schema.js';
import { genTypes } from './gen-types.js';
import { genValidators } from './gen-validators.js';
import { genCommands } from './gen-commands.js';
import { genEvents } from './gen-events.js';
import { genIntrospect } from './gen-introspect.js';
import { genClient } from './gen-client.js';
import { genDoc } from './gen-doc.js';

export interface GenerateOptions {
  /** Directory that file names in messages and headers are relative to (default: cwd). */
  readonly displayBase?: string;
}

export interface Generated {
  readonly schema: Schema;
  /** Output file name (inside the output directory) → contents. */
  readonly files: ReadonlyMap<string, string>;
  /** The Markdown reference (docs/qapi.md). */
  readonly doc: string;
}

/** Loads and checks `schemaFile`; throws QapiSchemaError on the first problem. */
export function checkSchema(schemaFile: string, opts: GenerateOptions = {}): Schema {
  return buildSchema(loadSchema(schemaFile, opts));
}

export function generate(schemaFile: string, opts: GenerateOptions = {}): Generated {
  const schema = checkSchema(schemaFile, opts);
  const source = path.relative(opts.displayBase ?? process.cwd(), path.resolve(schemaFile)).split(path.sep).join('/');
  const files = new Map<string, string>([
    ['qapi-types.ts', genTypes(schema, source)],
    ['qapi-validators.ts', genValidators(schema, source)],
    ['qapi-commands.ts', genCommands(schema, source)],
    ['qapi-events.ts', genEvents(schema, source)],
    ['qapi-introspect.ts', genIntrospect(schema, source)],
    ['qapi-client.ts', genClient(schema, source)],
  ]);
  return { schema, files, doc: genDoc(schema, source) };
}
