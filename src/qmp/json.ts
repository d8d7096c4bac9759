/**
 * QMP JSON framing: a streaming input parser that behaves like QEMU's
 * json-lexer/json-streamer/json-parser trio (brace/bracket counting, the
 * single-quote extension, lexical error recovery, input limits) and the output
 * serializer (ASCII only, `\uXXXX` upper-case, `", "` and `": "` separators).
 *
 * Written from the behaviour described in docs (docs/spec/qmp.md Part A);
 * no QEMU code.
 */

export type JsonValue =
  | null
  | boolean
  | number
  | string
  | JsonValue[]
  | { [key: string]: JsonValue };

/** One unit handed to the dispatcher: a complete value or an error text. */
export type JsonParseResult =
  | { ok: true; value: JsonValue }
  | { ok: false; error: string };

export interface JsonLimits {
  /** Max token text of one value, bytes (QEMU: 64 MiB). */
  maxBytes: number;
  /** Max tokens in one value (QEMU: 2 Mi). */
  maxTokens: number;
  /** Max nesting depth (QEMU: 1024). */
  maxDepth: number;
}

export const DEFAULT_JSON_LIMITS: Readonly<JsonLimits> = Object.freeze({
  maxBytes: 64 * 1024 * 1024,
  maxTokens: 2 * 1024 * 1024,
  maxDepth: 1024,
});

const enum T {
  LCURLY,
  RCURLY,
  LSQUARE,
  RSQUARE,
  COLON,
  COMMA,
  STRING,
  INTEGER,
  FLOAT,
  KEYWORD,
}

interface Token {
  t: T;
  /** raw bytes for STRING (without quotes), text for numbers/keywords */
  raw?: Buffer;
  text?: string;
  quote?: number;
}

const enum S {
  START,
  RECOVERY,
  DQ,
  DQ_ESC,
  SQ,
  SQ_ESC,
  NEG,
  ZERO,
  INT,
  DOT,
  FRAC,
  EXP,
  EXP_SIGN,
  EXP_DIGITS,
  KEYWORD,
}

const CH_DQ = 0x22;
const CH_SQ = 0x27;
const CH_BS = 0x5c;

function isHex(c: number): boolean {
  return (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x46) || (c >= 0x61 && c <= 0x66);
}
function isDigit(c: number): boolean {
  return c >= 0x30 && c <= 0x39;
}
/**
 * Streaming parser. `feed()` takes bytes as they arrive and returns the values
 * (or errors) completed by them, in order. Memory stays bounded by the limits:
 * a value that exceeds them is reported once and the rest of it is skipped
 * (counting nesting, without storing) until it closes.
 */
export class JsonStreamParser {
  private readonly limits: JsonLimits;

  // lexer
  private state: S = S.START;
  private tokParts: Buffer[] = [];
  private tokLen = 0;
  /** start of the current token within the chunk being fed, or -1 */
  private tokStart = -1;

  // streamer
  private tokens: Token[] = [];
  private size = 0;
  private braces = 0;
  private brackets = 0;
  /** discarding the rest of an over-limit value */
  private discarding = false;

  private out: JsonParseResult[] = [];

  constructor(limits?: Partial<JsonLimits>) {
    this.limits = { ...DEFAULT_JSON_LIMITS, ...(limits ?? {}) };
  }

