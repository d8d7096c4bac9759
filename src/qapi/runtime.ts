/**
 * Runtime support for the generated argument validators
 * (src/generated/qapi-validators.ts).
 *
 * A validator takes an untrusted JSON value and either returns a fresh copy
 * that matches the schema type or throws QapiError with the text QEMU's
 * QMP input visitor uses. Validators never modify their input and have no
 * other side effects, so a command is only run once all of its arguments
 * have been accepted.
 *
 * Error locations: `full` is the path QEMU prints for missing, mistyped,
 * unexpected and invalid-enum errors (`capabilities[0].state`); `name` is
 * the bare member name QEMU prints for integer range errors (`null` for a
 * list element).
 */
import { QapiError } from './errors.js';

/** Where a value sits in the argument object. */
export interface Path {
  readonly full: string | null;
  readonly name: string | null;
}

/** A validator for one type. */
export type Check<T = unknown> = (value: unknown, path: Path) => T;

/** One member of an object type: [name, optional, validator]. */
export type Field = readonly [name: string, optional: boolean, check: Check];

/** The path of a command's whole argument object. */
export const ROOT: Path = { full: null, name: null };

export function member(p: Path, name: string): Path {
  return { full: p.full === null || p.full === '' ? name : `${p.full}.${name}`, name };
}

export function element(p: Path, index: number): Path {
  return { full: `${p.full ?? ''}[${index}]`, name: null };
}

function shown(p: Path): string {
  return p.full === null || p.full === '' ? 'null' : p.full;
}

/** Expected-type names, as QEMU prints them. */
export type Expected = 'string' | 'integer' | 'number' | 'boolean' | 'object' | 'array' | 'null' | (string & {});

export function typeError(p: Path, expected: Expected): QapiError {
  return new QapiError(`Invalid parameter type for '${shown(p)}', expected: ${expected}`);
}
export function missingError(p: Path): QapiError {
  return new QapiError(`Parameter '${shown(p)}' is missing`);
}
export function unexpectedError(p: Path): QapiError {
  return new QapiError(`Parameter '${shown(p)}' is unexpected`);
}
/** "Parameter 'x' expects uint8_t": integer range errors (bare member name). */
export function valueError(name: string | null, expects: string): QapiError {
  return new QapiError(`Parameter '${name ?? 'null'}' expects ${expects}`);
}

const hasOwn = (o: object, k: string): boolean => Object.prototype.hasOwnProperty.call(o, k);

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

// ---- builtin types -------------------------------------------------------

export const str: Check<string> = (v, p) => {
  if (typeof v !== 'string') throw typeError(p, 'string');
  return v;
};

export const bool: Check<boolean> = (v, p) => {
  if (typeof v !== 'boolean') throw typeError(p, 'boolean');
  return v;
};

export const number: Check<number> = (v, p) => {
  if (typeof v !== 'number' || !Number.isFinite(v)) throw typeError(p, 'number');
  return v;
};

export const nul: Check<null> = (v, p) => {
  if (v !== null) throw typeError(p, 'null');
  return null;
};

/** The `any` type: every JSON value is accepted (and not copied). */
export const any: Check<unknown> = (v, p) => {
  if (v === undefined) throw missingError(p);
  return v;
};

const INT64_MIN = -(2 ** 63);
const INT64_LIMIT = 2 ** 63; // exclusive
const UINT64_LIMIT = 2 ** 64; // exclusive

/** int / int64: a JSON number without a fraction, within int64. */
export const int64: Check<number> = (v, p) => {
  if (typeof v !== 'number' || !Number.isInteger(v) || v < INT64_MIN || v >= INT64_LIMIT) {
    throw typeError(p, 'integer');
  }
  return v;
};

/**
 * A non-negative JSON integer below 2^64 (uint64, size). QEMU 7.2 quietly
 * wraps negative numbers around; we refuse them with its range-error text.
 */
function unsigned64(label: string): Check<number> {
  return (v, p) => {
    if (typeof v !== 'number' || !Number.isInteger(v)) throw typeError(p, 'integer');
    if (v < 0 || v >= UINT64_LIMIT) throw valueError(p.full ?? p.name, label);
    return v;
  };
}

export const uint64: Check<number> = unsigned64('uint64');

function signed(bits: 8 | 16 | 32): Check<number> {
  const max = 2 ** (bits - 1) - 1;
  const min = -(2 ** (bits - 1));
  const label = `int${bits}_t`;
  return (v, p) => {
    const n = int64(v, p);
    if (n < min || n > max) throw valueError(p.name, label);
    return n;
  };
}

