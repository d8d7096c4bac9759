// Argument validation through the generated command table: QEMU's error
// texts, nested paths, integer ranges, and no side effects on the input.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { COMMANDS } from '../../src/generated/qapi-commands.js';
import { QapiError } from '../../src/qapi/errors.js';
import * as R from '../../src/qapi/runtime.js';
import * as V from '../../src/generated/qapi-validators.js';

function validate(cmd: string, args: unknown): unknown {
  const def = COMMANDS.get(cmd);
  assert.ok(def, `no command ${cmd}`);
  return def.validate(args);
}

function rejects(cmd: string, args: unknown, desc: string): void {
  assert.throws(
    () => validate(cmd, args),
    (e: unknown) => {
      assert.ok(e instanceof QapiError, `expected QapiError, got ${String(e)}`);
      assert.equal(e.desc, desc);
      assert.equal(e.errorClass, 'GenericError');
      return true;
    },
  );
}

test('missing required argument', () => {
  rejects('migrate', {}, "Parameter 'uri' is missing");
  rejects('migrate', { blk: true }, "Parameter 'uri' is missing");
});

test('wrong JSON type per builtin', () => {
  rejects('migrate', { uri: 5 }, "Invalid parameter type for 'uri', expected: string");
  rejects('migrate', { uri: 'x', blk: 'yes' }, "Invalid parameter type for 'blk', expected: boolean");
  rejects('migrate_set_speed', { value: '1' }, "Invalid parameter type for 'value', expected: integer");
  rejects('migrate_set_speed', { value: 1.5 }, "Invalid parameter type for 'value', expected: integer");
  rejects('migrate_set_downtime', { value: 'x' }, "Invalid parameter type for 'value', expected: number");
  rejects('migrate-set-capabilities', { capabilities: {} }, "Invalid parameter type for 'capabilities', expected: array");
  rejects('migrate-set-capabilities', { capabilities: [5] }, "Invalid parameter type for 'capabilities[0]', expected: object");
});

test('number accepts integers and fractions', () => {
  assert.deepEqual(validate('migrate_set_downtime', { value: 0.25 }), { value: 0.25 });
  assert.deepEqual(validate('migrate_set_downtime', { value: 2 }), { value: 2 });
});

test('unexpected argument', () => {
  rejects('migrate', { uri: 'tcp:a:1', bogus: 1 }, "Parameter 'bogus' is unexpected");
  rejects('query-migrate', { bogus: 1 }, "Parameter 'bogus' is unexpected");
  rejects('qmp_capabilities', { x: 1 }, "Parameter 'x' is unexpected");
});

test('missing is reported before unexpected', () => {
  rejects('migrate', { bogus: 1 }, "Parameter 'uri' is missing");
});

test('enum value not allowed, with nested paths', () => {
  rejects(
    'migrate-set-capabilities',
    { capabilities: [{ capability: 'nosuch', state: true }] },
    "Parameter 'capabilities[0].capability' does not accept value 'nosuch'",
  );
  rejects(
    'migrate-set-capabilities',
    { capabilities: [{ capability: 'events', state: true }, { capability: 'xbzrle', state: 1 }] },
    "Invalid parameter type for 'capabilities[1].state', expected: boolean",
  );
  rejects(
    'migrate-set-capabilities',
    { capabilities: [{ capability: 'events' }] },
    "Parameter 'capabilities[0].state' is missing",
  );
  rejects(
    'migrate-set-capabilities',
    { capabilities: [{ capability: 'events', state: true, extra: 0 }] },
    "Parameter 'capabilities[0].extra' is unexpected",
  );
  rejects('migrate-set-capabilities', { capabilities: [{ capability: 7, state: true }] },
    "Invalid parameter type for 'capabilities[0].capability', expected: string");
  rejects('qmp_capabilities', { enable: ['nosuch'] }, "Parameter 'enable[0]' does not accept value 'nosuch'");
});

test('a top-level enum argument uses the plain member name', () => {
  const e = () => R.enumValue('nosuch', R.member(R.ROOT, 'capability'), ['xbzrle'] as const);
  assert.throws(e, { desc: "Parameter 'capability' does not accept value 'nosuch'" });
});