  feed(input: Buffer | Uint8Array | string): JsonParseResult[] {
    const buf = typeof input === 'string' ? Buffer.from(input, 'utf8') : Buffer.isBuffer(input) ? input : Buffer.from(input.buffer, input.byteOffset, input.byteLength);
    this.out = [];
    const n = buf.length;
    if (this.inToken()) this.tokStart = 0;
    let i = 0;
    while (i < n) {
      const c = buf[i]!;
      switch (this.state) {
        case S.START:
          i = this.start(buf, i, c);
          continue;
        case S.RECOVERY:
          // Skip until a structural character, a control character other
          // than TAB, or an impossible UTF-8 byte: those resynchronise.
          if ((c < 0x20 && c !== 0x09) || c >= 0xfe || c === 0x5b || c === 0x5d || c === 0x7b || c === 0x7d) {
            this.state = S.START;
            continue; // reprocess c
          }
          i++;
          continue;
        case S.DQ:
        case S.SQ: {
          const q = this.state === S.DQ ? CH_DQ : CH_SQ;
          // fast scan of the plain run
          let j = i;
          while (j < n) {
            const d = buf[j]!;
            if (d === q || d === CH_BS || d < 0x20 || d >= 0xfe) break;
            j++;
          }
          if (j >= n) {
            i = n;
            continue;
          }
          const d = buf[j]!;
          if (d === q) {
            this.endToken(buf, j + 1, { t: T.STRING, quote: q });
            i = j + 1;
          } else if (d === CH_BS) {
            this.state = this.state === S.DQ ? S.DQ_ESC : S.SQ_ESC;
            i = j + 1;
          } else {
            i = this.lexError(buf, j + 1);
          }
          continue;
        }
        case S.DQ_ESC:
        case S.SQ_ESC:
          // as QEMU 7.2's lexer: any printable byte may follow a backslash;
          // the parser judges the escape (invalid escape, \u's four digits)
          if (c >= 0x20 && c < 0xfe) {
            this.state = this.state === S.DQ_ESC ? S.DQ : S.SQ;
            i++;
          } else {
            i = this.lexError(buf, i + 1);
          }
          continue;
        case S.NEG:
          if (c === 0x30) { this.state = S.ZERO; i++; }
          else if (isDigit(c)) { this.state = S.INT; i++; }
          else i = this.lexError(buf, i + 1);
          continue;
        case S.ZERO:
          if (c === 0x2e) { this.state = S.DOT; i++; }
          else if (c === 0x65 || c === 0x45) { this.state = S.EXP; i++; }
          else if (isDigit(c)) i = this.lexError(buf, i + 1);
          else this.endNumber(buf, i, T.INTEGER);
          continue;
        case S.INT:
          if (isDigit(c)) i++;
          else if (c === 0x2e) { this.state = S.DOT; i++; }
          else if (c === 0x65 || c === 0x45) { this.state = S.EXP; i++; }
          else this.endNumber(buf, i, T.INTEGER);
          continue;
        case S.DOT:
          if (isDigit(c)) { this.state = S.FRAC; i++; }
          else i = this.lexError(buf, i + 1);
          continue;
        case S.FRAC:
          if (isDigit(c)) i++;
          else if (c === 0x65 || c === 0x45) { this.state = S.EXP; i++; }
          else this.endNumber(buf, i, T.FLOAT);
          continue;
        case S.EXP:
          if (c === 0x2b || c === 0x2d) { this.state = S.EXP_SIGN; i++; }
          else if (isDigit(c)) { this.state = S.EXP_DIGITS; i++; }
          else i = this.lexError(buf, i + 1);
          continue;
        case S.EXP_SIGN:
          if (isDigit(c)) { this.state = S.EXP_DIGITS; i++; }
          else i = this.lexError(buf, i + 1);
          continue;
        case S.EXP_DIGITS:
          if (isDigit(c)) i++;
          else this.endNumber(buf, i, T.FLOAT);
          continue;
        case S.KEYWORD:
          if (c >= 0x61 && c <= 0x7a) i++;
          else this.endNumber(buf, i, T.KEYWORD);
          continue;
      }
    }
    // chunk ends inside a token: keep its bytes (unless discarding)
    if (this.inToken() && this.tokStart >= 0) {
      const part = buf.subarray(this.tokStart, n);
      this.tokLen += part.length;
      if (!this.discarding) {
        this.tokParts.push(Buffer.from(part)); // copy: the caller may reuse its buffer
        if (this.size + this.tokLen > this.limits.maxBytes) this.overflow('JSON token size limit exceeded');
      }
    }
    this.tokStart = -1;
    const out = this.out;
    this.out = [];
    return out;
  }

  /** True while a value is incomplete (for diagnostics / tests). */
  get pending(): boolean {
    return this.tokens.length > 0 || this.inToken() || this.discarding;
  }

  private inToken(): boolean {
    return this.state !== S.START && this.state !== S.RECOVERY;
  }

