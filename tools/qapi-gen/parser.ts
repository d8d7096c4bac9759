/**
 * Lexer and parser for the QAPI schema language: JSON-like values with
 * single-quoted strings, `#` line comments, documentation blocks framed by
 * `##` lines, several top-level objects back to back, and `include`.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { QapiSchemaError, type SourceInfo } from './errors.js';
import { parseDocBlock, type DocBlock } from './doc.js';

/** A parsed value, with the line it started on. */
export type QNode =
  | { readonly t: 'str'; readonly v: string; readonly line: number }
  | { readonly t: 'bool'; readonly v: boolean; readonly line: number }
  | { readonly t: 'list'; readonly v: readonly QNode[]; readonly line: number }
  | { readonly t: 'obj'; readonly v: readonly QEntry[]; readonly line: number };

/** One key/value pair of an object, in source order. */
export interface QEntry {
  readonly key: string;
  readonly keyLine: number;
  readonly value: QNode;
}

export type QObj = Extract<QNode, { t: 'obj' }>;

/** A top-level definition with its location and attached documentation. */
export interface RawExpr {
  readonly expr: QObj;
  readonly info: SourceInfo;
  readonly doc?: DocBlock;
}

/** A documentation block that is not attached to a definition (headings, prose). */
export interface FreeDoc {
  readonly doc: DocBlock;
  readonly info: SourceInfo;
}

/** Everything read from the schema, in source order (includes expanded in place). */
export interface ParsedSchema {
  readonly items: ReadonlyArray<{ kind: 'expr'; item: RawExpr } | { kind: 'doc'; item: FreeDoc }>;
  /** Every file read, as display names. */
  readonly files: readonly string[];
}

type Tok =
  | { k: 'punct'; v: '{' | '}' | '[' | ']' | ',' | ':'; line: number }
  | { k: 'str'; v: string; line: number }
  | { k: 'bool'; v: boolean; line: number }
  | { k: 'doc'; lines: string[]; line: number }
  | { k: 'eof'; line: number };

/** Turns one file's text into tokens. Doc blocks are tokens; plain comments vanish. */
export function tokenize(text: string, file: string): Tok[] {
  const toks: Tok[] = [];
  let i = 0;
  let line = 1;
  const n = text.length;
  const fail = (l: number, msg: string): never => {
    throw new QapiSchemaError({ file, line: l }, msg);
  };
  while (i < n) {
    const c = text[i]!;
    if (c === '\n') {
      line++;
      i++;
      continue;
    }
    if (c === ' ' || c === '\t' || c === '\r') {
      i++;
      continue;
    }
    if (c === '#') {
      const eol = text.indexOf('\n', i);
      const end = eol < 0 ? n : eol;
      const body = text.slice(i, end).replace(/\r$/, '');
      const atLineStart = text.slice(text.lastIndexOf('\n', i - 1) + 1, i).trim() === '';
      if (body === '##' && atLineStart) {
        // Documentation block: lines starting with '#' up to a closing '##'.
        const startLine = line;
        const lines: string[] = [];
        i = end;
        for (;;) {
          if (i >= n) fail(startLine, 'documentation block is not closed by a "##" line');
          i++; // newline
          line++;
          const e2 = text.indexOf('\n', i);
          const lend = e2 < 0 ? n : e2;
          const raw = text.slice(i, lend).replace(/\r$/, '');
          const trimmed = raw.trimStart();
          if (trimmed === '##') {
            i = lend;
            break;
          }
          if (!trimmed.startsWith('#')) {
            fail(line, 'documentation block is not closed by a "##" line');
          }
          if (trimmed.startsWith('##')) fail(line, 'unexpected "##" inside a documentation block');
          let content = trimmed.slice(1);
          if (content.startsWith(' ')) content = content.slice(1);
          else if (content !== '') fail(line, 'documentation line must start with "# "');
          lines.push(content);
          i = lend;
        }
        toks.push({ k: 'doc', lines, line: startLine });
        continue;
      }
      i = end;
      continue;
    }
    if ('{}[],:'.includes(c)) {
      toks.push({ k: 'punct', v: c as '{', line });
      i++;
      continue;
    }
    if (c === "'") {
      const start = line;
      let s = '';
      i++;
      for (;;) {
        if (i >= n || text[i] === '\n') fail(start, 'missing terminating "\'"');
        const d = text[i]!;
        if (d === "'") {
          i++;
          break;
        }
        if (d === '\\') {
          const e = text[i + 1];
          if (e === "'" || e === '\\' || e === '"' || e === '/') {
            s += e;
            i += 2;
            continue;
          }
          fail(line, `unknown escape \\${e ?? ''}`);
        }
        if (d.charCodeAt(0) < 0x20) fail(line, 'control character in string');
        s += d;
        i++;
      }
      toks.push({ k: 'str', v: s, line: start });
      continue;
    }
    const word = /^[A-Za-z_][A-Za-z0-9_-]*/.exec(text.slice(i, i + 64));
    if (word) {
      if (word[0] === 'true' || word[0] === 'false') {
        toks.push({ k: 'bool', v: word[0] === 'true', line });
        i += word[0].length;
        continue;
      }
      fail(line, `stray '${word[0]}'`);
    }
    if (c === '"') fail(line, 'strings are single-quoted in the schema language');
    fail(line, `stray '${c}'`);
  }
  toks.push({ k: 'eof', line });
  return toks;
}

