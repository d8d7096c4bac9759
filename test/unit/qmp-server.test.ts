import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import { spawnSync } from 'node:child_process';
import { after, before, describe, it } from 'node:test';
import { QmpServer } from '../../src/qmp/server.js';
import { parseListenSpec } from '../../src/qmp/address.js';
import { scmRightsAvailable, writeWithFds } from '../../src/qmp/scm-rights.js';
import * as os from 'node:os';
import * as path from 'node:path';
import { FAKE_COMMANDS, FakeServer, RawConn, sleep, startFakeServer, tmpSocketPath } from '../helpers/qmp-fixtures.js';

const GREETING_RE = /^\{"QMP": \{"version": \{"qemu": \{"micro": 0, "minor": 2, "major": 7\}, "package": "ferry-test"\}, "capabilities": \[\]\}\}\r\n$/;

type Msg = Record<string, unknown>;

/** Send input and collect the next n messages after what has been read so far. */
async function exchange(c: RawConn, input: string | Buffer, n: number): Promise<Msg[]> {
  const from = c.lines.length;
  c.send(input);
  return c.json(from, n);
}

const gerr = (desc: string) => ({ error: { class: 'GenericError', desc } });

for (const variant of ['unix', 'unix-no-native', 'tcp'] as const) {
  const kind = variant === 'tcp' ? 'tcp' : 'unix';
  describe(`qmp server over ${variant}`, () => {
    let fx: FakeServer;
    const target = () => (kind === 'unix' ? { path: fx.socketPath! } : { port: fx.port! });
    before(async () => {
      fx = await startFakeServer(kind, variant === 'unix-no-native' ? { scmRights: false } : {});
    });
    after(async () => {
      await fx.close();
    });

    it('greets with one line in one write', async () => {
      const c = await RawConn.connect(target());
      await c.waitLines(1);
      await sleep(20);
      assert.equal(c.chunks.length, 1);
      assert.match(c.chunks[0]!.toString(), GREETING_RE);
      c.close();
    });

    it('negotiation mode: only qmp_capabilities', async () => {
      const c = await RawConn.connect(target());
      await c.waitLines(1);
      assert.deepEqual(await exchange(c, '{"execute":"query-status","id":1}', 1), [
        { id: 1, error: { class: 'CommandNotFound', desc: "Expecting capabilities negotiation with 'qmp_capabilities'" } },
      ]);
      assert.deepEqual(await exchange(c, '{"execute":"nosuch"}', 1), [
        { error: { class: 'CommandNotFound', desc: "Expecting capabilities negotiation with 'qmp_capabilities'" } },
      ]);
      assert.deepEqual(await exchange(c, '{"execute":"qmp_capabilities","arguments":{"enable":["oob"]},"id":"x"}', 1), [
        { id: 'x', error: { class: 'GenericError', desc: "Capability 'oob' not available" } },
      ]);
      assert.deepEqual(await exchange(c, '{"execute":"qmp_capabilities","arguments":{"bogus":1}}', 1), [
        gerr("Parameter 'bogus' is unexpected"),
      ]);
      assert.deepEqual(await exchange(c, '{"execute":"qmp_capabilities","arguments":{"enable":["nope"]}}', 1), [
        gerr("Parameter 'enable[0]' does not accept value 'nope'"),
      ]);
      assert.deepEqual(await exchange(c, '{"execute":"qmp_capabilities","id":7}', 1), [{ return: {}, id: 7 }]);
      assert.deepEqual(await exchange(c, '{"execute":"qmp_capabilities","id":8}', 1), [
        { id: 8, error: { class: 'CommandNotFound', desc: 'Capabilities negotiation is already complete, command ignored' } },
      ]);
      assert.deepEqual(await exchange(c, '{"execute":"query-status","id":9}', 1), [
        { return: { status: 'running', running: true, singlestep: false }, id: 9 },
      ]);
      c.close();
    });

    it('lines end with \\r\\n and output is ASCII', async () => {
      const c = await RawConn.connect(target());
      await c.negotiate();
      const from = c.lines.length;
      c.send('{"execute":"echo","arguments":{"value":"a\u00e9\u{1F600}"}}');
      await c.waitLines(from + 1);
      assert.equal(c.lines[from], '{"return": {"value": "a\\u00E9\\uD83D\\uDE00"}}\r\n');
      c.close();
    });

    it('malformed input: exact class/desc, no id where none is due', async () => {
      const c = await RawConn.connect(target());
      await c.negotiate();
      const cases: [string, Msg][] = [
        ['{"execute": }', gerr('JSON parse error, expecting value')],
        ['42\n', gerr('QMP input must be a JSON object')],
        ['"str"', gerr('QMP input must be a JSON object')],
        ['[1,2]', gerr('QMP input must be a JSON object')],
        ['{"foo":1}', gerr("QMP input member 'foo' is unexpected")],
        ['{"execute":"query-status","foo":1}', gerr("QMP input member 'foo' is unexpected")],
        ['{}', gerr("QMP input lacks member 'execute'")],
        ['{"id": 3}', { id: 3, ...gerr("QMP input lacks member 'execute'") }],
        ['{"execute": 1, "id": 4}', { id: 4, ...gerr("QMP input member 'execute' must be a string") }],
        ['{"execute": "echo", "arguments": [], "id": 5}', { id: 5, ...gerr("QMP input member 'arguments' must be an object") }],
        ['{"execute": "nosuch", "id": 6}', { id: 6, error: { class: 'CommandNotFound', desc: 'The command nosuch has not been found' } }],
        ['{"execute": "no-handler"}', { error: { class: 'CommandNotFound', desc: 'The command no-handler has not been found' } }],
        ['{"execute": "toString"}', { error: { class: 'CommandNotFound', desc: 'The command toString has not been found' } }],
        ['{"execute": "migrate", "id": 7}', { id: 7, ...gerr("Parameter 'uri' is missing") }],
        ['{"execute": "migrate", "arguments": {"uri": 1}}', gerr("Invalid parameter type for 'uri', expected: string")],
        ['{"execute": "migrate", "arguments": {"uri": "x", "bogus": 1}}', gerr("Parameter 'bogus' is unexpected")],
        ['{"execute": "fail", "arguments": {"class": "DeviceNotActive", "desc": "SPICE is not in use"}, "id": 8}',
          { id: 8, error: { class: 'DeviceNotActive', desc: 'SPICE is not in use' } }],
        ['{"execute": "throw-plain", "id": 9}', { id: 9, ...gerr('plain failure') }],
        [Buffer.from([0xff, 0x0a]) as unknown as string, gerr("JSON parse error, stray '\uFFFD'")],
        ['{"execute": nope}', gerr("JSON parse error, invalid keyword 'nope'")],
      ];
      for (const [input, expected] of cases) {
        const [got] = await exchange(c, input, 1);
        assert.deepEqual(got, expected, String(input));
      }
      // the stray-byte reply is written as \uFFFD
      assert.ok(c.lines.some((l) => l.includes("stray '\\uFFFD'")));
      c.close();
    });

    it('parser back in step after garbage; stray closing brace', async () => {
      const c = await RawConn.connect(target());
      await c.negotiate();
      assert.deepEqual(await exchange(c, '@#garbage\n{"execute":"query-status","id":1}', 2), [
        gerr("JSON parse error, stray '@'"),
        { return: { status: 'running', running: true, singlestep: false }, id: 1 },
      ]);
      assert.deepEqual(await exchange(c, '{"execute":"echo","id":2}}{"execute":"echo","id":3}', 3), [
        { return: {}, id: 2 },
        gerr('JSON parse error, expecting value'),
        { return: {}, id: 3 },
      ]);
      assert.deepEqual(await exchange(c, "{'execute': 'echo', 'arguments': {'value': 'it\\'s'}, 'id': 4}", 1), [
        { return: { value: "it's" }, id: 4 },
      ]);
      c.close();
    });

    it('split and concatenated objects', async () => {
      const c = await RawConn.connect(target());
      await c.negotiate();
      const from = c.lines.length;
      const text = '{"execute": "echo", "arguments": {"value": [1, {"a": "}]"}]}, "id": "split"}';
      for (const ch of text) {
        c.send(ch);
        await sleep(0);
      }
      const [r] = await c.json(from, 1);
      assert.deepEqual(r, { return: { value: [1, { a: '}]' }] }, id: 'split' });
      assert.deepEqual(await exchange(c, '{"execute":"echo","id":1}{"execute":"echo","id":2}\n{"execute":"echo","id":3}', 3), [
        { return: {}, id: 1 },
        { return: {}, id: 2 },
        { return: {}, id: 3 },
      ]);
      c.close();
    });

    it('echoes odd ids re-serialised, on errors too', async () => {
      const c = await RawConn.connect(target());
      await c.negotiate();
      assert.deepEqual(await exchange(c, '{"execute":"query-status","id":{"a":[1]},"extra":2}', 1), [
        { id: { a: [1] }, ...gerr("QMP input member 'extra' is unexpected") },
      ]);
      const from = c.lines.length;
      c.send('{"execute":"echo","id":2.5e3}{"execute":"echo","id":null}{"execute":"echo","id":"\\u00e9"}');
      await c.waitLines(from + 3);
      assert.equal(c.lines[from], '{"return": {}, "id": 2500}\r\n');
      assert.equal(c.lines[from + 1], '{"return": {}, "id": null}\r\n');
      assert.equal(c.lines[from + 2], '{"return": {}, "id": "\\u00E9"}\r\n');
      c.close();
    });

    it('runs commands strictly in order, even async ones', async () => {
      const c = await RawConn.connect(target());
      await c.negotiate();
      fx.vm.log.length = 0;
      const rs = await exchange(
        c,
        '{"execute":"sleep","arguments":{"ms":40,"tag":"a"},"id":1}' +
          '{"execute":"sleep","arguments":{"ms":1,"tag":"b"},"id":2}' +
          '{"execute":"echo","id":3}{"execute":"sleep","arguments":{"ms":10,"tag":"c"},"id":4}',
        4,
      );
      assert.deepEqual(rs.map((r) => r.id), [1, 2, 3, 4]);
      assert.deepEqual(fx.vm.log, ['start a', 'end a', 'start b', 'end b', 'start c', 'end c']);
      c.close();
    });

    it('events: timestamp shape, only after negotiation, before the causing reply', async () => {
      const a = await RawConn.connect(target());
      const b = await RawConn.connect(target());
      await a.negotiate();
      await b.waitLines(1); // b stays in negotiation mode
      const t0 = Date.now() / 1000;
      const rs = await exchange(a, '{"execute":"stop","id":"s"}', 2);
      assert.deepEqual(Object.keys(rs[0]!), ['timestamp', 'event']);
      assert.equal(rs[0]!.event, 'STOP');
      const ts = rs[0]!.timestamp as { seconds: number; microseconds: number };
      assert.ok(Number.isInteger(ts.seconds) && Math.abs(ts.seconds - t0) < 5);
      assert.ok(Number.isInteger(ts.microseconds) && ts.microseconds >= 0 && ts.microseconds <= 999999);
      assert.deepEqual(rs[1], { return: {}, id: 's' });
      const rs2 = await exchange(a, '{"execute":"migrate","arguments":{"uri":"tcp:x:1"},"id":"m"}', 2);
      assert.deepEqual(rs2[0]!.data, { status: 'setup' });
      assert.deepEqual(rs2[1], { return: {}, id: 'm' });
      fx.server.broadcast('RESUME');
      await a.waitLines(a.lines.length + 1);
      await sleep(20);
      assert.equal(b.lines.length, 1, 'no events to a negotiating client');
      // b negotiates: now it gets events
      await exchange(b, '{"execute":"qmp_capabilities"}', 1);
      fx.server.broadcast('X', { n: 1 });
      const [ev] = await b.json(2, 1);
      assert.equal(ev!.event, 'X');
      assert.deepEqual(ev!.data, { n: 1 });
      a.close();
      b.close();
    });

    it('no event shares a write with the qmp_capabilities reply', async () => {
      const c = await RawConn.connect(target());
      await c.waitLines(1);
      const conn = await waitConn(fx.server, c);
      const writes: string[] = [];
      const origWrite = conn.socket.write.bind(conn.socket) as (...a: unknown[]) => boolean;
      (conn.socket as unknown as { write: (...a: unknown[]) => boolean }).write = (...a: unknown[]) => {
        writes.push(String(a[0]));
        return origWrite(...a);
      };
      let timer: NodeJS.Timeout | undefined;
      // fire events continuously while the client negotiates
      timer = setInterval(() => fx.server.broadcast('TICK'), 0);
      c.send('{"execute":"qmp_capabilities","id":1}');
      await c.waitLines(3);
      clearInterval(timer);
      timer = undefined;
      const i = writes.findIndex((w) => w.includes('"return"'));
      assert.ok(i >= 0);
      assert.equal(writes[i], '{"return": {}, "id": 1}\r\n');
      for (const w of writes) assert.ok(!(w.includes('"event"') && w.includes('"return"')));
      const firstEv = writes.findIndex((w) => w.includes('"event"'));
      assert.ok(firstEv > i, 'events only after the reply');
      c.close();
    });

    it('a client that disconnects mid-command does not crash the server', async () => {
      const c = await RawConn.connect(target());
      await c.negotiate();
      c.send('{"execute":"sleep","arguments":{"ms":50},"id":1}{"execute":"sleep","arguments":{"ms":50},"id":2}');
      await sleep(10);
      c.close();
      fx.server.broadcast('AFTER_CLOSE');
      await sleep(120);
      const d = await RawConn.connect(target());
      await d.negotiate();
      assert.deepEqual(await exchange(d, '{"execute":"echo","id":"alive"}', 1), [{ return: {}, id: 'alive' }]);
      d.close();
    });

    it('several clients at once, each with its own context', async () => {
      const cs = await Promise.all([1, 2, 3].map(() => RawConn.connect(target())));
      await Promise.all(cs.map((c) => c.negotiate()));
      const ids = await Promise.all(cs.map(async (c) => (await exchange(c, '{"execute":"whoami"}', 1))[0]!.return));
      assert.equal(new Set(ids.map((x) => (x as { id: number }).id)).size, 3);
      for (const c of cs) c.close();
    });

    it('client half-close: pending replies still arrive, then the server closes', async () => {
      const c = await RawConn.connect(target());
      await c.waitLines(1);
      c.sock.end('{"execute":"qmp_capabilities"}{"execute":"sleep","arguments":{"ms":20},"id":1}');
      const rs = await c.json(1, 2);
      assert.deepEqual(rs[1], { return: { slept: 20, tag: null }, id: 1 });
      for (let i = 0; i < 100 && !c.closed; i++) await sleep(10);
      assert.equal(c.closed, true);
    });

    it('getfd without SCM_RIGHTS', async () => {
      const c = await RawConn.connect(target());
      await c.negotiate();
      assert.deepEqual(await exchange(c, '{"execute":"getfd","arguments":{"fdname":"f"}}', 1), [
        gerr('No file descriptor supplied via SCM_RIGHTS'),
      ]);
      c.close();
    });
  });
}

