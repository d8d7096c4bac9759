import { test } from 'node:test';
import assert from 'node:assert/strict';
import { parseText, tokenize } from '../../tools/qapi-gen/parser.js';
import { parseDocBlock } from '../../tools/qapi-gen/doc.js';
import { QapiSchemaError } from '../../tools/qapi-gen/errors.js';

function plain(n: unknown): unknown {
  const node = n as { t: string; v: unknown };
  if (node.t === 'list') return (node.v as unknown[]).map(plain);
  if (node.t === 'obj') {
    return Object.fromEntries((node.v as Array<{ key: string; value: unknown }>).map((e) => [e.key, plain(e.value)]));
  }
  return node.v;
}

test('parses back-to-back expressions with single quotes, booleans, lists and comments', () => {
  const text = [
    "# leading comment",
    "{ 'enum': 'E', 'data': [ 'a', 'b' ] }  # trailing comment",
    "{ 'command': 'c', 'boxed': true, 'data': 'S' }{ 'struct': 'S',",
    "  'data': { '*x': ['int'] } }",
  ].join('\n');
  const items = parseText(text, 't.json');
  assert.equal(items.length, 3);
  assert.deepEqual(items.map((i) => (i.kind === 'expr' ? plain(i.expr) : null)), [
    { enum: 'E', data: ['a', 'b'] },
    { command: 'c', boxed: true, data: 'S' },
    { struct: 'S', data: { '*x': ['int'] } },
  ]);
  const lines = items.map((i) => (i.kind === 'expr' ? i.expr.line : 0));
  assert.deepEqual(lines, [2, 3, 3]);
});

test('string escapes', () => {
  const [item] = parseText("{ 'a': 'it\\'s \\\\ fine' }", 't.json');
  assert.ok(item && item.kind === 'expr');
  assert.deepEqual(plain(item.expr), { a: "it's \\ fine" });
});

test('member key lines are recorded', () => {
  const [item] = parseText("{ 'struct': 'S',\n  'data': {\n    'a': 'int',\n    'b': 'str' } }", 't.json');
  assert.ok(item && item.kind === 'expr');
  const data = item.expr.v[1]!.value;
  assert.equal(data.t, 'obj');
  assert.deepEqual(data.t === 'obj' ? data.v.map((e) => e.keyLine) : [], [3, 4]);
});

function syntaxError(text: string): string {
  try {
    parseText(text, 'x.json');
  } catch (e) {
    assert.ok(e instanceof QapiSchemaError);
    return e.message;
  }
  return assert.fail('no error');
}

test('syntax errors carry the right line', () => {
  assert.equal(syntaxError("{ 'a': 'b'\n\n  'c': 'd' }"), "x.json:3: expected ',' or '}', found a string");
  assert.equal(syntaxError("{ 'a': [ 'b',\n 'c' }"), "x.json:2: expected ',' or ']', found '}'");
  assert.equal(syntaxError("{ 'a':\n  'oops }"), "x.json:2: missing terminating \"'\"");
  assert.equal(syntaxError("\n\n{ 'a': yes }"), "x.json:3: stray 'yes'");
  assert.equal(syntaxError("{ 'a': 'b', 'a': 'c' }"), "x.json:1: duplicate key 'a'");
  assert.equal(syntaxError("'a'"), "x.json:1: expected '{' at the start of a definition, found a string");
  assert.equal(syntaxError("{ 'a': 'b'"), "x.json:1: expected ',' or '}', found end of file");
  assert.equal(syntaxError('{ "a": 1 }'), 'x.json:1: strings are single-quoted in the schema language');
});

test('tokenize drops plain comments but keeps doc blocks', () => {
  const toks = tokenize("# c\n##\n# @X:\n#\n# text\n##\n{}", 'x.json');
  assert.deepEqual(toks.map((t) => t.k), ['doc', 'punct', 'punct', 'eof']);
});

test('doc blocks attach to the following definition', () => {
  const text = [
    '##',
    '# = Section',
    '#',
    '# Intro text.',
    '##',
    '',
    '##',
    '# @S:',
    '#',
    '# A struct.',
    '#',
    '# @a: the a member,',
    '#     continued',
    '#',
    '# @b: the b member',
    '#',
    '# Since: 1.0',
    '#',
    '# Example:',
    '#',
    '# -> { "execute": "x" }',
    '#    indented',
    '##',
    "{ 'struct': 'S', 'data': { 'a': 'int', 'b': 'str' } }",
  ].join('\n');
  const items = parseText(text, 'd.json');
  assert.equal(items.length, 2);
  const free = items[0]!;
  assert.ok(free.kind === 'doc');
  assert.deepEqual(free.doc.heading, { level: 1, text: 'Section' });
  assert.equal(free.doc.body, 'Intro text.');
  const def = items[1]!;
  assert.ok(def.kind === 'expr' && def.doc);
  assert.equal(def.doc.symbol, 'S');
  assert.equal(def.doc.body, 'A struct.');
  assert.deepEqual([...def.doc.args], [['a', 'the a member,\ncontinued'], ['b', 'the b member']]);
  assert.deepEqual(def.doc.sections, [
    { name: 'Since', text: '1.0' },
    { name: 'Example', text: '-> { "execute": "x" }\n   indented' },
  ]);
});

test('parseDocBlock rejects a member documented twice', () => {
  assert.throws(() => parseDocBlock(['@S:', '@a: x', '@a: y'], { file: 'f', line: 1 }), /'a' is documented twice/);
});

test('a doc block for a definition must be followed by one', () => {
  assert.equal(syntaxError('##\n# @Lonely:\n##\n'), "x.json:1: documentation for 'Lonely' is not followed by its definition");
});
