/**
 * TLS in a worker thread (src/migration/channel/tls-offload.ts): with real
 * credential objects over a unix socket the session runs in a worker, the
 * stream and the return path go through it, nothing crosses in the clear,
 * a handshake failure keeps its text; FERRY_TLS_WORKER=0 and a channel that
 * is not a plain socket keep node:tls on the main thread.
 */
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { PassThrough } from 'node:stream';
import { createTlsCreds, type TlsCreds } from '../../src/crypto/tls-creds.js';
import { WrappedChannel, type ChannelWrapper } from '../../src/migration/channel/index.js';
import { tlsWorkerSessions } from '../../src/migration/channel/tls-offload.js';
import { Pair } from '../helpers/pair.js';

const pairs: Pair[] = [];
const dirs: string[] = [];
after(async () => {
  for (const p of pairs) await p.close();
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

const KEY = '00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff';
const OTHER = 'ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100';

/** Real tls-creds-psk objects (their options carry a pskCallback, rebuilt in the worker from creds.psk). */
function pskCreds(endpoint: 'client' | 'server', key: string): TlsCreds {
  const dir = mkdtempSync(join(tmpdir(), 'ferry-tlsw-'));
  dirs.push(dir);
  writeFileSync(join(dir, 'keys.psk'), `qemu:${key}\n`);
  return createTlsCreds('tls-creds-psk', `tls-${endpoint}`, { endpoint, dir });
}

/** Records the raw bytes the destination reads; its channel is then no plain socket (node:tls runs on the main thread there). */
function recorder(into: Buffer[]): ChannelWrapper {
  return (inner) => {
    const tap = new PassThrough();
    inner.input.on('data', (b: Buffer) => into.push(Buffer.from(b)));
    inner.input.pipe(tap);
    return new WrappedChannel(inner, { input: tap, output: inner.output, label: 'recorder' });
  };
}

const guest = { ramSize: 4 << 20, smp: 1, fill: { kind: 'text' as const, seed: 9 }, workload: { kind: 'idle' as const } };

async function pair(src: TlsCreds, dst: TlsCreds, wire?: Buffer[]): Promise<Pair> {
  const p = await Pair.create({
    guest,
    paused: true,
    caps: ['return-path'],
    params: { 'tls-creds': 'tls-src' },
    destinationParams: { 'tls-creds': 'tls-dst' },
    tls: { lookup: (id) => (id === 'tls-src' ? src : id === 'tls-dst' ? dst : undefined) },
    wrapDestination: wire ? recorder(wire) : undefined,
  });
  pairs.push(p);
  return p;
}

describe('TLS in a worker thread', () => {
  it('both ends in workers: the guest arrives whole over the stream and the return path', async () => {
    const p = await pair(pskCreds('client', KEY), pskCreds('server', KEY));
    const before = tlsWorkerSessions();
    await p.migrate();
    assert.equal(p.src.source.status, 'completed', JSON.stringify(p.src.source.info()));
    assert.equal(p.dst!.destination.status, 'completed');
    assert.equal((await p.dst!.machine.digest()).digest, (await p.src.machine.digest()).digest);
    assert.equal(tlsWorkerSessions() - before, 2, 'a worker on each side');
    assert.match(p.src.source.current!.channel!.describe(), /^tls \(TLSv1\.2, [A-Z0-9-]*PSK[A-Z0-9-]*\) over unix:/);
  });

  it('what a worker sends carries no page of the guest in the clear', async () => {
    const wire: Buffer[] = [];
    const p = await pair(pskCreds('client', KEY), pskCreds('server', KEY), wire);
    const ram = p.src.machine.ram[0]!.bytes;
    const sample = [4096 * 3 + 100, 4096 * 200 + 7, 4096 * 700 + 1000].map((at) => Buffer.from(ram.subarray(at, at + 48)));
    const before = tlsWorkerSessions();
    await p.migrate();
    assert.equal(p.src.source.status, 'completed', JSON.stringify(p.src.source.info()));
    assert.equal((await p.dst!.machine.digest()).digest, (await p.src.machine.digest()).digest);
    assert.equal(tlsWorkerSessions() - before, 1, 'the source in a worker; the recorded destination on its main thread');
    const raw = Buffer.concat(wire);
    assert.ok(raw.length > guest.ramSize / 2, `the recorder saw the stream (${raw.length} bytes)`);
    assert.equal(raw[0], 0x16, 'the first byte is a TLS handshake record');
    for (const s of sample) assert.equal(raw.indexOf(s), -1, 'a guest sample is on the wire in the clear');
  });

  it('a handshake failure in a worker keeps its text on both sides, and the source runs on', async () => {
    const p = await pair(pskCreds('client', KEY), pskCreds('server', OTHER));
    const digest = (await p.src.machine.digest()).digest;
    const before = tlsWorkerSessions();
    await p.migrate();
    assert.equal(tlsWorkerSessions() - before, 2);
    assert.equal(p.src.source.status, 'failed');
    assert.equal(p.dst!.destination.status, 'failed');
    assert.match(p.src.source.info()['error-desc']!, /^TLS handshake failed: /);
    assert.match(p.dst!.destination.info()['error-desc']!, /^TLS handshake failed: the keys do not match/);
    assert.equal(p.src.machine.runState, 'running');
    assert.equal((await p.src.machine.digest()).digest, digest);
    assert.equal(p.dst!.machine.runState, 'inmigrate');
  });

  it('FERRY_TLS_WORKER=0 keeps node:tls on the main thread', async () => {
    const p = await pair(pskCreds('client', KEY), pskCreds('server', KEY));
    const before = tlsWorkerSessions();
    process.env.FERRY_TLS_WORKER = '0';
    try {
      await p.migrate();
    } finally {
      delete process.env.FERRY_TLS_WORKER;
    }
    assert.equal(p.src.source.status, 'completed', JSON.stringify(p.src.source.info()));
    assert.equal((await p.dst!.machine.digest()).digest, (await p.src.machine.digest()).digest);
    assert.equal(tlsWorkerSessions() - before, 0);
  });
});
