// The typed client that tools/qapi-gen emits (src/generated/qapi-client.ts):
// one method per command of the schema, calling the command by its name with
// the arguments given; typed events; error classes from QapiErrorClass; and
// the generator refuses commands whose method names would clash.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { methodName } from '../../tools/qapi-gen/gen-client.js';
import { generate } from '../../tools/qapi-gen/generate.js';
import { QapiSchemaError } from '../../tools/qapi-gen/errors.js';
import { COMMANDS } from '../../src/generated/qapi-commands.js';
import { QMP_ERROR_CLASSES, QmpApi, isQmpError, type QmpRawEvent, type QmpTransport } from '../../src/generated/qapi-client.js';
import { QmpCommandError } from '../../src/qmp/client.js';
import { fileURLToPath } from 'node:url';

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');

class FakeTransport implements QmpTransport {
  calls: { command: string; args?: object }[] = [];
  listeners = new Set<(ev: QmpRawEvent) => void>();
  private close!: () => void;
  readonly closed = new Promise<void>((r) => (this.close = r));
  answer: (command: string) => unknown = () => ({});
  execute(command: string, args?: object): Promise<unknown> {
    this.calls.push({ command, args });
    try {
      return Promise.resolve(this.answer(command));
    } catch (e) {
      return Promise.reject(e);
    }
  }
  subscribe(l: (ev: QmpRawEvent) => void): () => void {
    this.listeners.add(l);
    return () => this.listeners.delete(l);
  }
  emit(event: string, data?: unknown): void {
    for (const l of [...this.listeners]) l({ event, data, timestamp: { seconds: 1, microseconds: 2 } });
  }
  shut(): void {
    this.close();
  }
}

test('method names: camelCase of the command name', () => {
  assert.equal(methodName('x-query-memory-digest'), 'xQueryMemoryDigest');
  assert.equal(methodName('qmp_capabilities'), 'qmpCapabilities');
  assert.equal(methodName('migrate_set_speed'), 'migrateSetSpeed');
  assert.equal(methodName('query-migrate'), 'queryMigrate');
});

test('one method per command, each running its command with the arguments given', async () => {
  const t = new FakeTransport();
  const api = new QmpApi(t) as unknown as Record<string, (a?: object) => Promise<unknown>>;
  const methods = Object.getOwnPropertyNames(QmpApi.prototype).filter((m) => !['constructor', 'execute', 'executeRaw', 'on', 'waitEvent'].includes(m));
  assert.equal(methods.length, COMMANDS.size);
  const schema = generate(path.join(repoRoot, 'qapi/schema.json'), { displayBase: repoRoot }).schema;
  assert.equal(schema.commands.length, COMMANDS.size);
  for (const c of schema.commands) {
    const m = methodName(c.name);
    assert.equal(typeof api[m], 'function', `no method ${m} for ${c.name}`);
    // a command without arguments takes only the call options
    const args = c.args ? { probe: c.name } : undefined;
    await api[m]!.call(api, args ?? { timeoutMs: 5 });
    assert.deepEqual(t.calls.pop(), { command: c.name, args });
  }
});

test('typed answers, events and errors', async () => {
  const t = new FakeTransport();
  const api = new QmpApi(t);
  t.answer = (c) => (c === 'query-status' ? { status: 'running', running: true, singlestep: false } : {});
  assert.equal((await api.queryStatus()).status, 'running');
  const seen: string[] = [];
  const off = api.on('MIGRATION', (e) => seen.push(e.data.status));
  t.emit('MIGRATION', { status: 'active' });
  t.emit('STOP');
  off();
  t.emit('MIGRATION', { status: 'completed' });
  assert.deepEqual(seen, ['active']);
  const w = api.waitEvent('MIGRATION', { predicate: (e) => e.data.status === 'completed' });
  t.emit('MIGRATION', { status: 'active' });
  t.emit('MIGRATION', { status: 'completed' });
  assert.equal((await w).data.status, 'completed');
  assert.equal(t.listeners.size, 0, 'waitEvent unsubscribes');
  await assert.rejects(api.waitEvent('STOP', { timeoutMs: 20 }), /timed out after 20 ms waiting for event STOP/);
  const closing = api.waitEvent('RESUME');
  t.shut();
  await assert.rejects(closing, /closed while waiting for event RESUME/);
  // the error classes come from the schema's QapiErrorClass
  assert.deepEqual(QMP_ERROR_CLASSES, ['GenericError', 'CommandNotFound', 'DeviceNotActive', 'DeviceNotFound', 'KVMMissingCap']);
  const e = new QmpCommandError('DeviceNotFound', 'no such drive', 'query-block');
  assert.ok(isQmpError(e));
  assert.ok(isQmpError(e, 'DeviceNotFound'));
  assert.ok(!isQmpError(e, 'GenericError'));
  assert.ok(!isQmpError(new Error('plain')));
});

test('the generator refuses commands whose client methods would clash', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-qapi-client-'));
  try {
    const f = path.join(dir, 'clash.json');
    fs.writeFileSync(f, "{ 'command': 'query-thing' }\n{ 'command': 'query_thing' }\n");
    assert.throws(() => generate(f, { displayBase: dir }), (e: unknown) => {
      assert.ok(e instanceof QapiSchemaError);
      assert.equal(e.message, "clash.json:2: commands 'query-thing' and 'query_thing' would both be client method 'queryThing'");
      return true;
    });
    fs.writeFileSync(f, "{ 'command': 'wait-event' }\n");
    assert.throws(() => generate(f, { displayBase: dir }), /command 'wait-event' would be client method 'waitEvent', which is reserved/);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