async function waitConn<C>(server: QmpServer<C>, _c: RawConn) {
  for (let i = 0; i < 100; i++) {
    const cs = server.connections.filter((x) => x.state === 'negotiation');
    if (cs.length) return cs[cs.length - 1]!;
    await sleep(5);
  }
  throw new Error('no connection');
}

describe('qmp server: limits', () => {
  it('bounds an oversized value (small limit) and stays in step', async () => {
    const fx = await startFakeServer('unix', { limits: { maxBytes: 64 * 1024 } });
    try {
      const c = await RawConn.connect({ path: fx.socketPath! });
      await c.negotiate();
      const from = c.lines.length;
      c.send('{"execute":"echo","arguments":{"value":"');
      const chunk = 'x'.repeat(16 * 1024);
      for (let i = 0; i < 64; i++) c.send(chunk); // 1 MiB, 16x the limit
      c.send('"}, "id": 1}{"execute":"echo","id":2}');
      const rs = await c.json(from, 2);
      assert.deepEqual(rs, [gerr('JSON token size limit exceeded'), { return: {}, id: 2 }]);
      c.close();
    } finally {
      await fx.close();
    }
  });

  it('default limit is 64 MiB: a 65 MiB unterminated value is refused', { timeout: 60000 }, async () => {
    const fx = await startFakeServer('unix');
    try {
      const c = await RawConn.connect({ path: fx.socketPath! });
      await c.negotiate();
      const from = c.lines.length;
      const chunk = Buffer.alloc(1 << 20, 0x61);
      c.send('{"execute":"echo","arguments":{"value":"');
      for (let i = 0; i < 65; i++) {
        if (!c.sock.write(chunk)) await new Promise((r) => c.sock.once('drain', r));
      }
      const [r] = await c.json(from, 1);
      assert.deepEqual(r, gerr('JSON token size limit exceeded'));
      c.send('"}}{"execute":"echo","id":"next"}');
      assert.deepEqual(await c.json(from + 1, 1), [{ return: {}, id: 'next' }]);
      c.close();
    } finally {
      await fx.close();
    }
  });

  it('nesting depth 1024', async () => {
    const fx = await startFakeServer('unix');
    try {
      const c = await RawConn.connect({ path: fx.socketPath! });
      await c.negotiate();
      const rs = await exchange(c, '['.repeat(2000) + ']'.repeat(2000) + '{"execute":"echo","id":1}', 2);
      assert.deepEqual(rs, [gerr('JSON nesting depth limit exceeded'), { return: {}, id: 1 }]);
      // exactly at the limit is fine (and not an object)
      const ok = await exchange(c, '['.repeat(1024) + ']'.repeat(1024), 1);
      assert.deepEqual(ok, [gerr('QMP input must be a JSON object')]);
      c.close();
    } finally {
      await fx.close();
    }
  });
});