function unsigned(bits: 8 | 16 | 32): Check<number> {
  const max = 2 ** bits - 1;
  const label = `uint${bits}_t`;
  return (v, p) => {
    if (typeof v !== 'number' || !Number.isInteger(v)) throw typeError(p, 'integer');
    if (v < 0 || v > max) throw valueError(p.name, label);
    return v;
  };
}

export const int: Check<number> = int64;
export const int8: Check<number> = signed(8);
export const int16: Check<number> = signed(16);
export const int32: Check<number> = signed(32);
export const uint8: Check<number> = unsigned(8);
export const uint16: Check<number> = unsigned(16);
export const uint32: Check<number> = unsigned(32);
export const size: Check<number> = unsigned64('size');

// ---- composite types -----------------------------------------------------

/** A value of an enumeration: a string from `values`. */
export function enumValue<T extends string>(v: unknown, p: Path, values: readonly T[]): T {
  if (typeof v !== 'string') throw typeError(p, 'string');
  if (!(values as readonly string[]).includes(v)) {
    throw new QapiError(`Parameter '${shown(p)}' does not accept value '${v}'`);
  }
  return v as T;
}

/** A JSON array whose elements all pass `check`. */
export function list<T>(v: unknown, p: Path, check: Check<T>): T[] {
  if (!Array.isArray(v)) throw typeError(p, 'array');
  const out: T[] = [];
  for (let i = 0; i < v.length; i++) out.push(check(v[i], element(p, i)));
  return out;
}

/** The value as a JSON object, or a type error. */
export function object(v: unknown, p: Path): Record<string, unknown> {
  if (!isPlainObject(v)) throw typeError(p, 'object');
  return v;
}

/** Validates `fields` of `o` into `out`, in schema order. */
export function members(o: Record<string, unknown>, out: Record<string, unknown>, p: Path, fields: readonly Field[]): void {
  for (const [name, optional, check] of fields) {
    if (!hasOwn(o, name)) {
      if (optional) continue;
      throw missingError(member(p, name));
    }
    out[name] = check(o[name], member(p, name));
  }
}

/** Rejects the first key of `o` that no field names. */
export function noExtra(o: Record<string, unknown>, p: Path, ...fieldLists: ReadonlyArray<readonly Field[]>): void {
  for (const key of Object.keys(o)) {
    if (!fieldLists.some((fl) => fl.some((f) => f[0] === key))) throw unexpectedError(member(p, key));
  }
}

/** A struct: an object with exactly the given members (optional ones may be absent). */
export function struct(v: unknown, p: Path, fields: readonly Field[]): Record<string, unknown> {
  const o = object(v, p);
  const out: Record<string, unknown> = {};
  members(o, out, p, fields);
  noExtra(o, p, fields);
  return out;
}

/**
 * A flat union: the base members (including the tag), then the members of
 * the branch the tag selects. A tag value without a branch adds nothing.
 */
export function flatUnion(
  v: unknown,
  p: Path,
  base: readonly Field[],
  tag: string,
  branches: Readonly<Record<string, readonly Field[]>>,
): Record<string, unknown> {
  const o = object(v, p);
  const out: Record<string, unknown> = {};
  members(o, out, p, base);
  const t = out[tag] as string;
  const branch = hasOwn(branches, t) ? branches[t]! : [];
  members(o, out, p, branch);
  noExtra(o, p, base, branch);
  return out;
}

/** A simple union: `{ type: KIND, data: VALUE }` with VALUE checked per kind. */
export function simpleUnion(
  v: unknown,
  p: Path,
  kinds: readonly string[],
  branches: Readonly<Record<string, Check>>,
): Record<string, unknown> {
  const o = object(v, p);
  const typeField: Field = ['type', false, (x, q) => enumValue(x, q, kinds)];
  const out: Record<string, unknown> = {};
  members(o, out, p, [typeField]);
  const check = branches[out['type'] as string]!;
  members(o, out, p, [['data', false, check]]);
  noExtra(o, p, [typeField, ['data', false, check]]);
  return out;
}

/** The JSON kinds an alternate can dispatch on. */
export interface AlternateBranches {
  readonly string?: Check;
  readonly number?: Check;
  readonly boolean?: Check;
  readonly null?: Check;
  readonly object?: Check;
}

/** An alternate: the branch is chosen by the JSON kind of the value. */
export function alternate(v: unknown, p: Path, typeName: string, branches: AlternateBranches): unknown {
  let check: Check | undefined;
  if (typeof v === 'string') check = branches.string;
  else if (typeof v === 'number') check = branches.number;
  else if (typeof v === 'boolean') check = branches.boolean;
  else if (v === null) check = branches.null;
  else if (isPlainObject(v)) check = branches.object;
  if (!check) throw typeError(p, typeName);
  return check(v, p);
}
