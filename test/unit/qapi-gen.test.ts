// The generator end to end: committed output is up to date, the schema
// carries every seed definition unchanged, and the generated modules work.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { generate } from '../../tools/qapi-gen/generate.js';
import { loadSchema, parseText, type QNode } from '../../tools/qapi-gen/parser.js';
import { QMP_SCHEMA } from '../../src/generated/qapi-introspect.js';
import { QapiEvents, EVENT_NAMES } from '../../src/generated/qapi-events.js';
import { COMMANDS } from '../../src/generated/qapi-commands.js';
import * as R from '../../src/qapi/runtime.js';
import { MigrationCapability_VALUES, MigrationStatus_VALUES, RunState_VALUES } from '../../src/generated/qapi-types.js';

// dist/test/unit/ -> repository root
const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
const schemaFile = path.join(repoRoot, 'qapi/schema.json');

test('regenerating from qapi/ reproduces the committed output byte for byte', () => {
  const out = generate(schemaFile, { displayBase: repoRoot });
  for (const [name, text] of out.files) {
    const committed = fs.readFileSync(path.join(repoRoot, 'src/generated', name), 'utf8');
    assert.ok(committed === text, `src/generated/${name} is stale: run npm run gen`);
  }
  const doc = fs.readFileSync(path.join(repoRoot, 'docs/qapi.md'), 'utf8');
  assert.ok(doc === out.doc, 'docs/qapi.md is stale: run npm run gen');
});

/** A comparable form: objects become ordered [key, value] lists. */
function canon(n: QNode): unknown {
  switch (n.t) {
    case 'str':
    case 'bool':
      return n.v;
    case 'list':
      return n.v.map(canon);
    case 'obj':
      return n.v.map((e) => [e.key, canon(e.value)]);
  }
}

const META = ['struct', 'enum', 'union', 'alternate', 'command', 'event'];

function keyOf(n: Extract<QNode, { t: 'obj' }>): string | undefined {
  const m = n.v.find((e) => META.includes(e.key));
  return m && m.value.t === 'str' ? `${m.key} ${m.value.v}` : undefined;
}

/**
 * Members QEMU 7.2 has beyond the seed, which Ferry implements too: they
 * may appear in the seed's definitions, and nothing else may.
 */
const BEYOND_SEED: ReadonlyMap<string, ReadonlySet<unknown>> = new Map([
  ['struct MigrationStats', new Set(['*multifd-bytes'])],
  ['enum MigrationCapability', new Set(['multifd'])],
  ['enum MigrationParameter', new Set(['multifd-channels'])],
  ['struct MigrateSetParameters', new Set(['*multifd-channels'])],
  ['struct MigrationParameters', new Set(['*multifd-channels'])],
]);

/** A definition's data without the members beyond the seed. */
function seedPart(k: string, key: string, v: unknown): unknown {
  const extra = BEYOND_SEED.get(k);
  if (extra === undefined || key !== 'data' || !Array.isArray(v)) return v;
  return v.filter((m) => !extra.has(Array.isArray(m) ? m[0] : m));
}

test('every seed definition appears with identical members (QEMU 7.2 members beyond it aside)', () => {
  const seedFile = path.join(repoRoot, 'test/golden/seed-qapi-migration.json');
  const ours = new Map<string, Extract<QNode, { t: 'obj' }>>();
  for (const it of loadSchema(schemaFile, { displayBase: repoRoot }).items) {
    if (it.kind !== 'expr') continue;
    const k = keyOf(it.item.expr);
    if (k) ours.set(k, it.item.expr);
  }
  let count = 0;
  for (const it of parseText(fs.readFileSync(seedFile, 'utf8'), 'seed.json')) {
    if (it.kind !== 'expr') continue;
    const k = keyOf(it.expr);
    if (!k) continue; // include
    count++;
    const mine = ours.get(k);
    assert.ok(mine, `${k} is missing from qapi/`);
    const a = new Map(mine.v.map((e) => [e.key, canon(e.value)]));
    const b = new Map(it.expr.v.map((e) => [e.key, canon(e.value)]));
    assert.deepEqual([...a.keys()].sort(), [...b.keys()].sort(), `${k}: keys differ`);
    for (const [key, v] of b) assert.deepEqual(seedPart(k, key, a.get(key)), v, `${k}: '${key}' differs`);
  }
  assert.ok(count >= 30, `only ${count} seed definitions found`);
});

