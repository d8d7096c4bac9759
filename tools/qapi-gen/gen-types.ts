/** Backend: src/generated/qapi-types.ts, one TypeScript type per schema type. */
import type { Member, Schema, TypeDef } from './schema.js';
import { defDocText, header, ident, jsdoc, orderedTypes, propKey, quote, refs, tsType } from './util.js';

export function genTypes(schema: Schema, source: string): string {
  let out = header(source, 'TypeScript types of the QAPI schema');
  for (const t of orderedTypes(schema)) {
    if (t.implicit) continue;
    out += typeDecl(schema, t) + '\n';
  }
  return out.replace(/\n+$/, '\n');
}

function memberLines(schema: Schema, ms: readonly Member[], docs: ReadonlyMap<string, string> | undefined, indent: string): string {
  let out = '';
  for (const m of ms) {
    const d = docs?.get(m.name);
    out += jsdoc(d === undefined ? undefined : refs(d), indent);
    out += `${indent}${propKey(m.name)}${m.optional ? '?' : ''}: ${tsType(schema, m.type)};\n`;
  }
  return out;
}

/** Documentation of all members along a struct's base chain. */
function chainDocs(schema: Schema, name: string): Map<string, string> {
  const s = schema.struct(name);
  const docs = new Map<string, string>(s.base ? chainDocs(schema, s.base) : []);
  for (const [k, v] of s.doc?.args ?? []) docs.set(k, v);
  return docs;
}

function typeDecl(schema: Schema, t: TypeDef): string {
  const name = ident(t.name);
  switch (t.meta) {
    case 'builtin':
      return '';
    case 'enum': {
      const vals = t.values.map((v) => {
        const d = t.doc?.args.get(v);
        return d ? `- \`${v}\`: ${refs(d.replace(/\n/g, ' '))}` : `- \`${v}\``;
      });
      const doc = defDocText(t, vals.join('\n'));
      return (
        jsdoc(doc) +
        `export type ${name} =\n${t.values.map((v) => `  | ${quote(v)}`).join('\n')};\n` +
        `/** Every value of {@link ${name}}, in schema order. */\n` +
        `export const ${name}_VALUES = [${t.values.map(quote).join(', ')}] as const;\n`
      );
    }
    case 'struct': {
      const ext = t.base ? ` extends ${ident(t.base)}` : '';
      const body = memberLines(schema, t.members, t.doc?.args, '  ');
      return jsdoc(defDocText(t)) + `export interface ${name}${ext} {\n${body}}\n`;
    }
    case 'alternate': {
      const forms = t.branches.map((b) => `  | ${tsType(schema, b.type)}`);
      return jsdoc(defDocText(t)) + `export type ${name} =\n${forms.join('\n')};\n`;
    }
    case 'union': {
      const enumDef = schema.type(t.tagEnum);
      const values = enumDef.meta === 'enum' ? enumDef.values : [];
      const baseMembers = schema.allMembers(t.base);
      const baseDocs = t.implicit ? new Map<string, string>() : new Map([...chainDocs(schema, t.base), ...(t.doc?.args ?? [])]);
      const alts: string[] = [];
      const covered = new Set<string>();
      for (const v of t.variants) {
        covered.add(v.name);
        if (t.simple) {
          const data = schema.struct(v.type).members[0]!;
          alts.push(`  | { ${propKey(t.tag)}: ${quote(v.name)}; data: ${tsType(schema, data.type)} }`);
          continue;
        }
        const lit = objectLiteral(schema, t.tag, [v.name], baseMembers, baseDocs);
        alts.push(`  | (${lit} & ${ident(v.type)})`);
      }
      const rest = values.filter((v) => !covered.has(v));
      if (rest.length > 0 && !t.simple) alts.push(`  | ${objectLiteral(schema, t.tag, rest, baseMembers, baseDocs)}`);
      return jsdoc(defDocText(t)) + `export type ${name} =\n${alts.join('\n')};\n`;
    }
  }
}

function objectLiteral(schema: Schema, tag: string, tagValues: readonly string[], ms: readonly Member[], docs: ReadonlyMap<string, string>): string {
  let s = '{\n';
  for (const m of ms) {
    if (m.name === tag) {
      const d = docs.get(tag);
      s += jsdoc(d === undefined ? undefined : refs(d), '      ');
      s += `      ${propKey(tag)}: ${tagValues.map(quote).join(' | ')};\n`;
    } else {
      s += memberLines(schema, [m], docs, '      ');
    }
  }
  s += '    }';
  return s;
}
