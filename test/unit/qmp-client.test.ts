import assert from 'node:assert/strict';
import * as net from 'node:net';
import { PassThrough } from 'node:stream';
import { after, before, describe, it } from 'node:test';
import { main, parseKeyValues, splitWords } from '../../src/cli/qmp.js';
import { QmpClient, QmpCommandError } from '../../src/qmp/client.js';
import { FakeServer, sleep, startFakeServer, tmpSocketPath } from '../helpers/qmp-fixtures.js';

function capture() {
  const s = new PassThrough();
  let text = '';
  s.on('data', (b: Buffer) => (text += b.toString()));
  return { stream: s, get text() { return text; } };
}

describe('QmpClient', () => {
  let fx: FakeServer;
  let tcp: FakeServer;
  before(async () => {
    fx = await startFakeServer('unix');
    tcp = await startFakeServer('tcp');
  });
  after(async () => {
    await fx.close();
    await tcp.close();
  });

  it('connects (path, unix:, {path}, tcp:, {host,port}), reads the greeting, negotiates', async () => {
    for (const t of [
      fx.socketPath!,
      `unix:${fx.socketPath!}`,
      { path: fx.socketPath! },
      `tcp:127.0.0.1:${tcp.port}`,
      { host: '127.0.0.1', port: tcp.port! },
    ]) {
      const c = await QmpClient.connect(t);
      assert.deepEqual(c.greeting.QMP.version.qemu, { major: 7, minor: 2, micro: 0 });
      assert.deepEqual(c.greeting.QMP.capabilities, []);
      await assert.rejects(c.execute('query-status'), (e: unknown) => {
        assert.ok(e instanceof QmpCommandError);
        assert.equal(e.errorClass, 'CommandNotFound');
        assert.equal(e.desc, "Expecting capabilities negotiation with 'qmp_capabilities'");
        return true;
      });
      await c.negotiate();
      assert.deepEqual(await c.execute('query-status'), { status: 'running', running: true, singlestep: false });
      await c.close();
    }
  });

  it('matches concurrent executes by id and rejects errors with class/desc', async () => {
    const c = await QmpClient.connect(fx.socketPath!, { negotiate: true });
    const [a, b, e, d] = await Promise.allSettled([
      c.execute<{ slept: number; tag: string }>('sleep', { ms: 30, tag: 'a' }),
      c.execute('sleep', { ms: 1, tag: 'b' }),
      c.execute('migrate', {}),
      c.execute('echo', { value: [1, 'é'] }),
    ]);
    assert.deepEqual(a, { status: 'fulfilled', value: { slept: 30, tag: 'a' } });
    assert.deepEqual(b, { status: 'fulfilled', value: { slept: 1, tag: 'b' } });
    assert.equal(e.status, 'rejected');
    const err = (e as PromiseRejectedResult).reason as QmpCommandError;
    assert.equal(err.errorClass, 'GenericError');
    assert.equal(err.desc, "Parameter 'uri' is missing");
    assert.deepEqual(d, { status: 'fulfilled', value: { value: [1, 'é'] } });
    await c.close();
  });

  it('events: emitter, log, waitEvent (future and past)', async () => {
    const c = await QmpClient.connect(fx.socketPath!, { negotiate: true });
    const seen: string[] = [];
    c.events.on('STOP', () => seen.push('STOP'));
    const w = c.waitEvent('MIGRATION', (ev) => ev.data?.status === 'setup', 2000);
    await c.execute('stop');
    await c.execute('migrate', { uri: 'tcp:h:1' });
    const ev = await w;
    assert.deepEqual(ev.data, { status: 'setup' });
    assert.deepEqual(seen, ['STOP']);
    assert.deepEqual(c.eventLog.map((e) => e.event), ['STOP', 'MIGRATION']);
    assert.equal((await c.waitEvent('STOP', undefined, 100, { past: true })).event, 'STOP');
    await assert.rejects(c.waitEvent('NEVER', undefined, 50), /timed out/);
    await c.execute('cont');
    await c.close();
  });

  it('raw sends: unmatched replies are surfaced', async () => {
    const c = await QmpClient.connect(fx.socketPath!, { negotiate: true });
    const replies: unknown[] = [];
    c.messages.on('reply', (r) => replies.push(r));
    c.sendRaw('{"execute":"echo","id":"raw"}[1]');
    await c.execute('echo');
    assert.deepEqual(replies, [
      { return: {}, id: 'raw' },
      { error: { class: 'GenericError', desc: 'QMP input must be a JSON object' } },
    ]);
    await c.close();
  });

  it('pending commands reject when the connection drops; connect errors are clear', async () => {
    const p = tmpSocketPath('drop');
    const srv = net.createServer((s) => {
      s.write('{"QMP": {"version": {"qemu": {"micro": 0, "minor": 10, "major": 2}, "package": ""}, "capabilities": []}}\r\n');
      s.on('data', () => s.destroy());
    });
    await new Promise<void>((r) => srv.listen(p, r));
    const c = await QmpClient.connect(p);
    await assert.rejects(c.execute('qmp_capabilities'), /connection closed/);
    await c.closed;
    srv.close();
    await assert.rejects(QmpClient.connect(tmpSocketPath('none')), /ENOENT/);
    const silent = net.createServer(() => undefined);
    const sp = tmpSocketPath('silent');
    await new Promise<void>((r) => silent.listen(sp, r));
    await assert.rejects(QmpClient.connect(sp, { timeoutMs: 50 }), /no greeting/);
    silent.close();
  });
});