function describe(t: Tok): string {
  switch (t.k) {
    case 'punct':
      return `'${t.v}'`;
    case 'str':
      return 'a string';
    case 'bool':
      return `'${t.v}'`;
    case 'doc':
      return 'a documentation block';
    case 'eof':
      return 'end of file';
  }
}

class TokParser {
  private pos = 0;
  constructor(
    private readonly toks: Tok[],
    private readonly file: string,
  ) {}

  peek(): Tok {
    return this.toks[this.pos]!;
  }
  next(): Tok {
    return this.toks[this.pos++]!;
  }
  fail(line: number, msg: string): never {
    throw new QapiSchemaError({ file: this.file, line }, msg);
  }

  value(): QNode {
    const t = this.next();
    switch (t.k) {
      case 'str':
        return { t: 'str', v: t.v, line: t.line };
      case 'bool':
        return { t: 'bool', v: t.v, line: t.line };
      case 'punct':
        if (t.v === '{') return this.object(t.line);
        if (t.v === '[') return this.list(t.line);
        break;
      case 'doc':
        this.fail(t.line, 'documentation block inside an expression');
    }
    return this.fail(t.line, `expected a value, found ${describe(t)}`);
  }

  object(line: number): QObj {
    const entries: QEntry[] = [];
    const seen = new Set<string>();
    let t = this.peek();
    if (t.k === 'punct' && t.v === '}') {
      this.next();
      return { t: 'obj', v: entries, line };
    }
    for (;;) {
      t = this.next();
      if (t.k !== 'str') this.fail(t.line, `expected a string key, found ${describe(t)}`);
      const key = t.v;
      if (seen.has(key)) this.fail(t.line, `duplicate key '${key}'`);
      seen.add(key);
      const colon = this.next();
      if (colon.k !== 'punct' || colon.v !== ':') this.fail(colon.line, `expected ':', found ${describe(colon)}`);
      const value = this.value();
      entries.push({ key, keyLine: t.line, value });
      const sep = this.next();
      if (sep.k === 'punct' && sep.v === '}') return { t: 'obj', v: entries, line };
      if (sep.k !== 'punct' || sep.v !== ',') this.fail(sep.line, `expected ',' or '}', found ${describe(sep)}`);
    }
  }

  list(line: number): QNode {
    const items: QNode[] = [];
    let t = this.peek();
    if (t.k === 'punct' && t.v === ']') {
      this.next();
      return { t: 'list', v: items, line };
    }
    for (;;) {
      items.push(this.value());
      t = this.next();
      if (t.k === 'punct' && t.v === ']') return { t: 'list', v: items, line };
      if (t.k !== 'punct' || t.v !== ',') this.fail(t.line, `expected ',' or ']', found ${describe(t)}`);
    }
  }
}

