/** Backend: src/generated/qapi-commands.ts, the handler interface and the command table. */
import type { CommandDef, Member, Schema } from './schema.js';
import { defDocText, header, ident, jsdoc, propKey, quote, tsType } from './util.js';

/** TypeScript type of an argument or event-data object (inline members or a named type). */
export function argsTsType(schema: Schema, def: { args?: string | undefined }, ns: string, indent: string): string {
  if (!def.args) return 'Record<string, never>';
  const t = schema.type(def.args);
  if (!t.implicit) return ns + ident(t.name);
  const ms: readonly Member[] = schema.allMembers(t.name);
  if (ms.length === 0) return 'Record<string, never>';
  return `{\n${ms.map((m) => `${indent}  ${propKey(m.name)}${m.optional ? '?' : ''}: ${tsType(schema, m.type, ns)};`).join('\n')}\n${indent}}`;
}

function retType(schema: Schema, c: CommandDef): string {
  return c.returns ? tsType(schema, c.returns, 'T.') : 'void';
}

export function genCommands(schema: Schema, source: string): string {
  const cmds = schema.commands;
  let out = header(source, 'command handler interface and command table');
  out += `import * as R from '../qapi/runtime.js';\n`;
  out += `import type * as T from './qapi-types.js';\n`;
  out += `import * as V from './qapi-validators.js';\n\n`;

  out += `/** Validated arguments of each command (boxed commands: the struct itself). */\n`;
  out += `export interface CommandArgs {\n`;
  for (const c of cmds) out += `  ${quote(c.name)}: ${argsTsType(schema, c, 'T.', '  ')};\n`;
  out += `}\n\n`;

  out += `/** Result of each command (\`void\` is answered as \`{}\`). */\n`;
  out += `export interface CommandReturns {\n`;
  for (const c of cmds) out += `  ${quote(c.name)}: ${retType(schema, c)};\n`;
  out += `}\n\n`;

  out += `/** Names of all commands. */\nexport type CommandName = keyof CommandArgs;\n\n`;

  out += `/**\n * One method per command. \`args\` has already been validated against the\n * schema; the return value (or the promise's) is sent as the result.\n */\n`;
  out += `export interface CommandHandlers<Ctx> {\n`;
  for (const c of cmds) {
    out += jsdoc(defDocText(c), '  ');
    const r = retType(schema, c);
    out += `  ${quote(c.name)}(args: CommandArgs[${quote(c.name)}], ctx: Ctx): ${r} | Promise<${r}>;\n`;
  }
  out += `}\n\n`;

  out += `/** How the dispatcher treats one command. */\n`;
  out += `export interface CommandDef {\n  readonly name: string;\n  readonly boxed: boolean;\n`;
  out += `  /**\n   * Checks the request's \`arguments\` (\`{}\` when omitted) and returns a\n   * fresh validated copy, or throws QapiError with QEMU's message.\n   */\n`;
  out += `  validate(args: unknown): unknown;\n}\n\n`;

  out += `const NO_ARGS: readonly R.Field[] = [];\n\n`;
  out += `/** Every command of the schema, in schema order. */\n`;
  out += `export const COMMANDS: ReadonlyMap<string, CommandDef> = new Map<string, CommandDef>([\n`;
  for (const c of cmds) {
    const v = c.args ? `(a) => V.v_${ident(c.args)}(a, R.ROOT)` : `(a) => R.struct(a, R.ROOT, NO_ARGS)`;
    out += `  [${quote(c.name)}, { name: ${quote(c.name)}, boxed: ${c.boxed}, validate: ${v} }],\n`;
  }
  out += `]);\n`;
  return out;
}
