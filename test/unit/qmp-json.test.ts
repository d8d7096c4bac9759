import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { JsonStreamParser, parseQmpJson, quoteString, toQmpJson } from '../../src/qmp/json.js';

function feedAll(p: JsonStreamParser, ...parts: (string | Buffer)[]) {
  return parts.flatMap((x) => p.feed(x));
}

describe('qmp json: streaming parser', () => {
  it('parses objects, nested values, numbers, keywords', () => {
    const r = parseQmpJson('{"a": [1, -2, 2.5e3, 0.5, true, false, null], "b": {"c": "d"}}');
    assert.deepEqual(r, { ok: true, value: { a: [1, -2, 2500, 0.5, true, false, null], b: { c: 'd' } } });
  });

  it('emits several objects per chunk and objects split across chunks', () => {
    const p = new JsonStreamParser();
    assert.equal(p.feed('{"a":1}{"b"').length, 1);
    const r = p.feed(':2}  [3]');
    assert.deepEqual(r, [
      { ok: true, value: { b: 2 } },
      { ok: true, value: [3] },
    ]);
    // split inside a string, an escape and a number
    const q = new JsonStreamParser();
    const out = feedAll(q, '{"x": "ab', 'c\\', 'u00', 'e9", "n": 12', '34}');
    assert.deepEqual(out, [{ ok: true, value: { x: 'abcé', n: 1234 } }]);
  });

  it('splits multi-byte UTF-8 across chunks', () => {
    const bytes = Buffer.from('{"s":"é€😀"}', 'utf8');
    const p = new JsonStreamParser();
    const out: unknown[] = [];
    for (let i = 0; i < bytes.length; i++) out.push(...p.feed(bytes.subarray(i, i + 1)));
    assert.deepEqual(out, [{ ok: true, value: { s: 'é€😀' } }]);
  });

  it("accepts single-quoted strings and the \\' escape", () => {
    assert.deepEqual(parseQmpJson("{'execute': 'it\\'s', \"b\": \"x\\'y\"}"), {
      ok: true,
      value: { execute: "it's", b: "x'y" },
    });
  });

  it('surrogate pairs and lone surrogates', () => {
    assert.deepEqual(parseQmpJson('"\\uD83D\\uDE00"'), { ok: true, value: '😀' });
    assert.deepEqual(parseQmpJson('"\\uD83D"'), {
      ok: false,
      error: 'JSON parse error, \\uD83D is not a valid Unicode character',
    });
  });

  it('reports syntax errors with QEMU 7.2 details', () => {
    const cases: [string, string][] = [
      ['{"execute": }', 'JSON parse error, expecting value'],
      ['{1: 2}', 'JSON parse error, key is not a string in object'],
      ['{"a" 2}', 'JSON parse error, missing : in object pair'],
      ['{"a": 1 "b": 2}', 'JSON parse error, expected separator in dict'],
      ['[1 2]', 'JSON parse error, expected separator in list'],
      ['{"a": nope}', "JSON parse error, invalid keyword 'nope'"],
      // each checked against qemu-system-x86_64 7.2 (-machine none -qmp), not from memory
      ['not', "JSON parse error, invalid keyword 'not'"],
      ['{,}', 'JSON parse error, expecting value'],
      ['{"a": 1,}', 'JSON parse error, expecting value'],
      ['{[1]: 2}', 'JSON parse error, key is not a string in object'],
      ['"abc\\q"', 'JSON parse error, invalid escape sequence in string'],
      ['{"id": "\\x41"}', 'JSON parse error, invalid escape sequence in string'],
      ['"\\u12"', 'JSON parse error, \\u12" is not a valid Unicode character'],
      ["'\\u12'", "JSON parse error, \\u12' is not a valid Unicode character"],
      ['"\\uzzzz"', 'JSON parse error, \\uzzzz is not a valid Unicode character'],
      ['"\\ud800"', 'JSON parse error, \\ud800 is not a valid Unicode character'],
      ['{"a": 1.}', "JSON parse error, stray '1.}'"],
      ['{"a": 01}', "JSON parse error, stray '01'"],
    ];
    for (const [input, error] of cases) {
      assert.deepEqual(parseQmpJson(input), { ok: false, error }, input);
    }
  });

  it('lexical errors are "stray" and the lexer recovers at structural characters', () => {
    const p = new JsonStreamParser();
    const out = p.feed('@@@ {"a":1}\n');
    assert.deepEqual(out, [
      { ok: false, error: "JSON parse error, stray '@'" },
      { ok: true, value: { a: 1 } },
    ]);
    const q = new JsonStreamParser();
    assert.deepEqual(q.feed(Buffer.from([0xff, 0x0a])), [{ ok: false, error: "JSON parse error, stray '\uFFFD'" }]);
    // a backslash takes any printable byte in the lexer (QEMU 7.2); the parser refuses the escape
    const r = new JsonStreamParser();
    assert.deepEqual(r.feed('"bad \\x escape" {"b":2}'), [
      { ok: false, error: 'JSON parse error, invalid escape sequence in string' },
      { ok: true, value: { b: 2 } },
    ]);
    // a control character after the backslash is still a lexical error
    assert.deepEqual(new JsonStreamParser().feed('"a\\\x01" '), [{ ok: false, error: `JSON parse error, stray '"a\\\x01'` }]);
  });

  it('stray closing brace after a valid object: object, then expecting value', () => {
    const p = new JsonStreamParser();
    assert.deepEqual(p.feed('{"a":1}}'), [
      { ok: true, value: { a: 1 } },
      { ok: false, error: 'JSON parse error, expecting value' },
    ]);
  });

  it('top-level scalars are emitted once terminated', () => {
    const p = new JsonStreamParser();
    assert.deepEqual(p.feed('42'), []);
    assert.deepEqual(p.feed('\n"s" '), [
      { ok: true, value: 42 },
      { ok: true, value: 's' },
    ]);
  });

  it('bounds a value by size, then gets back in step', () => {
    const p = new JsonStreamParser({ maxBytes: 1000 });
    const big = '{"execute": "x", "arguments": {"s": "' + 'a'.repeat(5000) + '"}}';
    const out = feedAll(p, big.slice(0, 2000), big.slice(2000), '{"ok": 1}');
    assert.deepEqual(out, [
      { ok: false, error: 'JSON token size limit exceeded' },
      { ok: true, value: { ok: 1 } },
    ]);
  });

  it('bounds nesting depth and token count', () => {
    const p = new JsonStreamParser({ maxDepth: 10 });
    assert.deepEqual(p.feed('['.repeat(50) + ']'.repeat(50) + '{"ok":2}'), [
      { ok: false, error: 'JSON nesting depth limit exceeded' },
      { ok: true, value: { ok: 2 } },
    ]);
    const q = new JsonStreamParser({ maxTokens: 100 });
    assert.deepEqual(q.feed('[' + '1,'.repeat(200) + '1]{"ok":3}'), [
      { ok: false, error: 'JSON token count limit exceeded' },
      { ok: true, value: { ok: 3 } },
    ]);
  });

  it('keeps memory bounded for an endless unterminated value', () => {
    const p = new JsonStreamParser({ maxBytes: 1 << 16 });
    const chunk = Buffer.from('"' + 'x'.repeat(1 << 16));
    const errs = p.feed(chunk);
    assert.equal(errs.length, 1);
    for (let i = 0; i < 64; i++) assert.deepEqual(p.feed(Buffer.alloc(1 << 16, 0x61)), []);
    assert.equal(p.pending, true);
    assert.deepEqual(p.feed('" {"a":1}'), [{ ok: true, value: { a: 1 } }]);
  });

  it('__proto__ keys stay plain data', () => {
    const r = parseQmpJson('{"__proto__": {"x": 1}}');
    assert.ok(r.ok);
    const v = r.value as Record<string, unknown>;
    assert.deepEqual(Object.keys(v), ['__proto__']);
    assert.equal(Object.getPrototypeOf(v), Object.prototype);
  });
});

describe('qmp json: output', () => {
  it('writes QEMU-style separators and ASCII with upper-case \\u escapes', () => {
    assert.equal(toQmpJson({ a: 1, b: [1, 'x'], c: {} , d: []}), '{"a": 1, "b": [1, "x"], "c": {}, "d": []}');
    assert.equal(quoteString('aé'), '"a\\u00E9"');
    assert.equal(quoteString('😀'), '"\\uD83D\\uDE00"');
    assert.equal(quoteString('\u007f\u0001\n"\\'), '"\\u007F\\u0001\\n\\"\\\\"');
    assert.equal(quoteString('\uD800x'), '"\\uFFFDx"');
    assert.equal(toQmpJson({ u: undefined, n: 2500, big: 2n ** 64n }), '{"n": 2500, "big": 18446744073709551616}');
  });
});