/** Parses one file's text into top-level items (no include processing). */
export function parseText(
  text: string,
  file: string,
): Array<{ kind: 'expr'; expr: QObj; doc?: DocBlock; docLine?: number } | { kind: 'doc'; doc: DocBlock; line: number }> {
  const toks = tokenize(text, file);
  const p = new TokParser(toks, file);
  const out: Array<{ kind: 'expr'; expr: QObj; doc?: DocBlock; docLine?: number } | { kind: 'doc'; doc: DocBlock; line: number }> = [];
  let pending: { doc: DocBlock; line: number } | undefined;
  for (;;) {
    const t = p.next();
    if (t.k === 'eof') break;
    if (t.k === 'doc') {
      if (pending) out.push({ kind: 'doc', doc: pending.doc, line: pending.line });
      const doc = parseDocBlock(t.lines, { file, line: t.line });
      if (doc.symbol === undefined) {
        out.push({ kind: 'doc', doc, line: t.line });
        pending = undefined;
      } else {
        pending = { doc, line: t.line };
      }
      continue;
    }
    if (t.k !== 'punct' || t.v !== '{') p.fail(t.line, `expected '{' at the start of a definition, found ${describe(t)}`);
    const expr = p.object(t.line);
    if (pending && !isInclude(expr)) {
      out.push({ kind: 'expr', expr, doc: pending.doc, docLine: pending.line });
      pending = undefined;
    } else {
      out.push({ kind: 'expr', expr });
    }
  }
  if (pending) {
    throw new QapiSchemaError(
      { file, line: pending.line },
      `documentation for '${pending.doc.symbol}' is not followed by its definition`,
    );
  }
  return out;
}

function isInclude(e: QObj): boolean {
  return e.v.length > 0 && e.v[0]!.key === 'include';
}

export interface LoadOptions {
  /** Directory that file names in messages are relative to (default: cwd). */
  readonly displayBase?: string;
}

/**
 * Reads a schema file and everything it includes (each file once; an
 * include of a file already read is skipped).
 */
export function loadSchema(file: string, opts: LoadOptions = {}): ParsedSchema {
  const base = opts.displayBase ?? process.cwd();
  const seen = new Set<string>();
  const items: Array<{ kind: 'expr'; item: RawExpr } | { kind: 'doc'; item: FreeDoc }> = [];
  const files: string[] = [];
  const display = (abs: string) => {
    const rel = path.relative(base, abs);
    return rel.split(path.sep).join('/');
  };

  const visit = (abs: string) => {
    seen.add(abs);
    const shown = display(abs);
    files.push(shown);
    const text = fs.readFileSync(abs, 'utf8');
    for (const it of parseText(text, shown)) {
      if (it.kind === 'doc') {
        items.push({ kind: 'doc', item: { doc: it.doc, info: { file: shown, line: it.line } } });
        continue;
      }
      const expr = it.expr;
      const info: SourceInfo = { file: shown, line: expr.line };
      if (isInclude(expr)) {
        const inc = expr.v[0]!;
        if (expr.v.length !== 1) {
          throw new QapiSchemaError({ file: shown, line: expr.v[1]!.keyLine }, `unknown key '${expr.v[1]!.key}' in include`);
        }
        if (inc.value.t !== 'str') throw new QapiSchemaError(info, "value of 'include' must be a string");
        const target = path.resolve(path.dirname(abs), inc.value.v);
        if (seen.has(target)) continue;
        if (!fs.existsSync(target) || !fs.statSync(target).isFile()) {
          throw new QapiSchemaError(info, `can't read include file '${inc.value.v}': no such file`);
        }
        visit(target);
        continue;
      }
      const raw: RawExpr = it.doc ? { expr, info, doc: it.doc } : { expr, info };
      items.push({ kind: 'expr', item: raw });
    }
  };
  const abs = path.resolve(file);
  if (!fs.existsSync(abs)) {
    throw new QapiSchemaError({ file: display(abs), line: 1 }, `can't read schema file: no such file`);
  }
  visit(abs);
  return { items, files };
}