describe('qmp server: listen specs', () => {
  const mk = () =>
    new QmpServer({ commands: FAKE_COMMANDS, handlers: {}, version: { qemu: { major: 2, minor: 10, micro: 0 }, package: '' } });

  it('parses spellings', () => {
    assert.deepEqual(parseListenSpec('unix:/tmp/a.sock,server=on,wait=off'), {
      address: { kind: 'unix', path: '/tmp/a.sock' },
      wait: false,
    });
    assert.deepEqual(parseListenSpec('unix:/tmp/a.sock,server,nowait'), {
      address: { kind: 'unix', path: '/tmp/a.sock' },
      wait: false,
    });
    assert.deepEqual(parseListenSpec('tcp:[::1]:4444,server=on,wait=off'), {
      address: { kind: 'tcp', host: '::1', port: 4444 },
      wait: false,
    });
    assert.deepEqual(parseListenSpec('tcp::4444,server,nowait').address, { kind: 'tcp', host: '', port: 4444 });
    assert.deepEqual(parseListenSpec('unix:/tmp/a,,b,server'), { address: { kind: 'unix', path: '/tmp/a,b' }, wait: true });
  });

  it('rejects bad specs clearly', () => {
    for (const bad of [
      'foo',
      '/tmp/x.sock',
      'unix:/tmp/x.sock',
      'unix:/tmp/x,server=maybe',
      'unix:/tmp/x,server,colour=red',
      'unix:,server',
      'tcp:localhost,server',
      'tcp:localhost:99999,server',
      'tcp:::1:4444,server',
      'tcp:[::1]4444,server',
    ]) {
      assert.throws(() => parseListenSpec(bad), /invalid (monitor )?address/, bad);
    }
  });

  it('replaces a stale unix socket, refuses a regular file, listens repeatedly', async () => {
    const p = tmpSocketPath('stale');
    // a socket file left behind by a killed process
    spawnSync(process.execPath, [
      '-e',
      `require('net').createServer().listen(${JSON.stringify(p)}, () => process.kill(process.pid, 'SIGKILL'))`,
    ]);
    assert.ok(fs.lstatSync(p).isSocket(), 'stale socket file exists');
    const s = mk();
    try {
      await s.listen(`unix:${p},server=on,wait=off`);
      const a = await s.listen('tcp:127.0.0.1:0,server=on,wait=off');
      assert.equal(a.kind, 'tcp');
      assert.ok(a.kind === 'tcp' && a.port > 0);
      assert.equal(s.addresses.length, 2);
      const c1 = await RawConn.connect({ path: p });
      const c2 = await RawConn.connect({ port: (a as { port: number }).port });
      await c1.waitLines(1);
      await c2.waitLines(1);
      assert.match(c1.lines[0]!, /"minor": 10/);
      c1.close();
      c2.close();
      const f = tmpSocketPath('file');
      fs.writeFileSync(f, 'x');
      await assert.rejects(s.listen(`unix:${f},server=on,wait=off`), /not a socket/);
      assert.equal(fs.readFileSync(f, 'utf8'), 'x');
    } finally {
      await s.close();
    }
    assert.equal(fs.existsSync(p), false, 'close() removes the socket file');
  });

  it('IPv6 loopback', async (t) => {
    const s = mk();
    try {
      let a;
      try {
        a = await s.listen('tcp:[::1]:0,server=on,wait=off');
      } catch (e) {
        t.skip(`no IPv6 loopback: ${(e as Error).message}`);
        return;
      }
      const c = await RawConn.connect({ host: '::1', port: (a as { port: number }).port });
      await c.waitLines(1);
      c.close();
    } finally {
      await s.close();
    }
  });

  it('wait=on resolves after the first client connects', async () => {
    const s = mk();
    const p = tmpSocketPath('wait');
    try {
      let done = false;
      const l = s.listen(`unix:${p},server=on,wait=on`).then(() => (done = true));
      for (let i = 0; i < 100 && !fs.existsSync(p); i++) await sleep(5);
      await sleep(20);
      assert.equal(done, false);
      const c = await RawConn.connect({ path: p });
      await l;
      assert.equal(done, true);
      c.close();
    } finally {
      await s.close();
    }
  });

  it('port in use is a clear error', async () => {
    const s = mk();
    const s2 = mk();
    try {
      const a = await s.listen('tcp:127.0.0.1:0,server=on,wait=off');
      await assert.rejects(
        s2.listen(`tcp:127.0.0.1:${(a as { port: number }).port},server=on,wait=off`),
        /Failed to listen on .*EADDRINUSE/,
      );
    } finally {
      await s.close();
      await s2.close();
    }
  });
});

