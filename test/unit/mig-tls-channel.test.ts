/**
 * The TLS channel wrapper (src/migration/channel/tls.ts) on an in-process
 * pair, with PSK and anonymous credentials made here (the x509 files and
 * their checks are covered by crypto-tls-creds and the integration tests):
 * a migration under TLS gives the same guest and no guest byte in the
 * clear; a wrong key, an unknown username, a plain side facing a TLS side
 * and a silent peer each fail both sides with a cause, and the source runs
 * on with its memory.
 */
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import * as net from 'node:net';
import { join } from 'node:path';
import type { TlsCreds } from '../../src/crypto/tls-creds.js';
import { WrappedChannel, type ChannelWrapper } from '../../src/migration/channel/index.js';
import { chainWrappers, resolveTlsCreds } from '../../src/migration/channel/tls.js';
import type { TlsDeps } from '../../src/migration/index.js';
import { Pair } from '../helpers/pair.js';
import { PassThrough } from 'node:stream';

const pairs: Pair[] = [];
after(async () => {
  for (const p of pairs) await p.close();
});

const PSK_CIPHERS = 'PSK-AES256-GCM-SHA384:PSK-AES128-GCM-SHA256';

function psk(id: string, endpoint: 'client' | 'server', keys: Record<string, string>, username = 'qemu'): TlsCreds {
  const key = (name: string) => (keys[name] === undefined ? null : Buffer.from(keys[name]!, 'hex'));
  return {
    qomType: 'tls-creds-psk',
    id,
    endpoint,
    verifyPeer: true,
    username,
    clientOptions: () => ({ maxVersion: 'TLSv1.2', ciphers: PSK_CIPHERS, pskCallback: () => ({ identity: username, psk: key(username)! }) }),
    serverOptions: () => ({ maxVersion: 'TLSv1.2', ciphers: PSK_CIPHERS, pskCallback: (_s: unknown, identity: string) => key(identity) }) as never,
  };
}

function anon(id: string, endpoint: 'client' | 'server'): TlsCreds {
  const o = { maxVersion: 'TLSv1.2' as const, ciphers: 'ADH-AES256-GCM-SHA384:@SECLEVEL=0', rejectUnauthorized: false };
  return { qomType: 'tls-creds-anon', id, endpoint, verifyPeer: false, clientOptions: () => o, serverOptions: () => ({ ...o, dhparam: 'auto' }) as never };
}

const KEY = '00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff';
const OTHER = 'ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100';

/** Credentials by id: the source names tls-src (client), the destination tls-dst (server). */
function lookup(src: TlsCreds | undefined, dst: TlsCreds | undefined, handshakeTimeoutMs?: number): TlsDeps {
  return {
    lookup: (id) => (id === 'tls-src' ? src : id === 'tls-dst' ? dst : id === 'mem0' ? 'other' : undefined),
    handshakeTimeoutMs,
  };
}

/** Records the raw bytes the destination reads (below TLS). */
function recorder(into: Buffer[]): ChannelWrapper {
  return (inner) => {
    const tap = new PassThrough();
    inner.input.on('data', (b: Buffer) => into.push(Buffer.from(b)));
    inner.input.pipe(tap);
    // the socket is both input and output: keep writing to it, read from the tap
    return new WrappedChannel(inner, { input: tap, output: inner.output, label: 'recorder' });
  };
}

const guest = { ramSize: 4 << 20, smp: 1, fill: { kind: 'text' as const, seed: 9 }, workload: { kind: 'idle' as const } };

async function pair(opts: {
  src?: TlsCreds;
  dst?: TlsCreds;
  srcId?: string;
  dstId?: string;
  wire?: Buffer[];
  timeoutMs?: number;
  caps?: ('return-path' | 'postcopy-ram' | 'xbzrle')[];
}): Promise<{ p: Pair; before: string }> {
  const p = await Pair.create({
    guest,
    paused: true,
    caps: opts.caps,
    params: { 'tls-creds': opts.srcId ?? (opts.src ? 'tls-src' : '') },
    destinationParams: { 'tls-creds': opts.dstId ?? (opts.dst ? 'tls-dst' : '') },
    tls: lookup(opts.src, opts.dst, opts.timeoutMs),
    wrapDestination: opts.wire ? recorder(opts.wire) : undefined,
  });
  pairs.push(p);
  const before = (await p.src.machine.digest()).digest;
  return { p, before };
}