  private start(buf: Buffer, i: number, c: number): number {
    switch (c) {
      case 0x20: case 0x09: case 0x0a: case 0x0d:
        return i + 1;
      case 0x7b: this.token({ t: T.LCURLY }); return i + 1;
      case 0x7d: this.token({ t: T.RCURLY }); return i + 1;
      case 0x5b: this.token({ t: T.LSQUARE }); return i + 1;
      case 0x5d: this.token({ t: T.RSQUARE }); return i + 1;
      case 0x3a: this.token({ t: T.COLON }); return i + 1;
      case 0x2c: this.token({ t: T.COMMA }); return i + 1;
    }
    this.tokStart = i;
    this.tokParts = [];
    this.tokLen = 0;
    if (c === CH_DQ) this.state = S.DQ;
    else if (c === CH_SQ) this.state = S.SQ;
    else if (c === 0x2d) this.state = S.NEG;
    else if (c === 0x30) this.state = S.ZERO;
    else if (isDigit(c)) this.state = S.INT;
    else if (c >= 0x61 && c <= 0x7a) this.state = S.KEYWORD;
    else return this.lexError(buf, i + 1);
    return i + 1;
  }

  private takeToken(buf: Buffer, end: number): Buffer {
    const last = buf.subarray(this.tokStart < 0 ? end : this.tokStart, end);
    const all = this.tokParts.length ? Buffer.concat([...this.tokParts, last]) : Buffer.from(last);
    this.tokParts = [];
    this.tokLen = 0;
    this.tokStart = -1;
    this.state = S.START;
    return all;
  }

  private endToken(buf: Buffer, end: number, tok: Token): void {
    const bytes = this.takeToken(buf, end);
    if (tok.t === T.STRING) tok.raw = bytes.subarray(1, bytes.length - 1);
    this.token(tok, bytes.length);
  }

  private endNumber(buf: Buffer, end: number, t: T): void {
    const bytes = this.takeToken(buf, end);
    this.token({ t, text: bytes.toString('latin1') }, bytes.length);
  }

  /** Lexically invalid input: report "stray '<token so far>'" and recover. */
  private lexError(buf: Buffer, end: number): number {
    const bytes = this.takeToken(buf, end);
    this.state = S.RECOVERY;
    if (this.discarding) {
      // the over-limit value was already reported; an error ends it
      this.resetValue();
      return end;
    }
    this.resetValue();
    this.out.push({ ok: false, error: `JSON parse error, stray '${bytes.toString('utf8')}'` });
    return end;
  }

  private resetValue(): void {
    this.tokens = [];
    this.size = 0;
    this.braces = 0;
    this.brackets = 0;
    this.discarding = false;
  }

  private overflow(msg: string): void {
    this.out.push({ ok: false, error: msg });
    this.tokens = [];
    this.size = 0;
    this.tokParts = [];
    this.discarding = true;
  }

  /** Streamer: count nesting, enforce limits, hand over complete values. */
  private token(tok: Token, len = 1): void {
    switch (tok.t) {
      case T.LCURLY: this.braces++; break;
      case T.RCURLY: this.braces--; break;
      case T.LSQUARE: this.brackets++; break;
      case T.RSQUARE: this.brackets--; break;
    }
    if (this.discarding) {
      if (this.braces <= 0 && this.brackets <= 0) this.resetValue();
      return;
    }
    if (this.size + len > this.limits.maxBytes) {
      this.overflow('JSON token size limit exceeded');
    } else if (this.tokens.length + 1 > this.limits.maxTokens) {
      this.overflow('JSON token count limit exceeded');
    } else if (this.braces + this.brackets > this.limits.maxDepth) {
      this.overflow('JSON nesting depth limit exceeded');
    }
    if (this.discarding) {
      if (this.braces <= 0 && this.brackets <= 0) this.resetValue();
      return;
    }
    this.tokens.push(tok);
    this.size += len;
    if ((this.braces > 0 || this.brackets > 0) && this.braces >= 0 && this.brackets >= 0) return;
    const tokens = this.tokens;
    this.resetValue();
    this.out.push(parseTokens(tokens));
  }
}

class ParseError extends Error {}

