/**
 * The QMP wire protocol of a real `ferry vm`, seen byte by byte through a
 * dumb raw client (test/clients/raw-qmp.ts), over unix and tcp at once.
 * Reference: docs/spec/qmp.md Part A.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { cleanupAll, startVm, tempDir, waitFor, type VmHandle } from '../helpers/vm.js';
import { freePort, RawQmp, rssOf, type RawTarget } from '../clients/raw-qmp.js';
import { QMP_SCHEMA } from '../../src/generated/qapi-introspect.js';

after(cleanupAll);

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

let vm: VmHandle;
let unixPath: string;
let tcp: { host: string; port: number };
const open: RawQmp[] = [];

async function connect(target: RawTarget): Promise<RawQmp> {
  const c = await RawQmp.connect(target);
  open.push(c);
  return c;
}
async function negotiated(target: RawTarget = unixPath): Promise<RawQmp> {
  const c = await connect(target);
  await c.negotiate();
  return c;
}

before(async () => {
  const dir = tempDir('ferry-qmp-proto-');
  const port = await freePort();
  unixPath = join(dir, 'second.qmp');
  tcp = { host: '127.0.0.1', port };
  // the harness adds its own -qmp unix:...; these are the 2nd and 3rd monitors
  vm = await startVm({
    dir,
    args: ['-m', '32M', '-qmp', `unix:${unixPath},server=on,wait=off`, '-qmp', `tcp:127.0.0.1:${port},server=on,wait=off`],
  });
});

after(() => {
  for (const c of open) c.close();
});

describe('greeting', () => {
  for (const kind of ['unix', 'tcp'] as const) {
    it(`is one line in one write (${kind})`, async () => {
      const c = await connect(kind === 'unix' ? unixPath : tcp);
      await c.until(() => c.chunks.length > 0, 5000, 'greeting');
      await sleep(50); // nothing else may follow on its own
      assert.equal(c.chunks.length, 1, 'greeting came in one chunk, nothing after it');
      const raw = c.chunks[0]!.toString('latin1');
      assert.ok(raw.endsWith('\r\n'), 'ends with CRLF');
      assert.equal(raw.indexOf('\n'), raw.length - 1, 'exactly one line');
      const g = JSON.parse(raw);
      assert.deepEqual(Object.keys(g), ['QMP']);
      assert.deepEqual(Object.keys(g.QMP).sort(), ['capabilities', 'version']);
      assert.deepEqual(g.QMP.capabilities, []);
      const v = g.QMP.version;
      assert.deepEqual(Object.keys(v).sort(), ['package', 'qemu']);
      assert.equal(typeof v.package, 'string');
      for (const k of ['major', 'minor', 'micro']) assert.ok(Number.isInteger(v.qemu[k]), k);
      assert.deepEqual(v.qemu, { major: 2, minor: 10, micro: 0 });
      assert.ok(/^[\x20-\x7e\r\n]*$/.test(raw), 'ASCII only');
    });
  }

  it('query-version matches the greeting', async () => {
    const c = await connect(tcp);
    const g = await c.negotiate();
    const r = await c.cmd('query-version');
    assert.deepEqual(r.return, g.QMP.version);
  });
});

describe('negotiation', () => {
  it('rejects every other command while negotiating, known or not', async () => {
    const c = await connect(unixPath);
    await c.next();
    for (const name of ['query-status', 'query-commands', 'no-such-command', 'quit']) {
      const r = await c.cmd(name, undefined, name);
      assert.deepEqual(r, {
        id: name,
        error: { class: 'CommandNotFound', desc: "Expecting capabilities negotiation with 'qmp_capabilities'" },
      });
    }
    // still negotiating, and still alive: quit above did nothing
    assert.ok((await c.cmd('qmp_capabilities')).return !== undefined);
    assert.equal((await c.cmd('query-status')).return.status, 'running');
  });

  it('argument errors of qmp_capabilities leave the connection negotiating', async () => {
    const c = await connect(unixPath);
    await c.next();
    let r = await c.cmd('qmp_capabilities', { bogus: 1 });
    assert.equal(r.error.class, 'GenericError');
    assert.equal(r.error.desc, "Parameter 'bogus' is unexpected");
    r = await c.cmd('qmp_capabilities', { enable: ['oob'] }); // not offered in the greeting
    assert.equal(r.error.class, 'GenericError', JSON.stringify(r));
    r = await c.cmd('query-status');
    assert.equal(r.error.class, 'CommandNotFound');
    r = await c.cmd('qmp_capabilities', {}, 7);
    assert.deepEqual(r, { return: {}, id: 7 });
  });

  it('a second qmp_capabilities is CommandNotFound', async () => {
    const c = await negotiated(tcp);
    const r = await c.cmd('qmp_capabilities', undefined, 'again');
    assert.deepEqual(r, {
      id: 'again',
      error: { class: 'CommandNotFound', desc: 'Capabilities negotiation is already complete, command ignored' },
    });
  });

  it('each connection negotiates on its own', async () => {
    const a = await negotiated(unixPath);
    const b = await connect(unixPath);
    await b.next();
    assert.equal((await a.cmd('query-status')).return.status, 'running');
    assert.equal((await b.cmd('query-status')).error.class, 'CommandNotFound');
  });
});

describe('request checking and error replies', () => {
  it('echoes the id on errors about the other members', async () => {
    const c = await negotiated();
    await c.send('{"execute":"query-status","id":{"a":[1]},"extra":2}\n');
    let r = await c.reply();
    assert.deepEqual(r, { id: { a: [1] }, error: { class: 'GenericError', desc: "QMP input member 'extra' is unexpected" } });
    r = await c.cmd('no-such-command', undefined, [1, 'x', null]);
    assert.deepEqual(r, { id: [1, 'x', null], error: { class: 'CommandNotFound', desc: 'The command no-such-command has not been found' } });
    await c.send('{"execute":"query-status","arguments":{"x":1},"id":2.5e3}\n');
    r = await c.reply();
    assert.equal(r.id, 2500);
    assert.equal(r.error.desc, "Parameter 'x' is unexpected");
    await c.send('{"execute":42,"id":"n"}\n');
    assert.deepEqual(await c.reply(), { id: 'n', error: { class: 'GenericError', desc: "QMP input member 'execute' must be a string" } });
    await c.send('{"execute":"stop","arguments":[],"id":"a"}\n');
    assert.deepEqual(await c.reply(), { id: 'a', error: { class: 'GenericError', desc: "QMP input member 'arguments' must be an object" } });
    await c.send('{"id":null}\n');
    assert.deepEqual(await c.reply(), { id: null, error: { class: 'GenericError', desc: "QMP input lacks member 'execute'" } });
  });

  it('answers success with the id and without it when none was sent', async () => {
    const c = await negotiated();
    const withId = await c.cmd('query-status', undefined, 'x');
    assert.equal(withId.id, 'x');
    const without = await c.cmd('query-status');
    assert.ok(!('id' in without));
    // exact line shape: one JSON object, CRLF
    const last = c.messages.at(-1)!;
    assert.ok(!last.line.includes('\n'));
  });

  it('answers non-object input without an id and keeps the connection', async () => {
    const c = await negotiated();
    for (const input of ['42', '"str"', '[1,2]', 'true', 'null']) {
      await c.send(input + '\n');
      assert.deepEqual(await c.reply(), { error: { class: 'GenericError', desc: 'QMP input must be a JSON object' } }, input);
    }
    await c.send('{}\n');
    assert.deepEqual(await c.reply(), { error: { class: 'GenericError', desc: "QMP input lacks member 'execute'" } });
    await c.send('{"foo":1}\n');
    assert.deepEqual(await c.reply(), { error: { class: 'GenericError', desc: "QMP input member 'foo' is unexpected" } });
    assert.equal((await c.cmd('query-status')).return.status, 'running');
  });

  it('answers malformed JSON with GenericError and keeps the connection', async () => {
    const c = await negotiated();
    await c.send('{"execute": }\n');
    let r = await c.reply();
    assert.equal(r.error.class, 'GenericError');
    assert.match(r.error.desc, /JSON parse error|Invalid JSON/);
    assert.ok(!('id' in r));
    assert.equal((await c.cmd('query-status', undefined, 1)).id, 1);

    await c.send(Buffer.from([0xff, 0x0a]));
    r = await c.reply();
    assert.equal(r.error.class, 'GenericError');
    assert.equal((await c.cmd('query-status', undefined, 2)).id, 2);

    // a stray closing brace after a valid object: the object runs, then an error
    await c.send('{"execute":"query-status","id":3}}\n');
    r = await c.reply();
    assert.equal(r.id, 3);
    assert.equal(r.return.status, 'running');
    r = await c.reply();
    assert.equal(r.error.class, 'GenericError');
    assert.equal((await c.cmd('query-status', undefined, 4)).id, 4);

    // single quotes are accepted on input
    await c.send("{'execute':'query-status','id':'sq'}\n");
    r = await c.reply();
    assert.equal(r.id, 'sq');
    assert.equal(r.return.status, 'running');
  });

  it('encodes non-ASCII as \\uXXXX', async () => {
    const c = await negotiated();
    await c.send('{"execute":"no-such","id":"a\u00e9\u20ac"}\n');
    await c.reply();
    const line = c.messages.at(-1)!.line;
    assert.ok(/^[\x20-\x7e]*$/.test(line), line);
    assert.equal(JSON.parse(line).id, 'a\u00e9\u20ac');
  });
});

describe('framing and ordering', () => {
  it('several objects on one line get replies in order', async () => {
    const c = await negotiated();
    const ids = Array.from({ length: 20 }, (_, i) => i);
    await c.send(ids.map((i) => JSON.stringify({ execute: i % 3 ? 'query-status' : 'nope', id: i })).join(''));
    const got: unknown[] = [];
    for (const _ of ids) got.push((await c.reply()).id);
    assert.deepEqual(got, ids);
  });

  it('an object split across writes gets one reply', async () => {
    const c = await negotiated(tcp);
    const text = '{"execute":"query-version","id":"split"}';
    for (const ch of text) {
      await c.send(ch);
      await sleep(2);
    }
    const r = await c.reply();
    assert.equal(r.id, 'split');
    await sleep(100);
    assert.equal(c.messages.filter((m) => !('event' in m.value)).length, 3, 'greeting, caps reply, one reply');
  });

  it('a slow command does not let a later reply overtake it', async () => {
    const c = await negotiated();
    await c.send(
      '{"execute":"x-query-memory-digest","id":"slow"}{"execute":"query-status","id":"fast"}{"execute":"query-version","id":"v"}',
    );
    assert.equal((await c.reply()).id, 'slow');
    assert.equal((await c.reply()).id, 'fast');
    assert.equal((await c.reply()).id, 'v');
  });
});

describe('events', () => {
  it('go to every negotiated client with a timestamp, and not to negotiating ones', async () => {
    const a = await negotiated(unixPath);
    const b = await negotiated(tcp);
    const pending = await connect(tcp);
    await pending.next(); // greeting only
    const t0 = Date.now() / 1000;
    assert.deepEqual((await a.cmd('stop')).return, {});
    await b.until(() => b.events.find((e) => e.event === 'STOP'), 5000, 'STOP on b');
    assert.deepEqual((await b.cmd('cont')).return, {});
    await a.until(() => a.events.find((e) => e.event === 'RESUME'), 5000, 'RESUME on a');
    await b.until(() => b.events.find((e) => e.event === 'RESUME'), 5000, 'RESUME on b');
    const t1 = Date.now() / 1000;
    for (const c of [a, b]) {
      const evs = c.events.filter((e) => e.event === 'STOP' || e.event === 'RESUME');
      assert.deepEqual(evs.map((e) => e.event), ['STOP', 'RESUME']);
      for (const e of evs) {
        assert.deepEqual(Object.keys(e).sort(), ['event', 'timestamp'], 'no data member for STOP/RESUME');
        const { seconds, microseconds } = e.timestamp;
        assert.ok(Number.isInteger(seconds) && Number.isInteger(microseconds));
        assert.ok(microseconds >= 0 && microseconds <= 999999);
        const t = seconds + microseconds / 1e6;
        assert.ok(t >= t0 - 1 && t <= t1 + 1, `timestamp ${t} within [${t0}, ${t1}]`);
      }
      const ts = evs.map((e) => e.timestamp.seconds * 1e6 + e.timestamp.microseconds);
      assert.ok(ts[0]! <= ts[1]!);
    }
    await sleep(100);
    assert.equal(pending.messages.length, 1, 'a negotiating client gets only the greeting');
    // and it gets no backlog after negotiating either
    await pending.cmd('qmp_capabilities');
    await sleep(100);
    assert.equal(pending.events.length, 0);
  });

  it('the event caused by a command comes before that command\'s reply', async () => {
    const c = await negotiated();
    await c.send('{"execute":"stop","id":"s"}\n');
    const first = await c.next();
    assert.equal(first.value.event, 'STOP');
    assert.equal((await c.next()).value.id, 's');
    await c.send('{"execute":"cont","id":"c"}\n');
    assert.equal((await c.next()).value.event, 'RESUME');
    assert.equal((await c.next()).value.id, 'c');
  });

  it('no event shares a write with the qmp_capabilities reply', async () => {
    // One client toggles the run state as fast as it can while others
    // negotiate. Client-side read boundaries do not show server writes (the
    // kernel may merge two writes into one read), so the server's write
    // syscalls are traced with strace when it is available.
    const tracer = await startTrace(vm.proc.pid!);
    const driver = await negotiated(unixPath);
    let stopFlood = false;
    const flood = (async () => {
      let n = 0;
      while (!stopFlood) {
        await driver.cmd(n++ % 2 ? 'cont' : 'stop');
      }
      await driver.cmd('cont');
    })();
    let sawEventRightAfter = 0;
    try {
      for (let i = 0; i < 20; i++) {
        const c = await connect(i % 2 ? tcp : unixPath);
        await c.next();
        await c.send(`{"execute":"qmp_capabilities","id":"neg${i}"}\n`);
        const m = await c.until(() => c.messages.find((x) => x.value.id === `neg${i}`), 5000, 'caps reply');
        assert.deepEqual(m.value, { return: {}, id: `neg${i}` });
        await sleep(20);
        // events before the caps reply never reach the client
        const idx = c.messages.indexOf(m);
        assert.ok(c.messages.slice(0, idx).every((x) => !('event' in x.value)), 'no event before the caps reply');
        if (c.messages.slice(idx + 1).some((x) => 'event' in x.value)) sawEventRightAfter++;
        c.close();
      }
    } finally {
      stopFlood = true;
      await flood;
    }
    assert.equal((await driver.cmd('query-status')).return.status, 'running');
    assert.ok(sawEventRightAfter > 0, 'the flood produced events right after negotiation');
    const writes = await tracer.stop();
    if (writes === undefined) return; // no strace here: the ordering checks above still ran
    const negWrites = writes.filter((w) => /\\"id\\": \\"neg\d+\\"/.test(w));
    assert.equal(negWrites.length, 20, `one traced write per caps reply (got ${negWrites.length})`);
    for (const w of negWrites) assert.ok(!w.includes('event'), `caps reply shares a write with an event: ${w}`);
  });
});

/** strace the VM's write syscalls (all threads); stop() returns the lines, or undefined without strace. */
async function startTrace(pid: number): Promise<{ stop(): Promise<string[] | undefined> }> {
  const none = { stop: async () => undefined };
  if (spawnSync('strace', ['-V']).status !== 0) return none;
  const out = join(tempDir('ferry-strace-'), 'trace');
  const p = spawn('strace', ['-f', '-qq', '-e', 'trace=write,writev', '-e', 'signal=none', '-s', '65536', '-o', out, '-p', String(pid)], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  let err = '';
  p.stderr!.on('data', (b: Buffer) => (err += b.toString()));
  const exited = new Promise<void>((r) => p.once('exit', () => r()));
  // attached once the first write of the VM shows up (the heartbeat timer writes nothing, so poke it)
  const probe = await negotiated(unixPath);
  try {
    await waitFor(async () => {
      if (p.exitCode !== null) return true;
      await probe.cmd('query-status', undefined, 'strace-probe');
      return existsSync(out) && readFileSync(out, 'utf8').includes('strace-probe');
    }, 5000, 'strace attach');
  } catch {
    /* fall through: treated as unavailable below */
  }
  probe.close();
  if (p.exitCode !== null || !existsSync(out) || !readFileSync(out, 'utf8').includes('strace-probe')) {
    p.kill('SIGKILL');
    await exited;
    return none; // e.g. ptrace not permitted
  }
  return {
    async stop() {
      p.kill('SIGINT'); // detaches from the tracee
      await exited;
      return readFileSync(out, 'utf8')
        .split('\n')
        .filter((l) => /\b(write|writev)\(/.test(l));
    },
  };
}

describe('introspection', () => {
  const schemaCommands = (QMP_SCHEMA as { name: string; 'meta-type': string }[])
    .filter((e) => e['meta-type'] === 'command')
    .map((e) => e.name)
    .sort();

  it('query-commands lists every schema command', async () => {
    const c = await negotiated();
    const r = await c.cmd('query-commands');
    assert.ok(Array.isArray(r.return));
    for (const e of r.return) assert.deepEqual(Object.keys(e), ['name']);
    const names = r.return.map((e: { name: string }) => e.name).sort();
    assert.deepEqual(names, schemaCommands);
    for (const n of ['qmp_capabilities', 'query-commands', 'query-qmp-schema', 'migrate', 'query-migrate', 'stop', 'cont', 'quit']) {
      assert.ok(names.includes(n), n);
    }
  });

  it('every listed command exists: none answers CommandNotFound', async () => {
    const c = await negotiated();
    const skip = new Set(['quit', 'stop', 'cont', 'migrate', 'migrate-incoming', 'xen-save-devices-state', 'qmp_capabilities', 'pmemsave']);
    for (const n of schemaCommands) {
      if (skip.has(n)) continue;
      // bogus argument: validated before running, so no side effects
      const r = await c.cmd(n, { 'ferry-bogus': 1 });
      assert.ok(r.error, n);
      assert.notEqual(r.error.class, 'CommandNotFound', `${n}: ${JSON.stringify(r)}`);
    }
  });

  it('query-qmp-schema has SchemaInfo shape', async () => {
    const c = await negotiated(tcp);
    const r = await c.cmd('query-qmp-schema');
    const list = r.return as Record<string, any>[];
    assert.ok(Array.isArray(list) && list.length > 50);
    const byName = new Map(list.map((e) => [e.name, e]));
    const metas = new Set(['builtin', 'enum', 'array', 'object', 'alternate', 'command', 'event']);
    for (const e of list) {
      assert.equal(typeof e.name, 'string');
      assert.ok(metas.has(e['meta-type']), `${e.name}: meta-type ${e['meta-type']}`);
      if (e['meta-type'] === 'command') {
        assert.ok(byName.has(e['arg-type']), `${e.name}: arg-type ${e['arg-type']} defined`);
        assert.ok(byName.has(e['ret-type']), `${e.name}: ret-type ${e['ret-type']} defined`);
      }
      if (e['meta-type'] === 'event') assert.ok(byName.has(e['arg-type']), `${e.name}: arg-type defined`);
      if (e['meta-type'] === 'object') {
        assert.ok(Array.isArray(e.members));
        for (const m of e.members) {
          assert.equal(typeof m.name, 'string');
          assert.ok(byName.has(m.type), `${e.name}.${m.name}: type ${m.type} defined`);
        }
      }
      if (e['meta-type'] === 'enum') assert.ok(Array.isArray(e.values) && e.values.every((v: unknown) => typeof v === 'string'));
      if (e['meta-type'] === 'array') assert.ok(byName.has(e['element-type']), `${e.name}: element-type defined`);
    }
    for (const ev of ['STOP', 'RESUME', 'MIGRATION', 'MIGRATION_PASS']) {
      assert.equal(byName.get(ev)?.['meta-type'], 'event', ev);
    }
    const caps = byName.get('MigrationCapability');
    assert.equal(caps?.['meta-type'], 'enum');
    assert.ok(caps.values.includes('xbzrle') && caps.values.includes('postcopy-ram'));
    assert.deepEqual(list, QMP_SCHEMA);
  });
});

describe('oversized input', () => {
  it('an 80 MiB unterminated string is refused with bounded memory; the connection still answers', async () => {
    const c = await negotiated();
    const pid = vm.proc.pid!;
    const rss0 = await rssOf(pid);
    let peak = rss0;
    const chunk = Buffer.alloc(1 << 20, 0x61); // 1 MiB of 'a'
    await c.send('{"execute":"');
    for (let i = 0; i < 80; i++) {
      await c.send(chunk);
      if (i % 8 === 7) peak = Math.max(peak, await rssOf(pid));
    }
    const err = await c.reply(20000);
    assert.deepEqual(err, { error: { class: 'GenericError', desc: 'JSON token size limit exceeded' } });
    // close the string and the object; then the connection must work as before
    await c.send('"}\n');
    const r = await c.cmd('query-status', undefined, 'after');
    assert.equal(r.id, 'after', JSON.stringify(r));
    assert.equal(r.return.status, 'running');
    peak = Math.max(peak, await rssOf(pid));
    const grow = peak - rss0;
    // the 64 MiB limit keeps at most ~64 MiB of token text (plus GC slack);
    // storing all 80 MiB (or copying it) would exceed this
    assert.ok(grow < 200 * 1024 * 1024, `RSS grew by ${(grow / 1048576).toFixed(0)} MiB`);
    // exactly one error for the whole oversized value, then the reply
    const replies = c.messages.filter((m) => !('event' in m.value) && !('QMP' in m.value));
    assert.equal(replies.length, 3, JSON.stringify(replies.map((m) => m.value)));
  });
});

describe('disconnects', () => {
  it('a client closing mid-command or mid-value does not disturb the others', async () => {
    const keep = await negotiated(tcp);
    for (let i = 0; i < 5; i++) {
      const c = await negotiated(unixPath);
      await c.send('{"execute":"x-query-memory-digest"}{"execute":"query-status"}{"execute":"qu');
      c.close();
    }
    assert.equal((await keep.cmd('query-status')).return.status, 'running');
    await waitFor(() => vm.exitCode === null, 1000, 'vm alive');
  });
});
