/**
 * Backend: src/generated/qapi-validators.ts, one validator per schema type.
 * The validators are thin: tables of members plus calls into the runtime
 * helpers of src/qapi/runtime.ts, which produce QEMU's error texts.
 */
import type { Member, Schema, TypeRef } from './schema.js';
import { header, ident, orderedTypes, quote } from './util.js';

const BUILTIN_CHECK: Record<string, string> = {
  str: 'R.str', int: 'R.int', int8: 'R.int8', int16: 'R.int16', int32: 'R.int32', int64: 'R.int64',
  uint8: 'R.uint8', uint16: 'R.uint16', uint32: 'R.uint32', uint64: 'R.uint64', size: 'R.size',
  number: 'R.number', bool: 'R.bool', null: 'R.nul', any: 'R.any',
};

/** Name of the validator function of a type. */
export function validatorName(schema: Schema, name: string): string {
  const t = schema.type(name);
  return t.meta === 'builtin' ? BUILTIN_CHECK[t.name]! : `v_${ident(name)}`;
}

/** Validator expression for a type reference (arrays wrap the element check). */
export function checkExpr(schema: Schema, ref: TypeRef, ns = ''): string {
  const elem = schema.type(ref.name).meta === 'builtin' ? validatorName(schema, ref.name) : ns + validatorName(schema, ref.name);
  return ref.array ? `(v, p) => R.list(v, p, ${elem})` : elem;
}

function fieldTable(schema: Schema, ms: readonly Member[]): string {
  if (ms.length === 0) return '[]';
  return `[\n${ms.map((m) => `  [${quote(m.name)}, ${m.optional}, ${checkExpr(schema, m.type)}],`).join('\n')}\n]`;
}

export function genValidators(schema: Schema, source: string): string {
  const types = orderedTypes(schema);
  const enumValues = types.filter((t) => t.meta === 'enum' && !t.implicit).map((t) => `${ident(t.name)}_VALUES`);
  let out = header(source, 'argument validators');
  out += `import * as R from '../qapi/runtime.js';\n`;
  out += `import type * as T from './qapi-types.js';\n`;
  if (enumValues.length > 0) out += `import {\n${enumValues.map((v) => `  ${v},`).join('\n')}\n} from './qapi-types.js';\n`;
  out += '\n';

  // Member tables first (they only refer to functions, which are hoisted).
  for (const t of types) {
    if (t.meta === 'struct') {
      out += `const F_${ident(t.name)}: readonly R.Field[] = ${fieldTable(schema, schema.allMembers(t.name))};\n`;
    }
  }
  out += '\n';
  for (const t of types) {
    if (t.meta === 'union' && !t.simple) {
      const entries = t.variants.map((v) => `  ${quote(v.name)}: F_${ident(v.type)},`);
      out += `const B_${ident(t.name)}: Readonly<Record<string, readonly R.Field[]>> = {\n${entries.join('\n')}\n};\n`;
    }
  }
  out += '\n';

  for (const t of types) {
    const fn = `v_${ident(t.name)}`;
    const ret = t.implicit ? 'Record<string, unknown>' : `T.${ident(t.name)}`;
    const sig = `export function ${fn}(v: unknown, p: R.Path): ${ret}`;
    const cast = t.implicit ? '' : ` as unknown as ${ret}`;
    switch (t.meta) {
      case 'builtin':
        continue;
      case 'enum': {
        const values = t.implicit ? `[${t.values.map(quote).join(', ')}] as const` : `${ident(t.name)}_VALUES`;
        const r = t.implicit ? 'string' : `T.${ident(t.name)}`;
        out += `export function ${fn}(v: unknown, p: R.Path): ${r} {\n  return R.enumValue(v, p, ${values});\n}\n`;
        break;
      }
      case 'struct':
        out += `${sig} {\n  return R.struct(v, p, F_${ident(t.name)})${cast};\n}\n`;
        break;
      case 'union':
        if (t.simple) {
          const kinds = t.variants.map((v) => quote(v.name)).join(', ');
          const branches = t.variants.map((v) => `    ${quote(v.name)}: ${checkExpr(schema, schema.struct(v.type).members[0]!.type)},`).join('\n');
          out += `${sig} {\n  return R.simpleUnion(v, p, [${kinds}], {\n${branches}\n  })${cast};\n}\n`;
        } else {
          out += `${sig} {\n  return R.flatUnion(v, p, F_${ident(t.base)}, ${quote(t.tag)}, B_${ident(t.name)})${cast};\n}\n`;
        }
        break;
      case 'alternate': {
        const entries: string[] = [];
        for (const b of t.branches) {
          const bt = schema.type(b.type.name);
          const kind =
            bt.meta === 'builtin'
              ? bt.name === 'str' ? 'string' : bt.name === 'bool' ? 'boolean' : bt.name === 'null' ? 'null' : 'number'
              : bt.meta === 'enum' ? 'string' : 'object';
          entries.push(`    ${kind}: ${checkExpr(schema, b.type)},`);
        }
        out += `${sig} {\n  return R.alternate(v, p, ${quote(t.name)}, {\n${entries.join('\n')}\n  })${cast};\n}\n`;
        break;
      }
    }
  }
  return out;
}