function parseTokens(tokens: Token[]): JsonParseResult {
  let pos = 0;
  const fail = (msg: string): never => {
    throw new ParseError(`JSON parse error, ${msg}`);
  };
  const peek = (): Token | undefined => tokens[pos];

  function value(): JsonValue {
    const tok = tokens[pos];
    if (!tok) return fail('expecting value');
    switch (tok.t) {
      case T.LCURLY: pos++; return object();
      case T.LSQUARE: pos++; return array();
      case T.STRING: pos++; return decodeString(tok);
      case T.INTEGER:
      case T.FLOAT: pos++; return Number(tok.text);
      case T.KEYWORD:
        pos++;
        if (tok.text === 'true') return true;
        if (tok.text === 'false') return false;
        if (tok.text === 'null') return null;
        return fail(`invalid keyword '${tok.text}'`);
      default:
        return fail('expecting value');
    }
  }

  function object(): JsonValue {
    const obj: { [key: string]: JsonValue } = {};
    let tok = peek();
    if (!tok) return fail('premature EOI');
    if (tok.t === T.RCURLY) { pos++; return obj; }
    for (;;) {
      // as QEMU's parser: the key is a value (else "expecting value") that must be a string
      const key = peek();
      if (!key) return fail('premature EOI');
      const keyValue = value();
      if (key.t !== T.STRING) return fail('key is not a string in object');
      const colon = peek();
      if (!colon) return fail('premature EOI');
      if (colon.t !== T.COLON) return fail('missing : in object pair');
      pos++;
      const k = keyValue as string;
      const v = value();
      if (k === '__proto__') Object.defineProperty(obj, k, { value: v, enumerable: true, writable: true, configurable: true });
      else obj[k] = v;
      tok = peek();
      if (!tok) return fail('premature EOI');
      if (tok.t === T.RCURLY) { pos++; return obj; }
      if (tok.t !== T.COMMA) return fail('expected separator in dict');
      pos++;
    }
  }

  function array(): JsonValue {
    const arr: JsonValue[] = [];
    let tok = peek();
    if (!tok) return fail('premature EOI');
    if (tok.t === T.RSQUARE) { pos++; return arr; }
    for (;;) {
      arr.push(value());
      tok = peek();
      if (!tok) return fail('premature EOI');
      if (tok.t === T.RSQUARE) { pos++; return arr; }
      if (tok.t !== T.COMMA) return fail('expected separator in list');
      pos++;
    }
  }

  function decodeString(tok: Token): string {
    const raw = tok.raw!;
    // fast path: no escapes, ASCII only
    if (!raw.includes(CH_BS)) {
      let ascii = true;
      for (let i = 0; i < raw.length; i++) if (raw[i]! >= 0x80) { ascii = false; break; }
      if (ascii) return raw.toString('latin1');
      return utf8(raw);
    }
    let s = '';
    let runStart = 0;
    let i = 0;
    while (i < raw.length) {
      if (raw[i] !== CH_BS) { i++; continue; }
      if (i > runStart) s += utf8(raw.subarray(runStart, i));
      const e = raw[i + 1]!;
      let adv = 2;
      switch (e) {
        case 0x62: s += '\b'; break;
        case 0x66: s += '\f'; break;
        case 0x6e: s += '\n'; break;
        case 0x72: s += '\r'; break;
        case 0x74: s += '\t'; break;
        case 0x75: {
          let cp = hex4At(raw, i + 2);
          adv = 6;
          if (cp < 0) {
            // QEMU prints the four bytes after \u, the closing quote included
            const after = Buffer.concat([raw.subarray(i + 2, i + 6), Buffer.from([tok.quote!])]).subarray(0, 4);
            return fail(`\\u${after.toString('latin1')} is not a valid Unicode character`);
          }
          if (cp >= 0xd800 && cp <= 0xdbff && raw[i + 6] === CH_BS && raw[i + 7] === 0x75) {
            const lo = hex4At(raw, i + 8);
            if (lo >= 0xdc00 && lo <= 0xdfff) {
              cp = 0x10000 + ((cp & 0x3ff) << 10) + (lo & 0x3ff);
              adv = 12;
            }
          }
          if (cp >= 0xd800 && cp <= 0xdfff) {
            return fail(`${raw.toString('latin1', i, i + adv)} is not a valid Unicode character`);
          }
          s += String.fromCodePoint(cp);
          break;
        }
        case CH_DQ: case CH_SQ: case CH_BS: case 0x2f:
          s += String.fromCharCode(e);
          break;
        default:
          return fail('invalid escape sequence in string');
      }
      i += adv;
      runStart = i;
    }
    if (runStart < raw.length) s += utf8(raw.subarray(runStart));
    return s;
  }

  try {
    const v = value();
    if (pos < tokens.length) fail('expecting value');
    return { ok: true, value: v };
  } catch (e) {
    if (e instanceof ParseError) return { ok: false, error: e.message };
    throw e;
  }
}

