/**
 * The schema model and its checker. `buildSchema` turns parsed expressions
 * into definitions and rejects anything the generators could not handle,
 * with `FILE:LINE: message` errors.
 */
import { QapiSchemaError, type SourceInfo } from './errors.js';
import type { DocBlock } from './doc.js';
import type { ParsedSchema, QEntry, QNode, QObj, RawExpr } from './parser.js';

export const BUILTINS = [
  'str', 'int', 'int8', 'int16', 'int32', 'int64',
  'uint8', 'uint16', 'uint32', 'uint64', 'size', 'number', 'bool', 'null', 'any',
] as const;
export type BuiltinName = (typeof BUILTINS)[number];
export const INT_BUILTINS: ReadonlySet<string> = new Set([
  'int', 'int8', 'int16', 'int32', 'int64', 'uint8', 'uint16', 'uint32', 'uint64', 'size',
]);

/** A reference to a type: `name`, or an array of `name` when `array`. */
export interface TypeRef {
  readonly name: string;
  readonly array: boolean;
}

export interface Member {
  readonly name: string;
  readonly optional: boolean;
  readonly type: TypeRef;
  readonly info: SourceInfo;
}

interface DefBase {
  readonly name: string;
  readonly info: SourceInfo;
  readonly doc?: DocBlock | undefined;
  /** Invented by the generator (inline argument objects, union bases, …). */
  readonly implicit: boolean;
}

export interface BuiltinDef extends DefBase {
  readonly meta: 'builtin';
  readonly name: BuiltinName;
}
export interface StructDef extends DefBase {
  readonly meta: 'struct';
  readonly base?: string | undefined;
  /** Own members only; see `Schema.allMembers`. */
  readonly members: readonly Member[];
}
export interface EnumDef extends DefBase {
  readonly meta: 'enum';
  readonly values: readonly string[];
}
export interface AlternateDef extends DefBase {
  readonly meta: 'alternate';
  readonly branches: readonly Member[];
}
export interface UnionVariant {
  readonly name: string;
  /** The branch's object type (for simple unions, an implicit wrapper). */
  readonly type: string;
  readonly info: SourceInfo;
}
export interface UnionDef extends DefBase {
  readonly meta: 'union';
  /** Struct whose members every variant has (may be implicit). */
  readonly base: string;
  /** Name of the tag member (the discriminator; 'type' for simple unions). */
  readonly tag: string;
  /** Enum type of the tag member. */
  readonly tagEnum: string;
  readonly variants: readonly UnionVariant[];
  /** Legacy simple union: `{ 'type': KIND, 'data': VALUE }` on the wire. */
  readonly simple: boolean;
}
export interface CommandDef extends DefBase {
  readonly meta: 'command';
  /** Object type of the arguments (implicit for inline data), if any. */
  readonly args?: string | undefined;
  readonly boxed: boolean;
  readonly returns?: TypeRef | undefined;
  readonly allowOob: boolean;
}
export interface EventDef extends DefBase {
  readonly meta: 'event';
  readonly args?: string | undefined;
  readonly boxed: boolean;
}

export type TypeDef = BuiltinDef | StructDef | EnumDef | AlternateDef | UnionDef;
export type Definition = TypeDef | CommandDef | EventDef;

/** An item of the documentation stream, in source order. */
export type DocItem = { kind: 'free'; doc: DocBlock } | { kind: 'def'; def: Definition };

export class Schema {
  /** Every definition by name (builtins and implicit types included). */
  readonly defs = new Map<string, Definition>();
  /** Explicit definitions in source order. */
  readonly order: Definition[] = [];
  /** Free documentation and explicit definitions, in source order. */
  readonly docStream: DocItem[] = [];