test('introspection lists every command and event, and every referenced type', () => {
  const entries = QMP_SCHEMA as Array<Record<string, unknown>>;
  const names = new Set(entries.map((e) => e['name'] as string));
  for (const c of COMMANDS.keys()) assert.ok(entries.some((e) => e['name'] === c && e['meta-type'] === 'command'), c);
  for (const ev of EVENT_NAMES) assert.ok(entries.some((e) => e['name'] === ev && e['meta-type'] === 'event'), ev);
  for (const e of entries) {
    const refs: string[] = [];
    for (const k of ['arg-type', 'ret-type', 'element-type']) if (typeof e[k] === 'string') refs.push(e[k] as string);
    for (const m of (e['members'] as Array<Record<string, unknown>> | undefined) ?? []) if (typeof m['type'] === 'string') refs.push(m['type'] as string);
    for (const v of (e['variants'] as Array<Record<string, unknown>> | undefined) ?? []) refs.push(v['type'] as string);
    for (const r of refs) assert.ok(names.has(r), `${String(e['name'])} refers to missing ${r}`);
  }
  const migrate = entries.find((e) => e['name'] === 'migrate')!;
  assert.equal(migrate['ret-type'], 'q_empty');
  const arg = entries.find((e) => e['name'] === migrate['arg-type'])!;
  assert.deepEqual(arg['members'], [
    { name: 'uri', type: 'str' },
    { name: 'blk', type: 'bool', default: null },
    { name: 'inc', type: 'bool', default: null },
    { name: 'detach', type: 'bool', default: null },
  ]);
  const status = entries.find((e) => e['name'] === 'MigrationStatus')!;
  assert.equal(status['meta-type'], 'enum');
  assert.deepEqual(status['values'], [...MigrationStatus_VALUES]);
  assert.deepEqual(entries.find((e) => e['name'] === 'int'), { name: 'int', 'meta-type': 'builtin', 'json-type': 'int' });
  assert.deepEqual(entries.find((e) => e['name'] === 'StrOrNull'), {
    name: 'StrOrNull', 'meta-type': 'alternate', members: [{ type: 'str' }, { type: 'null' }],
  });
  const oo = entries.find((e) => e['name'] === 'ObjectOptions')!;
  assert.equal(oo['tag'], 'qom-type');
  assert.equal((oo['variants'] as unknown[]).length, 4);
  assert.deepEqual(entries.find((e) => e['name'] === '[MigrationCapabilityStatus]'), {
    name: '[MigrationCapabilityStatus]', 'meta-type': 'array', 'element-type': 'MigrationCapabilityStatus',
  });
  // Integer types collapse to 'int' as in QEMU.
  const mbp = entries.find((e) => e['name'] === 'MemoryBackendProperties')!;
  assert.deepEqual(mbp['members'], [{ name: 'size', type: 'int' }, { name: 'share', type: 'bool', default: null }]);
});

test('QapiEvents passes typed events to the sink', () => {
  const seen: Array<[string, unknown]> = [];
  const ev = new QapiEvents((name, data) => seen.push([name, data]));
  ev.MIGRATION({ status: 'active' });
  ev.MIGRATION_PASS({ pass: 2 });
  ev.STOP();
  ev.RESUME();
  assert.deepEqual(seen, [
    ['MIGRATION', { status: 'active' }],
    ['MIGRATION_PASS', { pass: 2 }],
    ['STOP', undefined],
    ['RESUME', undefined],
  ]);
});

test('enum value lists match QEMU', () => {
  assert.deepEqual([...MigrationCapability_VALUES], [
    'xbzrle', 'rdma-pin-all', 'auto-converge', 'zero-blocks', 'compress', 'events',
    'postcopy-ram', 'x-colo', 'release-ram', 'block', 'return-path', 'multifd',
  ]);
  assert.ok(RunState_VALUES.includes('finish-migrate'));
  assert.ok(RunState_VALUES.includes('postmigrate'));
});