/** The value of four hex digits at raw[at..at+4), or -1. */
function hex4At(raw: Uint8Array, at: number): number {
  if (at + 4 > raw.length) return -1;
  let v = 0;
  for (let k = at; k < at + 4; k++) {
    const c = raw[k]!;
    if (!isHex(c)) return -1;
    v = v * 16 + (c <= 0x39 ? c - 0x30 : (c | 0x20) - 0x57);
  }
  return v;
}

const strictUtf8 = new TextDecoder('utf-8', { fatal: true });
function utf8(b: Uint8Array): string {
  try {
    return strictUtf8.decode(b);
  } catch {
    throw new ParseError('JSON parse error, invalid UTF-8 sequence in string');
  }
}

/** Parse one complete JSON text with the QMP parser (tests, CLI). */
export function parseQmpJson(text: string | Buffer): JsonParseResult {
  const p = new JsonStreamParser();
  const r = p.feed(text);
  const r2 = p.feed('\n'); // terminate a trailing scalar
  const all = [...r, ...r2];
  if (all.length === 1 && !p.pending) return all[0]!;
  if (all.length === 0) return { ok: false, error: 'JSON parse error, premature EOI' };
  const firstErr = all.find((x) => !x.ok);
  return firstErr ?? { ok: false, error: 'JSON parse error, expecting value' };
}

// ---------------------------------------------------------------------------
// Output

// eslint-disable-next-line no-control-regex
const NEEDS_ESCAPE = /["\\\u0000-\u001f\u007f-\uffff]/;

function hex4(n: number): string {
  return n.toString(16).toUpperCase().padStart(4, '0');
}

/** Quote a string the way QEMU's JSON writer does (ASCII output). */
export function quoteString(s: string): string {
  if (!NEEDS_ESCAPE.test(s)) return `"${s}"`;
  let out = '"';
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    switch (c) {
      case 0x22: out += '\\"'; continue;
      case 0x5c: out += '\\\\'; continue;
      case 0x08: out += '\\b'; continue;
      case 0x0c: out += '\\f'; continue;
      case 0x0a: out += '\\n'; continue;
      case 0x0d: out += '\\r'; continue;
      case 0x09: out += '\\t'; continue;
    }
    if (c >= 0x20 && c < 0x7f) {
      out += s[i];
    } else if (c >= 0xd800 && c <= 0xdbff) {
      const lo = s.charCodeAt(i + 1);
      if (lo >= 0xdc00 && lo <= 0xdfff) {
        out += `\\u${hex4(c)}\\u${hex4(lo)}`;
        i++;
      } else {
        out += '\\uFFFD';
      }
    } else if (c >= 0xdc00 && c <= 0xdfff) {
      out += '\\uFFFD';
    } else {
      out += `\\u${hex4(c)}`;
    }
  }
  return out + '"';
}

/**
 * Serialise a value as QMP output: `{"a": 1, "b": [1, 2]}`, ASCII only.
 * `undefined` members are left out (as JSON.stringify does); bigints are
 * written as integers; non-finite numbers become null.
 */
export function toQmpJson(v: unknown): string {
  switch (typeof v) {
    case 'string': return quoteString(v);
    case 'number': return Number.isFinite(v) ? (Object.is(v, -0) ? '-0' : String(v)) : 'null';
    case 'bigint': return v.toString();
    case 'boolean': return v ? 'true' : 'false';
    case 'undefined': return 'null';
    case 'object': {
      if (v === null) return 'null';
      if (Array.isArray(v)) {
        if (v.length === 0) return '[]';
        return '[' + v.map((x) => toQmpJson(x)).join(', ') + ']';
      }
      if (typeof (v as { toJSON?: unknown }).toJSON === 'function') {
        return toQmpJson((v as { toJSON(): unknown }).toJSON());
      }
      const parts: string[] = [];
      for (const k of Object.keys(v)) {
        const x = (v as Record<string, unknown>)[k];
        if (x === undefined || typeof x === 'function' || typeof x === 'symbol') continue;
        parts.push(`${quoteString(k)}: ${toQmpJson(x)}`);
      }
      return parts.length ? '{' + parts.join(', ') + '}' : '{}';
    }
    default:
      return 'null';
  }
}