  lookupType(name: string): TypeDef | undefined {
    const d = this.defs.get(name);
    return d && d.meta !== 'command' && d.meta !== 'event' ? d : undefined;
  }
  type(name: string): TypeDef {
    const t = this.lookupType(name);
    if (!t) throw new Error(`internal: no type ${name}`);
    return t;
  }
  struct(name: string): StructDef {
    const t = this.type(name);
    if (t.meta !== 'struct') throw new Error(`internal: ${name} is not a struct`);
    return t;
  }
  /** Members of a struct with its base chain's members first. */
  allMembers(name: string): Member[] {
    const s = this.struct(name);
    return [...(s.base ? this.allMembers(s.base) : []), ...s.members];
  }
  get commands(): CommandDef[] {
    return this.order.filter((d): d is CommandDef => d.meta === 'command');
  }
  get events(): EventDef[] {
    return this.order.filter((d): d is EventDef => d.meta === 'event');
  }
  /** Every type, explicit ones in source order, then implicit ones. */
  get types(): TypeDef[] {
    return [...this.defs.values()].filter((d): d is TypeDef => d.meta !== 'command' && d.meta !== 'event');
  }
}

const META_KEYS = ['struct', 'enum', 'union', 'alternate', 'command', 'event'] as const;
type MetaKey = (typeof META_KEYS)[number];
const ALLOWED: Record<MetaKey, readonly string[]> = {
  struct: ['struct', 'data', 'base', 'if', 'features'],
  enum: ['enum', 'data', 'prefix', 'if', 'features'],
  union: ['union', 'base', 'discriminator', 'data', 'if', 'features'],
  alternate: ['alternate', 'data', 'if', 'features'],
  command: ['command', 'data', 'returns', 'boxed', 'gen', 'success-response', 'allow-oob',
    'allow-preconfig', 'coroutine', 'if', 'features'],
  event: ['event', 'data', 'boxed', 'if', 'features'],
};

const NAME_RE = /^(__[a-z0-9.-]+_)?[A-Za-z][A-Za-z0-9_.-]*$/;
const MEMBER_RE = /^(__[a-z0-9.-]+_)?[A-Za-z][A-Za-z0-9_-]*$/;
const ENUM_VALUE_RE = /^(__[a-z0-9.-]+_)?[A-Za-z0-9][A-Za-z0-9_.-]*$/;

function fail(info: SourceInfo, msg: string): never {
  throw new QapiSchemaError(info, msg);
}
function at(info: SourceInfo, line: number): SourceInfo {
  return { file: info.file, line };
}
function get(e: QObj, key: string): QEntry | undefined {
  return e.v.find((x) => x.key === key);
}