describe('ferry qmp CLI', () => {
  let fx: FakeServer;
  before(async () => {
    fx = await startFakeServer('unix');
  });
  after(async () => {
    await fx.close();
  });

  it('parses key=value arguments', () => {
    assert.deepEqual(parseKeyValues(['uri=tcp:1.2.3.4:5', 'n=3', 'b=true', 'z=null', 'l=[1,"a"]', 's="12"', 'a.b=1', 'a.c=x']), {
      uri: 'tcp:1.2.3.4:5',
      n: 3,
      b: true,
      z: null,
      l: [1, 'a'],
      s: '12',
      a: { b: 1, c: 'x' },
    });
    assert.throws(() => parseKeyValues(['novalue']), /key=value/);
    assert.throws(() => parseKeyValues(['a=1', 'a.b=2']), /both a value and an object/);
    assert.deepEqual(splitWords(`migrate uri='tcp:h:1' x="a b" y=c\\ d`), ['migrate', 'uri=tcp:h:1', 'x=a b', 'y=c d']);
  });

  it('one-shot success prints pretty JSON and exits 0', async () => {
    const out = capture();
    const err = capture();
    const rc = await main([fx.socketPath!, 'echo', 'value.a=1', 'value.b=x'], { stdout: out.stream, stderr: err.stream });
    assert.equal(rc, 0);
    assert.equal(out.text, JSON.stringify({ value: { a: 1, b: 'x' } }, null, 2) + '\n');
    assert.equal(err.text, '');
  });

  it('one-shot error prints "error: <class>: <desc>" and exits 1', async () => {
    const out = capture();
    const err = capture();
    const rc = await main([`unix:${fx.socketPath!}`, 'migrate'], { stdout: out.stream, stderr: err.stream });
    assert.equal(rc, 1);
    assert.equal(out.text, '');
    assert.equal(err.text, "error: GenericError: Parameter 'uri' is missing\n");
    const err2 = capture();
    assert.equal(await main([fx.socketPath!, 'nosuch'], { stdout: out.stream, stderr: err2.stream }), 1);
    assert.equal(err2.text, 'error: CommandNotFound: The command nosuch has not been found\n');
  });

  it('usage and connection errors', async () => {
    const out = capture();
    const err = capture();
    assert.equal(await main([], { stdout: out.stream, stderr: err.stream }), 2);
    assert.match(err.text, /usage: ferry qmp/);
    const err2 = capture();
    assert.equal(await main([tmpSocketPath('none'), 'stop'], { stdout: out.stream, stderr: err2.stream }), 1);
    assert.match(err2.text, /ENOENT/);
    const err3 = capture();
    assert.equal(await main([fx.socketPath!, 'echo', 'junk'], { stdout: out.stream, stderr: err3.stream }), 2);
    assert.match(err3.text, /expected key=value/);
  });

  it('interactive mode: commands, raw JSON, events, exit on EOF', async () => {
    const stdin = new PassThrough();
    const out = capture();
    const err = capture();
    const done = main([fx.socketPath!], { stdin, stdout: out.stream, stderr: err.stream });
    stdin.write('query-status\n');
    stdin.write('stop\n');
    stdin.write('{"execute": "echo", "arguments": {"value": 5}, "id": "r"}\n');
    stdin.write('migrate\n');
    await sleep(50);
    stdin.end('cont\n');
    assert.equal(await done, 0);
    assert.match(out.text, /"status": "running"/);
    assert.match(out.text, /\{"timestamp": \{"seconds": \d+, "microseconds": \d+\}, "event": "STOP"\}/);
    assert.match(out.text, /\{"return": \{"value": 5\}, "id": "r"\}/);
    assert.match(out.text, /"event": "RESUME"/);
    assert.equal(err.text, "error: GenericError: Parameter 'uri' is missing\n");
  });
});

it('QmpClient skips an event written before the greeting (QEMU 7.2 with -incoming does that)', async () => {
  const greeting = { QMP: { version: { qemu: { major: 7, minor: 2, micro: 0 }, package: '' }, capabilities: [] } };
  const srv = net.createServer((c) => {
    c.write('{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "MIGRATION", "data": {"status": "setup"}}\r\n');
    c.write(JSON.stringify(greeting) + '\r\n');
  });
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  const port = (srv.address() as { port: number }).port;
  try {
    const q = await QmpClient.connect({ host: '127.0.0.1', port });
    assert.deepEqual(q.greeting, greeting);
    q.destroy();
    // anything else before the greeting is still refused
    srv.removeAllListeners('connection');
    srv.on('connection', (c) => c.write('{"return": {}}\r\n'));
    await assert.rejects(QmpClient.connect({ host: '127.0.0.1', port }), /not a QMP greeting/);
  } finally {
    srv.close();
  }
});