describe('qmp server: file descriptors over SCM_RIGHTS', { skip: !scmRightsAvailable() && 'native addon not built' }, () => {
  it('getfd receives the descriptor sent with the command', async () => {
    const fx = await startFakeServer('unix');
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-fd-'));
    const file = path.join(dir, 'out.txt');
    const fd = fs.openSync(file, 'w');
    try {
      const c = await RawConn.connect({ path: fx.socketPath! });
      await c.negotiate();
      const from = c.lines.length;
      await writeWithFds(c.sock, Buffer.from('{"execute":"getfd","arguments":{"fdname":"mig"},"id":1}'), [fd]);
      assert.deepEqual(await c.json(from, 1), [{ return: {}, id: 1 }]);
      assert.equal(fs.readFileSync(file, 'utf8'), 'hello from getfd mig\n');
      // the next getfd has no descriptor
      assert.deepEqual(await exchange(c, '{"execute":"getfd","arguments":{"fdname":"x"},"id":2}', 1), [
        { id: 2, ...gerr('No file descriptor supplied via SCM_RIGHTS') },
      ]);
      // QmpClient can pass one too
      const { QmpClient } = await import('../../src/qmp/client.js');
      const q = await QmpClient.connect(fx.socketPath!, { negotiate: true });
      await q.execute('getfd', { fdname: 'q' }, { fds: [fd] });
      assert.match(fs.readFileSync(file, 'utf8'), /hello from getfd q/);
      await q.close();
      c.close();
      assert.deepEqual(fx.vm.log.filter((l) => l.startsWith('getfd')), ['getfd mig', 'getfd q']);
    } finally {
      fs.closeSync(fd);
      await fx.close();
    }
  });

  it('unix connections on the native reader: many commands, pause/resume, disconnect', async () => {
    const fx = await startFakeServer('unix', { maxQueuedRequests: 2 });
    try {
      const c = await RawConn.connect({ path: fx.socketPath! });
      await c.negotiate();
      let input = '';
      for (let i = 0; i < 500; i++) input += `{"execute":"echo","arguments":{"value":${i}},"id":${i}}`;
      const rs = await exchange(c, input, 500);
      assert.deepEqual(rs.map((r) => r.id), [...Array(500).keys()]);
      assert.ok(fx.server.connections.every((x) => x.scmRights));
      c.close();
      for (let i = 0; i < 100 && fx.server.connections.length; i++) await sleep(10);
      assert.equal(fx.server.connections.length, 0);
    } finally {
      await fx.close();
    }
  });
});