test('valid arguments come back as a fresh copy', () => {
  const args = { capabilities: [{ capability: 'events', state: true }] };
  const out = validate('migrate-set-capabilities', args) as typeof args;
  assert.deepEqual(out, args);
  assert.notEqual(out, args);
  assert.notEqual(out.capabilities, args.capabilities);
  assert.notEqual(out.capabilities[0], args.capabilities[0]);
  assert.deepEqual(validate('query-migrate', {}), {});
  assert.deepEqual(validate('qmp_capabilities', { enable: ['oob'] }), { enable: ['oob'] });
});

test('validation never modifies its input', () => {
  const args = Object.freeze({ uri: 'tcp:h:1', blk: false, bogus: Object.freeze([1]) });
  rejects('migrate', args, "Parameter 'bogus' is unexpected");
  assert.deepEqual(args, { uri: 'tcp:h:1', blk: false, bogus: [1] });
});

test('migrate-set-parameters is boxed and takes StrOrNull', () => {
  const def = COMMANDS.get('migrate-set-parameters');
  assert.equal(def?.boxed, true);
  assert.deepEqual(validate('migrate-set-parameters', { 'tls-creds': null }), { 'tls-creds': null });
  assert.deepEqual(validate('migrate-set-parameters', { 'tls-creds': 'tls0', 'tls-hostname': '' }), {
    'tls-creds': 'tls0',
    'tls-hostname': '',
  });
  rejects('migrate-set-parameters', { 'tls-creds': 5 }, "Invalid parameter type for 'tls-creds', expected: StrOrNull");
  rejects('migrate-set-parameters', { 'tls-hostname': {} }, "Invalid parameter type for 'tls-hostname', expected: StrOrNull");
  rejects('migrate-set-parameters', { 'max-bandwidth': 'fast' }, "Invalid parameter type for 'max-bandwidth', expected: integer");
  rejects('migrate-set-parameters', { 'compress-level': 1, bogus: 2 }, "Parameter 'bogus' is unexpected");
  assert.deepEqual(validate('migrate-set-parameters', {}), {});
});

test('int64 bounds', () => {
  assert.deepEqual(validate('migrate_set_speed', { value: -5 }), { value: -5 });
  rejects('migrate_set_speed', { value: 2 ** 63 }, "Invalid parameter type for 'value', expected: integer");
  rejects('migrate_set_speed', { value: true }, "Invalid parameter type for 'value', expected: integer");
});

test('sized integer ranges use QEMU 7.2 texts', () => {
  const at = R.member(R.ROOT, 'decompress-threads');
  assert.equal(R.uint8(255, at), 255);
  assert.throws(() => R.uint8(256, at), { desc: "Parameter 'decompress-threads' expects uint8_t" });
  assert.throws(() => R.uint8(-1, at), { desc: "Parameter 'decompress-threads' expects uint8_t" });
  assert.throws(() => R.uint8(1.5, at), { desc: "Invalid parameter type for 'decompress-threads', expected: integer" });
  assert.throws(() => R.uint16(65536, at), { desc: "Parameter 'decompress-threads' expects uint16_t" });
  assert.throws(() => R.uint32(2 ** 32, at), { desc: "Parameter 'decompress-threads' expects uint32_t" });
  assert.equal(R.uint32(2 ** 32 - 1, at), 2 ** 32 - 1);
  assert.throws(() => R.int8(128, at), { desc: "Parameter 'decompress-threads' expects int8_t" });
  assert.throws(() => R.int16(-32769, at), { desc: "Parameter 'decompress-threads' expects int16_t" });
  assert.throws(() => R.int32(2 ** 31, at), { desc: "Parameter 'decompress-threads' expects int32_t" });
  assert.equal(R.int32(-(2 ** 31), at), -(2 ** 31));
  // A list element has no name of its own; QEMU prints 'null'.
  assert.throws(() => R.list([1, 300], at, R.uint8), { desc: "Parameter 'null' expects uint8_t" });
});