/** Checks the parsed schema and builds the model. Throws QapiSchemaError. */
export function buildSchema(parsed: ParsedSchema): Schema {
  const schema = new Schema();
  const builtinInfo: SourceInfo = { file: '<builtin>', line: 0 };
  for (const b of BUILTINS) schema.defs.set(b, { meta: 'builtin', name: b, info: builtinInfo, implicit: true });

  // Pending reference checks, run after all names are known.
  const refs: Array<() => void> = [];
  const define = (d: Definition, where: SourceInfo) => {
    const prev = schema.defs.get(d.name);
    if (prev) {
      const was = prev.meta === 'builtin' ? 'a built-in type' : `already defined at ${prev.info.file}:${prev.info.line}`;
      fail(where, `'${d.name}' is ${was}`);
    }
    schema.defs.set(d.name, d);
  };
  const defineImplicit = (d: Definition) => {
    if (!schema.defs.has(d.name)) schema.defs.set(d.name, d);
  };

  for (const it of parsed.items) {
    if (it.kind === 'doc') {
      schema.docStream.push({ kind: 'free', doc: it.item.doc });
      continue;
    }
    const def = checkExpr(it.item);
    schema.order.push(def);
    schema.docStream.push({ kind: 'def', def });
  }

  function checkExpr(raw: RawExpr): Definition {
    const { expr, info, doc } = raw;
    const meta = META_KEYS.find((k) => get(expr, k));
    if (!meta) {
      const first = expr.v[0];
      fail(info, first
        ? `unknown definition keyword '${first.key}' (expected one of 'struct', 'enum', 'union', 'alternate', 'command', 'event', 'include')`
        : 'empty definition');
    }
    const nameEntry = get(expr, meta)!;
    if (nameEntry.value.t !== 'str') fail(at(info, nameEntry.keyLine), `'${meta}' requires a string name`);
    const name = nameEntry.value.v;
    const what = `${meta} '${name}'`;
    for (const other of META_KEYS) {
      if (other !== meta && get(expr, other)) fail(at(info, get(expr, other)!.keyLine), `${what}: '${other}' cannot be used in the same definition`);
    }
    for (const e of expr.v) {
      if (!ALLOWED[meta].includes(e.key)) fail(at(info, e.keyLine), `${what}: unknown key '${e.key}'`);
    }
    if (!NAME_RE.test(name)) fail(info, `${what}: invalid name`);
    if (meta === 'event' && !/^[A-Z][A-Z0-9_]*$/.test(name)) fail(info, `${what}: event names must be upper case`);
    if (name.startsWith('q_') || name.endsWith('List') && meta !== 'command' && meta !== 'event') {
      fail(info, `${what}: name is reserved`);
    }
    if (doc && doc.symbol !== name) fail(doc.info, `documentation is for '${doc.symbol}' but the definition that follows is '${name}'`);
    for (const flag of ['boxed', 'gen', 'success-response', 'allow-oob', 'allow-preconfig', 'coroutine']) {
      const f = get(expr, flag);
      if (f && f.value.t !== 'bool') fail(at(info, f.keyLine), `${what}: '${flag}' must be true or false`);
    }
    const features = get(expr, 'features');
    if (features && features.value.t !== 'list') fail(at(info, features.keyLine), `${what}: 'features' must be a list`);

    switch (meta) {
      case 'struct':
        return checkStruct(expr, name, info, doc);
      case 'enum':
        return checkEnum(expr, name, info, doc);
      case 'alternate':
        return checkAlternate(expr, name, info, doc);
      case 'union':
        return checkUnion(expr, name, info, doc);
      case 'command':
        return checkCommand(expr, name, info, doc);
      case 'event':
        return checkEvent(expr, name, info, doc);
    }
  }

  function typeRef(node: QNode, what: string, info: SourceInfo, line: number, allowArray: boolean): TypeRef {
    if (node.t === 'str') return { name: node.v, array: false };
    if (node.t === 'list' && allowArray) {
      if (node.v.length !== 1 || node.v[0]!.t !== 'str') fail(at(info, line), `${what}: an array type must be written as a list of exactly one type name`);
      return { name: (node.v[0] as { v: string }).v, array: true };
    }
    return fail(at(info, line), `${what} must be a type name${allowArray ? ' or a one-element list' : ''}`);
  }

  function useType(ref: TypeRef, what: string, where: SourceInfo, accept?: (t: TypeDef) => string | undefined) {
    refs.push(() => {
      const t = schema.lookupType(ref.name);
      if (!t) fail(where, `${what} uses unknown type '${ref.name}'`);
      const bad = accept?.(t);
      if (bad) fail(where, `${what} ${bad}`);
    });
  }

  function members(node: QNode, owner: string, info: SourceInfo, line: number): Member[] {
    if (node.t !== 'obj') fail(at(info, line), `${owner}: 'data' must be an object`);
    const out: Member[] = [];
    for (const e of node.v) {
      const optional = e.key.startsWith('*');
      const mname = optional ? e.key.slice(1) : e.key;
      const where = at(info, e.keyLine);
      if (!MEMBER_RE.test(mname)) fail(where, `${owner}: member '${e.key}' has an invalid name`);
      if (out.some((m) => m.name === mname)) fail(where, `${owner}: member '${mname}' is defined twice`);
      const type = typeRef(e.value, `${owner}: member '${mname}'`, info, e.keyLine, true);
      useType(type, `${owner}: member '${mname}'`, where, (t) => (t.meta === 'builtin' && type.array && t.name === 'null' ? 'cannot be an array of null' : undefined));
      out.push({ name: mname, optional, type, info: where });
    }
    return out;
  }

  function checkStruct(expr: QObj, name: string, info: SourceInfo, doc?: DocBlock): StructDef {
    const data = get(expr, 'data');
    if (!data) fail(info, `struct '${name}': 'data' is missing`);
    const ms = members(data.value, `struct '${name}'`, info, data.keyLine);
    const baseE = get(expr, 'base');
    let base: string | undefined;
    if (baseE) {
      if (baseE.value.t !== 'str') fail(at(info, baseE.keyLine), `struct '${name}': 'base' must be a struct type name`);
      base = baseE.value.v;
      const where = at(info, baseE.keyLine);
      useType({ name: base, array: false }, `struct '${name}': base`, where, (t) => (t.meta === 'struct' ? undefined : `must be a struct, but '${t.name}' is ${article(t.meta)}`));
      refs.push(() => {
        // Cycle and clash checks once the base is known to be a struct.
        const seen = new Set<string>([name]);
        let b: string | undefined = base;
        while (b) {
          if (seen.has(b)) fail(where, `struct '${name}': base chain loops through '${b}'`);
          seen.add(b);
          b = (schema.defs.get(b) as StructDef).base;
        }
      });
    }
    const def: StructDef = { meta: 'struct', name, info, doc, implicit: false, base, members: ms };
    define(def, info);
    if (base) refs.push(() => checkClashes(`struct '${name}'`, schema.allMembers(name)));
    return def;
  }

  function checkClashes(owner: string, ms: readonly Member[]) {
    const seen = new Set<string>();
    for (const m of ms) {
      if (seen.has(m.name)) fail(m.info, `${owner}: member '${m.name}' clashes with an inherited member`);
      seen.add(m.name);
    }
  }

  function checkEnum(expr: QObj, name: string, info: SourceInfo, doc?: DocBlock): EnumDef {
    const data = get(expr, 'data');
    if (!data) fail(info, `enum '${name}': 'data' is missing`);
    if (data.value.t !== 'list') fail(at(info, data.keyLine), `enum '${name}': 'data' must be a list`);
    const values: string[] = [];
    for (const v of data.value.v) {
      let s: string;
      if (v.t === 'str') s = v.v;
      else if (v.t === 'obj' && get(v, 'name')?.value.t === 'str') s = (get(v, 'name')!.value as { v: string }).v;
      else fail(at(info, v.line), `enum '${name}': values must be strings`);
      if (!ENUM_VALUE_RE.test(s)) fail(at(info, v.line), `enum '${name}': value '${s}' has an invalid name`);
      if (values.includes(s)) fail(at(info, v.line), `enum '${name}': value '${s}' is listed twice`);
      values.push(s);
    }
    const def: EnumDef = { meta: 'enum', name, info, doc, implicit: false, values };
    define(def, info);
    return def;
  }

  function checkAlternate(expr: QObj, name: string, info: SourceInfo, doc?: DocBlock): AlternateDef {
    const data = get(expr, 'data');
    if (!data) fail(info, `alternate '${name}': 'data' is missing`);
    if (data.value.t !== 'obj' || data.value.v.length === 0) fail(at(info, data.keyLine), `alternate '${name}': 'data' must be a non-empty object`);
    const branches: Member[] = [];
    for (const e of data.value.v) {
      const where = at(info, e.keyLine);
      if (e.key.startsWith('*') || !MEMBER_RE.test(e.key)) fail(where, `alternate '${name}': branch '${e.key}' has an invalid name`);
      const type = typeRef(e.value, `alternate '${name}': branch '${e.key}'`, info, e.keyLine, false);
      useType(type, `alternate '${name}': branch '${e.key}'`, where);
      branches.push({ name: e.key, optional: false, type, info: where });
    }
    refs.push(() => {
      const kinds = new Map<string, string>();
      for (const b of branches) {
        const t = schema.type(b.type.name);
        const ks = jsonKinds(t);
        if (!ks) fail(b.info, `alternate '${name}': branch '${b.name}' cannot use type '${t.name}'`);
        for (const k of ks) {
          const prev = kinds.get(k);
          if (prev) fail(b.info, `alternate '${name}': branches '${prev}' and '${b.name}' both accept ${k}`);
          kinds.set(k, b.name);
        }
      }
    });
    const def: AlternateDef = { meta: 'alternate', name, info, doc, implicit: false, branches };
    define(def, info);
    return def;
  }

  function checkUnion(expr: QObj, name: string, info: SourceInfo, doc?: DocBlock): UnionDef {
    const what = `union '${name}'`;
    const data = get(expr, 'data');
    if (!data) fail(info, `${what}: 'data' is missing`);
    if (data.value.t !== 'obj') fail(at(info, data.keyLine), `${what}: 'data' must be an object`);
    const baseE = get(expr, 'base');
    const discE = get(expr, 'discriminator');
    if (baseE && !discE) fail(at(info, baseE.keyLine), `${what}: 'discriminator' is missing`);
    if (discE && !baseE) fail(at(info, discE.keyLine), `${what}: 'discriminator' requires 'base'`);
    const branchEntries = data.value.v;
    for (const e of branchEntries) {
      if (e.key.startsWith('*') || !ENUM_VALUE_RE.test(e.key)) fail(at(info, e.keyLine), `${what}: branch '${e.key}' has an invalid name`);
    }

    if (!baseE || !discE) {
      // Simple union: implicit kind enum, implicit base {type}, wrapper objects.
      const tagEnum = `${name}Kind`;
      defineImplicit({ meta: 'enum', name: tagEnum, info, implicit: true, values: branchEntries.map((e) => e.key) });
      const baseName = `q_obj_${name}-base`;
      defineImplicit({ meta: 'struct', name: baseName, info, implicit: true, members: [{ name: 'type', optional: false, type: { name: tagEnum, array: false }, info }] });
      const variants: UnionVariant[] = [];
      for (const e of branchEntries) {
        const where = at(info, e.keyLine);
        const type = typeRef(e.value, `${what}: branch '${e.key}'`, info, e.keyLine, true);
        useType(type, `${what}: branch '${e.key}'`, where);
        const wrapper = `q_obj_${type.array ? type.name + 'List' : type.name}-wrapper`;
        defineImplicit({ meta: 'struct', name: wrapper, info, implicit: true, members: [{ name: 'data', optional: false, type, info: where }] });
        variants.push({ name: e.key, type: wrapper, info: where });
      }
      const def: UnionDef = { meta: 'union', name, info, doc, implicit: false, base: baseName, tag: 'type', tagEnum, variants, simple: true };
      define(def, info);
      return def;
    }

    let baseName: string;
    if (baseE.value.t === 'str') {
      baseName = baseE.value.v;
      useType({ name: baseName, array: false }, `${what}: base`, at(info, baseE.keyLine), (t) => (t.meta === 'struct' ? undefined : `must be a struct, but '${t.name}' is ${article(t.meta)}`));
    } else if (baseE.value.t === 'obj') {
      baseName = `q_obj_${name}-base`;
      const ms = members(baseE.value, what, info, baseE.keyLine);
      defineImplicit({ meta: 'struct', name: baseName, info: at(info, baseE.keyLine), implicit: true, members: ms });
    } else {
      fail(at(info, baseE.keyLine), `${what}: 'base' must be a struct name or an object`);
    }
    if (discE.value.t !== 'str') fail(at(info, discE.keyLine), `${what}: 'discriminator' must be a member name`);
    const tag = discE.value.v;
    const discWhere = at(info, discE.keyLine);
    const variants: UnionVariant[] = [];
    for (const e of branchEntries) {
      const where = at(info, e.keyLine);
      const type = typeRef(e.value, `${what}: branch '${e.key}'`, info, e.keyLine, false);
      useType(type, `${what}: branch '${e.key}'`, where, (t) => (t.meta === 'struct' ? undefined : `must be a struct, but '${t.name}' is ${article(t.meta)}`));
      variants.push({ name: e.key, type: type.name, info: where });
    }
    const holder: { tagEnum: string } = { tagEnum: '' };
    refs.push(() => {
      const baseMembers = schema.allMembers(baseName);
      const m = baseMembers.find((x) => x.name === tag);
      if (!m) fail(discWhere, `${what}: discriminator '${tag}' is not a member of ${schema.type(baseName).implicit ? 'the base' : `base '${baseName}'`}`);
      const t = schema.type(m.type.name);
      if (m.type.array || t.meta !== 'enum') fail(discWhere, `${what}: discriminator member '${tag}' must be of enum type`);
      if (m.optional) fail(discWhere, `${what}: discriminator member '${tag}' must not be optional`);
      holder.tagEnum = t.name;
      for (const v of variants) {
        if (!t.values.includes(v.name)) fail(v.info, `${what}: branch '${v.name}' is not a value of enum '${t.name}'`);
        const all = [...baseMembers, ...schema.allMembers(v.type)];
        const seen = new Set<string>();
        for (const x of all) {
          if (seen.has(x.name)) fail(v.info, `${what}: member '${x.name}' of branch '${v.name}' clashes with a base member`);
          seen.add(x.name);
        }
      }
    });
    const def: UnionDef = {
      meta: 'union', name, info, doc, implicit: false, base: baseName, tag,
      get tagEnum() {
        return holder.tagEnum;
      },
      variants, simple: false,
    };
    define(def, info);
    return def;
  }

  function argsType(expr: QObj, owner: string, implicitName: string, info: SourceInfo, boxed: boolean): string | undefined {
    const data = get(expr, 'data');
    if (boxed && (!data || data.value.t !== 'str')) {
      fail(data ? at(info, data.keyLine) : info, `${owner}: 'boxed': true requires 'data' to name a struct or union type`);
    }
    if (!data) return undefined;
    const where = at(info, data.keyLine);
    if (data.value.t === 'str') {
      const ref = data.value.v;
      useType({ name: ref, array: false }, `${owner}: 'data'`, where, (t) =>
        t.meta === 'struct' || (boxed && t.meta === 'union')
          ? undefined
          : boxed
            ? `must name a struct or union type, but '${t.name}' is ${article(t.meta)}`
            : `must name a struct type, but '${t.name}' is ${article(t.meta)}`);
      return ref;
    }
    const ms = members(data.value, owner, info, data.keyLine);
    defineImplicit({ meta: 'struct', name: implicitName, info: where, implicit: true, members: ms });
    return implicitName;
  }

  function checkCommand(expr: QObj, name: string, info: SourceInfo, doc?: DocBlock): CommandDef {
    const what = `command '${name}'`;
    const boxed = (get(expr, 'boxed')?.value as { v?: unknown } | undefined)?.v === true;
    const args = argsType(expr, what, `q_obj_${name}-arg`, info, boxed);
    const retE = get(expr, 'returns');
    let returns: TypeRef | undefined;
    if (retE) {
      returns = typeRef(retE.value, `${what}: 'returns'`, info, retE.keyLine, true);
      useType(returns, `${what}: 'returns'`, at(info, retE.keyLine));
    }
    const allowOob = (get(expr, 'allow-oob')?.value as { v?: unknown } | undefined)?.v === true;
    const def: CommandDef = { meta: 'command', name, info, doc, implicit: false, args, boxed, returns, allowOob };
    define(def, info);
    return def;
  }

  function checkEvent(expr: QObj, name: string, info: SourceInfo, doc?: DocBlock): EventDef {
    const what = `event '${name}'`;
    const boxed = (get(expr, 'boxed')?.value as { v?: unknown } | undefined)?.v === true;
    const args = argsType(expr, what, `q_obj_${name}-arg`, info, boxed);
    const def: EventDef = { meta: 'event', name, info, doc, implicit: false, args, boxed };
    define(def, info);
    return def;
  }

  for (const r of refs) r();
  return schema;
}

function article(meta: string): string {
  return /^[aeiou]/.test(meta) ? `an ${meta}` : `a ${meta}`;
}

/** JSON value kinds a type accepts (used for alternate dispatch), or undefined if unusable. */
export function jsonKinds(t: TypeDef): string[] | undefined {
  switch (t.meta) {
    case 'builtin':
      if (t.name === 'str') return ['a string'];
      if (t.name === 'bool') return ['a boolean'];
      if (t.name === 'null') return ['null'];
      if (t.name === 'any') return undefined;
      return ['a number'];
    case 'enum':
      return ['a string'];
    case 'struct':
    case 'union':
      return ['an object'];
    case 'alternate':
      return undefined;
  }
}