/** A text fill puts runs of this form in every page: a sample of guest RAM to look for on the wire. */
async function guestSample(p: Pair): Promise<Buffer[]> {
  const ram = p.src.machine.ram[0]!.bytes;
  const out: Buffer[] = [];
  for (const at of [4096 * 3 + 100, 4096 * 200 + 7, 4096 * 700 + 1000]) out.push(Buffer.from(ram.subarray(at, at + 48)));
  return out;
}

function assertFailedSafely(p: Pair, before: string, after: string): void {
  assert.equal(p.src.source.status, 'failed', JSON.stringify(p.src.source.info()));
  assert.equal(p.src.machine.runState, 'running', 'the source runs on');
  assert.equal(after, before, 'with its memory');
  assert.equal(p.dst!.destination.status, 'failed', JSON.stringify(p.dst!.destination.info()));
  assert.equal(p.dst!.machine.runState, 'inmigrate', 'the destination never runs');
}

describe('TLS around the migration channel', () => {
  it('PSK: the guest arrives whole, and no page of it crosses the wire in the clear', async () => {
    const wire: Buffer[] = [];
    const { p } = await pair({ src: psk('tls-src', 'client', { qemu: KEY }), dst: psk('tls-dst', 'server', { qemu: KEY }), wire, caps: ['return-path'] });
    const sample = await guestSample(p);
    await p.migrate();
    assert.equal(p.src.source.status, 'completed', JSON.stringify(p.src.source.info()));
    assert.equal(p.dst!.destination.status, 'completed');
    assert.equal((await p.dst!.machine.digest()).digest, (await p.src.machine.digest()).digest);
    const raw = Buffer.concat(wire);
    assert.ok(raw.length > guest.ramSize / 2, `the recorder saw the stream (${raw.length} bytes)`);
    assert.equal(raw[0], 0x16, 'the first byte is a TLS handshake record');
    for (const s of sample) assert.equal(raw.indexOf(s), -1, 'a guest sample is on the wire in the clear');
  });

  it('the recorder would see the guest without TLS (the check above can fail)', async () => {
    const wire: Buffer[] = [];
    const { p } = await pair({ wire });
    const sample = await guestSample(p);
    await p.migrate();
    assert.equal(p.src.source.status, 'completed');
    const raw = Buffer.concat(wire);
    for (const s of sample) assert.notEqual(raw.indexOf(s), -1);
  });

  it('anonymous credentials migrate too', async () => {
    const { p } = await pair({ src: anon('tls-src', 'client'), dst: anon('tls-dst', 'server') });
    await p.migrate();
    assert.equal(p.src.source.status, 'completed', JSON.stringify(p.src.source.info()));
    assert.equal((await p.dst!.machine.digest()).digest, (await p.src.machine.digest()).digest);
    assert.match(p.src.source.current!.channel!.describe(), /^tls \(TLSv1\.2, ADH-AES256-GCM-SHA384\) over /);
  });

  it('a different pre-shared key fails both sides, and the source runs on', async () => {
    const { p, before } = await pair({ src: psk('tls-src', 'client', { qemu: KEY }), dst: psk('tls-dst', 'server', { qemu: OTHER }) });
    await p.migrate();
    assertFailedSafely(p, before, (await p.src.machine.digest()).digest);
    assert.match(p.src.source.info()['error-desc']!, /^TLS handshake failed: /);
    assert.match(p.dst!.destination.info()['error-desc']!, /^TLS handshake failed: the keys do not match/);
  });

  it('an unknown PSK username fails both sides with it', async () => {
    const { p, before } = await pair({ src: psk('tls-src', 'client', { alice: KEY }, 'alice'), dst: psk('tls-dst', 'server', { qemu: KEY }) });
    await p.migrate();
    assertFailedSafely(p, before, (await p.src.machine.digest()).digest);
    assert.equal(p.src.source.info()['error-desc'], "TLS handshake failed: the peer does not know PSK username 'alice'");
    assert.equal(p.dst!.destination.info()['error-desc'], 'TLS handshake failed: the PSK username of the peer is not in keys.psk');
  });

  it('a TLS source facing a plain destination: both fail, the destination names the cause', async () => {
    const { p, before } = await pair({ src: psk('tls-src', 'client', { qemu: KEY }) });
    await p.migrate();
    assertFailedSafely(p, before, (await p.src.machine.digest()).digest);
    assert.equal(p.dst!.destination.info()['error-desc'], 'load of migration failed: Not a migration stream: the peer starts a TLS handshake (set tls-creds here too)');
    assert.match(p.src.source.info()['error-desc']!, /^TLS handshake failed: the peer closed the connection/);
  });

  it('a plain source facing a TLS destination: both fail, the destination names the cause', async () => {
    const { p, before } = await pair({ dst: psk('tls-dst', 'server', { qemu: KEY }), timeoutMs: 3000 });
    await p.migrate();
    assertFailedSafely(p, before, (await p.src.machine.digest()).digest);
    assert.match(p.dst!.destination.info()['error-desc']!, /^TLS handshake failed: the peer does not speak TLS/);
  });

  it('credentials looked up at connect time, with QEMU\'s texts', async () => {
    for (const [srcId, want] of [
      ['nope', "No TLS credentials with id 'nope'"],
      ['mem0', "Object with id 'mem0' is not TLS credentials"],
      ['tls-dst', 'Expected TLS credentials for a client endpoint'],
    ] as const) {
      const { p, before } = await pair({ src: psk('tls-src', 'client', { qemu: KEY }), dst: psk('tls-dst', 'server', { qemu: KEY }), srcId });
      await p.migrate();
      assert.equal(p.src.source.info()['error-desc'], want);
      assert.equal(p.src.machine.runState, 'running');
      assert.equal((await p.src.machine.digest()).digest, before);
    }
    assert.throws(() => resolveTlsCreds(lookup(undefined, psk('tls-dst', 'client', {})).lookup, 'tls-dst', 'server'), {
      message: 'Expected TLS credentials for a server endpoint',
    });
  });

  it('a silent peer: the handshake gives up after its time limit', async () => {
    // the "destination" accepts and says nothing
    const p = await Pair.create({
      guest,
      params: { 'tls-creds': 'tls-src' },
      tls: lookup(psk('tls-src', 'client', { qemu: KEY }), undefined, 300),
      noDestination: true,
      uri: (dir) => `unix:${join(dir, 'silent.sock')}`,
    });
    pairs.push(p);
    const conns: net.Socket[] = [];
    const srv = net.createServer((c) => conns.push(c));
    await new Promise<void>((r) => srv.listen(p.uri.slice(5), r));
    const t0 = Date.now();
    await p.migrate();
    const took = Date.now() - t0;
    srv.close();
    for (const c of conns) c.destroy();
    assert.equal(p.src.source.status, 'failed');
    assert.equal(p.src.source.info()['error-desc'], 'TLS handshake failed: no answer from the peer within 0.3 s (is it set up for TLS?)');
    assert.ok(took >= 300 && took < 5000, `took ${took} ms`);
    assert.equal(p.src.machine.runState, 'running');
  });

  it('migrate_cancel during a handshake ends cancelled at once', async () => {
    const p = await Pair.create({
      guest,
      params: { 'tls-creds': 'tls-src' },
      tls: lookup(psk('tls-src', 'client', { qemu: KEY }), undefined, 60_000),
      noDestination: true,
      uri: (dir) => `unix:${join(dir, 'silent2.sock')}`,
    });
    pairs.push(p);
    const conns: net.Socket[] = [];
    const srv = net.createServer((c) => {
      conns.push(c);
      p.src.source.cancel();
    });
    await new Promise<void>((r) => srv.listen(p.uri.slice(5), r));
    const t0 = Date.now();
    await p.migrate();
    srv.close();
    for (const c of conns) c.destroy();
    assert.equal(p.src.source.status, 'cancelled');
    assert.ok(Date.now() - t0 < 5000);
    assert.equal(p.src.machine.runState, 'running');
  });

  it('chainWrappers applies the inner wrapper first, and closes it when the outer one fails', async () => {
    const order: string[] = [];
    let closed = false;
    const fakeInner = { close: () => (closed = true) } as never;
    const a: ChannelWrapper = (ch) => (order.push('a'), ch);
    const b: ChannelWrapper = () => {
      order.push('b');
      throw new Error('no');
    };
    await assert.rejects(async () => chainWrappers(a, b)!(fakeInner, 'outgoing'), /no/);
    assert.deepEqual(order, ['a', 'b']);
    assert.ok(closed);
    assert.equal(chainWrappers(undefined, b), b);
    assert.equal(chainWrappers(a, undefined), a);
  });
});