test('size and uint64 must be non-negative integers', () => {
  const at = R.member(R.ROOT, 'size');
  assert.equal(R.size(0, at), 0);
  assert.equal(R.uint64(2 ** 53, at), 2 ** 53);
  assert.throws(() => R.size(-1, at), { desc: "Parameter 'size' expects size" });
  assert.throws(() => R.uint64(-1, at), { desc: "Parameter 'size' expects uint64" });
  assert.throws(() => R.size(2 ** 64, at), { desc: "Parameter 'size' expects size" });
  assert.throws(() => R.size(0.5, at), { desc: "Invalid parameter type for 'size', expected: integer" });
  assert.throws(() => R.size('1', at), { desc: "Invalid parameter type for 'size', expected: integer" });
});

test('null and any builtins', () => {
  const at = R.member(R.ROOT, 'n');
  assert.equal(R.nul(null, at), null);
  assert.throws(() => R.nul(0, at), { desc: "Invalid parameter type for 'n', expected: null" });
  const v = { deep: [1] };
  assert.equal(R.any(v, at), v);
});

test('object-add: flat union on qom-type', () => {
  const def = COMMANDS.get('object-add');
  assert.equal(def?.boxed, true);
  assert.deepEqual(validate('object-add', { 'qom-type': 'memory-backend-ram', id: 'm0', size: 4096 }), {
    'qom-type': 'memory-backend-ram',
    id: 'm0',
    size: 4096,
  });
  assert.deepEqual(
    validate('object-add', { 'qom-type': 'tls-creds-x509', id: 't', endpoint: 'server', dir: '/d', 'verify-peer': false, 'sanity-check': true }),
    { 'qom-type': 'tls-creds-x509', id: 't', endpoint: 'server', dir: '/d', 'verify-peer': false, 'sanity-check': true },
  );
  rejects('object-add', { id: 'x' }, "Parameter 'qom-type' is missing");
  rejects('object-add', { 'qom-type': 'nosuch', id: 'x' }, "Parameter 'qom-type' does not accept value 'nosuch'");
  rejects('object-add', { 'qom-type': 'memory-backend-ram', id: 'm0' }, "Parameter 'size' is missing");
  rejects('object-add', { 'qom-type': 'memory-backend-ram', id: 'm0', size: -1 }, "Parameter 'size' expects size");
  rejects('object-add', { 'qom-type': 'tls-creds-anon', id: 't', username: 'u' }, "Parameter 'username' is unexpected");
  rejects('object-add', { 'qom-type': 'tls-creds-psk', id: 't', endpoint: 'middle' }, "Parameter 'endpoint' does not accept value 'middle'");
  assert.deepEqual(validate('object-add', { 'qom-type': 'tls-creds-psk', id: 't', username: 'u' }), {
    'qom-type': 'tls-creds-psk',
    id: 't',
    username: 'u',
  });
  rejects('object-del', {}, "Parameter 'id' is missing");
});

test('misc and control commands', () => {
  assert.deepEqual(validate('getfd', { fdname: 'f' }), { fdname: 'f' });
  rejects('closefd', { fdname: 1 }, "Invalid parameter type for 'fdname', expected: string");
  rejects('pmemsave', { val: 0, size: 1 }, "Parameter 'filename' is missing");
  for (const c of ['query-version', 'query-commands', 'quit', 'query-status', 'stop', 'cont', 'x-query-memory-digest', 'query-qmp-schema']) {
    assert.deepEqual(validate(c, {}), {}, c);
  }
});

test('every command has a validator that accepts the empty object or reports a missing member', () => {
  for (const [name, def] of COMMANDS) {
    assert.equal(def.name, name);
    try {
      def.validate({});
    } catch (e) {
      assert.ok(e instanceof QapiError, name);
      assert.match(e.desc, /^Parameter '[^']+' is missing$/, name);
    }
  }
});

test('type validators are exported for reuse', () => {
  assert.deepEqual(V.v_MigrationCapabilityStatus({ capability: 'xbzrle', state: false }, R.ROOT), { capability: 'xbzrle', state: false });
  assert.throws(() => V.v_StrOrNull(1, R.member(R.ROOT, 'x')), { desc: "Invalid parameter type for 'x', expected: StrOrNull" });
});
