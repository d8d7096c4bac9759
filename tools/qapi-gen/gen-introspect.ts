/**
 * Backend: src/generated/qapi-introspect.ts, the answer of query-qmp-schema
 * in QEMU's SchemaInfo format. Commands and events come first in schema
 * order, then every type they reach, in the order first reached. Integer
 * types are reported as `int` and all number types as `number`, as QEMU
 * does; names are not masked.
 */
import { INT_BUILTINS, type Schema, type TypeRef } from './schema.js';
import { header } from './util.js';

const JSON_TYPE: Record<string, string> = {
  str: 'string', number: 'number', bool: 'boolean', null: 'null', any: 'value', int: 'int',
};

export const EMPTY_OBJECT = 'q_empty';

export function buildIntrospection(schema: Schema): Array<Record<string, unknown>> {
  const out: Array<Record<string, unknown>> = [];
  const used: string[] = [];
  const usedSet = new Set<string>();
  let needEmpty = false;

  const use = (ref: TypeRef | string | undefined): string => {
    if (ref === undefined) {
      needEmpty = true;
      return EMPTY_OBJECT;
    }
    const r = typeof ref === 'string' ? { name: ref, array: false } : ref;
    let name = r.name;
    if (INT_BUILTINS.has(name)) name = 'int';
    const key = r.array ? `[${name}]` : name;
    if (!usedSet.has(key)) {
      usedSet.add(key);
      used.push(key);
    }
    return key;
  };

  for (const d of schema.order) {
    if (d.meta === 'command') {
      const e: Record<string, unknown> = {
        name: d.name,
        'meta-type': 'command',
        'arg-type': use(d.args),
        'ret-type': use(d.returns),
      };
      if (d.allowOob) e['allow-oob'] = true;
      out.push(e);
    } else if (d.meta === 'event') {
      out.push({ name: d.name, 'meta-type': 'event', 'arg-type': use(d.args) });
    }
  }

  for (let i = 0; i < used.length; i++) {
    const key = used[i]!;
    if (key.startsWith('[')) {
      const elem = key.slice(1, -1);
      out.push({ name: key, 'meta-type': 'array', 'element-type': use(elem) });
      continue;
    }
    const t = schema.type(key);
    switch (t.meta) {
      case 'builtin':
        out.push({ name: t.name, 'meta-type': 'builtin', 'json-type': JSON_TYPE[t.name] });
        break;
      case 'enum':
        out.push({ name: t.name, 'meta-type': 'enum', members: t.values.map((v) => ({ name: v })), values: [...t.values] });
        break;
      case 'alternate':
        out.push({ name: t.name, 'meta-type': 'alternate', members: t.branches.map((b) => ({ type: use(b.type) })) });
        break;
      case 'struct':
        out.push({ name: t.name, 'meta-type': 'object', members: objMembers(schema.allMembers(t.name)) });
        break;
      case 'union':
        out.push({
          name: t.name,
          'meta-type': 'object',
          members: objMembers(schema.allMembers(t.base)),
          tag: t.tag,
          variants: t.variants.map((v) => ({ case: v.name, type: use(v.type) })),
        });
        break;
    }
  }
  if (needEmpty) out.push({ name: EMPTY_OBJECT, 'meta-type': 'object', members: [] });
  return out;

  function objMembers(ms: ReturnType<Schema['allMembers']>) {
    return ms.map((m) => {
      const o: Record<string, unknown> = { name: m.name, type: use(m.type) };
      if (m.optional) o['default'] = null;
      return o;
    });
  }
}

export function genIntrospect(schema: Schema, source: string): string {
  const entries = buildIntrospection(schema);
  let out = header(source, 'schema introspection data');
  out += `/** The schema in QEMU's SchemaInfo format: the result of query-qmp-schema. */\n`;
  out += `export const QMP_SCHEMA: readonly unknown[] = [\n`;
  for (const e of entries) out += `  ${JSON.stringify(e)},\n`;
  out += `];\n`;
  return out;
}