test('docs/qapi.md documents every command', () => {
  const doc = fs.readFileSync(path.join(repoRoot, 'docs/qapi.md'), 'utf8');
  for (const c of COMMANDS.keys()) assert.ok(doc.includes(`### \`${c}\` (command)`), c);
});

test('generator handles simple unions, alternates, features, boxed events and array returns', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qapi-gen-'));
  try {
    fs.writeFileSync(path.join(dir, 'inc.json'), "{ 'enum': 'Color', 'data': [ 'red', { 'name': 'blue' } ] }\n");
    fs.writeFileSync(
      path.join(dir, 's.json'),
      [
        "{ 'include': 'inc.json' }",
        "{ 'struct': 'Point', 'data': { 'x': 'int', 'y': 'int' }, 'features': [ 'deprecated' ] }",
        "{ 'union': 'Shape', 'data': { 'point': 'Point', 'count': 'uint8', 'names': [ 'str' ] } }",
        "{ 'alternate': 'IntOrColor', 'data': { 'i': 'int', 'c': 'Color' } }",
        "{ 'command': 'draw', 'data': { 'shape': 'Shape', '*fill': 'IntOrColor' }, 'returns': [ 'Point' ] }",
        "{ 'event': 'DRAWN', 'data': 'Point', 'boxed': true }",
      ].join('\n'),
    );
    const out = generate(path.join(dir, 's.json'), { displayBase: dir });
    const types = out.files.get('qapi-types.ts')!;
    assert.match(types, /export type Shape =\n {2}\| \{ type: 'point'; data: Point \}\n {2}\| \{ type: 'count'; data: number \}\n {2}\| \{ type: 'names'; data: string\[\] \};/);
    assert.match(types, /export type IntOrColor =\n {2}\| number\n {2}\| Color;/);
    assert.match(types, /export const Color_VALUES = \['red', 'blue'\] as const;/);
    const cmds = out.files.get('qapi-commands.ts')!;
    assert.match(cmds, /'draw'\(args: CommandArgs\['draw'\], ctx: Ctx\): T\.Point\[\] \| Promise<T\.Point\[\]>;/);
    assert.match(out.files.get('qapi-events.ts')!, /DRAWN\(data: EventData\['DRAWN'\]\): void/);
    const intro = out.files.get('qapi-introspect.ts')!;
    assert.match(intro, /"name":"Shape","meta-type":"object","members":\[\{"name":"type","type":"ShapeKind"\}\],"tag":"type"/);
    assert.match(intro, /"name":"q_obj_Point-wrapper","meta-type":"object","members":\[\{"name":"data","type":"Point"\}\]/);
    assert.match(out.doc, /### `draw` \(command\)/);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('runtime: simple unions and alternates dispatch by JSON kind', () => {
  const point = (v: unknown, p: R.Path) => R.struct(v, p, [['x', false, R.int], ['y', false, R.int]]);
  const shape = (v: unknown, p: R.Path) => R.simpleUnion(v, p, ['point', 'count'], { point, count: R.uint8 });
  assert.deepEqual(shape({ type: 'point', data: { x: 1, y: 2 } }, R.ROOT), { type: 'point', data: { x: 1, y: 2 } });
  assert.throws(() => shape({ type: 'point', data: { x: 1 } }, R.member(R.ROOT, 's')), { desc: "Parameter 's.data.y' is missing" });
  assert.throws(() => shape({ type: 'circle', data: 1 }, R.member(R.ROOT, 's')), { desc: "Parameter 's.type' does not accept value 'circle'" });
  assert.throws(() => shape({ type: 'count', data: 300 }, R.ROOT), { desc: "Parameter 'data' expects uint8_t" });
  const alt = (v: unknown, p: R.Path) => R.alternate(v, p, 'IntOrColor', { number: R.int, string: (x, q) => R.enumValue(x, q, ['red'] as const) });
  assert.equal(alt(3, R.ROOT), 3);
  assert.equal(alt('red', R.ROOT), 'red');
  assert.throws(() => alt(true, R.member(R.ROOT, 'fill')), { desc: "Invalid parameter type for 'fill', expected: IntOrColor" });
  assert.throws(() => alt(1.5, R.member(R.ROOT, 'fill')), { desc: "Invalid parameter type for 'fill', expected: integer" });
});
