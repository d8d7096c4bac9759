/**
 * Migration under TLS between two `ferry vm` processes (docs/tls.md):
 * x509, PSK and anonymous credentials from -object, on tcp:, unix:, exec:
 * and fd:, with the capabilities that work without TLS; a relay that
 * records the wire shows no guest page in the clear; each wrong set-up
 * fails both sides with its cause while the source runs on with its memory.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import * as net from 'node:net';
import { join } from 'node:path';
import { capabilities, runMigration, type MigrationSpec } from '../helpers/migration.js';
import { freePort, pmem } from '../helpers/qemu.js';
import { makeCa, pskDir, x509Dirs, type Ca } from '../helpers/tls-certs.js';
import { cleanupAll, shq, startVm, tempDir, waitFor, waitMigration } from '../helpers/vm.js';

// the silent-peer cases wait this long, not the default 10 s (inherited by the VMs)
process.env.FERRY_TLS_HANDSHAKE_TIMEOUT_MS = '1500';

after(cleanupAll);

let root = '';
let ca: Ca;
let good: { server: string; client: string };
before(async () => {
  root = tempDir('ferry-tls-');
  ca = await makeCa();
  good = await x509Dirs(root, { ca, name: 'good' });
});

const x509 = (dir: string, endpoint: 'server' | 'client', extra = '') => ['-object', `tls-creds-x509,id=tls0,dir=${dir},endpoint=${endpoint}${extra}`];
const GUEST = { mem: '32M', fill: 'text,seed=11' };

/** A TLS migration: x509 from `good` unless the spec says otherwise. */
function tlsSpec(spec: MigrationSpec & { srcCreds?: string[]; dstCreds?: string[]; hostname?: string }): MigrationSpec {
  const { srcCreds, dstCreds, hostname, ...rest } = spec;
  return {
    guest: GUEST,
    ...rest,
    source: { args: srcCreds ?? x509(good.client, 'client'), parameters: { 'max-bandwidth': 0, 'tls-creds': 'tls0', ...(hostname ? { 'tls-hostname': hostname } : {}) }, ...rest.source },
    destination: rest.destination === null ? null : { args: dstCreds ?? x509(good.server, 'server'), parameters: { 'tls-creds': 'tls0' }, ...rest.destination },
  };
}

/** A TCP relay that records what goes from the source to the destination. */
async function recordingRelay(to: number): Promise<{ port: number; bytes: () => Buffer; close: () => void }> {
  const chunks: Buffer[] = [];
  const socks: net.Socket[] = [];
  const srv = net.createServer((a) => {
    const b = net.connect(to, '127.0.0.1');
    socks.push(a, b);
    a.on('data', (d: Buffer) => chunks.push(Buffer.from(d)));
    a.pipe(b);
    b.pipe(a);
    a.on('error', () => b.destroy());
    b.on('error', () => a.destroy());
  });
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  return {
    port: (srv.address() as net.AddressInfo).port,
    bytes: () => Buffer.concat(chunks),
    close: () => {
      srv.close();
      for (const s of socks) s.destroy();
    },
  };
}

/** 64-byte samples of the guest's RAM (text fill: every page differs). */
function samples(ram: Buffer): Buffer[] {
  const out: Buffer[] = [];
  for (let page = 5; page < ram.length / 4096; page += 997) out.push(ram.subarray(page * 4096 + 128, page * 4096 + 192));
  return out;
}

async function wireCheck(tls: boolean): Promise<{ raw: Buffer; sample: Buffer[] }> {
  const dport = await freePort();
  const relay = await recordingRelay(dport);
  let sample: Buffer[] = [];
  try {
    await runMigration(
      tlsSpec({
        transport: { uri: `tcp:127.0.0.1:${relay.port}`, incoming: `tcp:127.0.0.1:${dport}` },
        capabilities: ['return-path'],
        ...(tls ? {} : { srcCreds: [], dstCreds: [], source: { parameters: { 'max-bandwidth': 0 } }, destination: { parameters: {} } }),
        before: async ({ src, dir }) => void (sample = samples(await pmem(src, dir, 32 << 20))),
      }),
    );
  } finally {
    relay.close();
  }
  return { raw: relay.bytes(), sample };
}

describe('migration under TLS', { timeout: 300000 }, () => {
  it('x509 over tcp: the guest arrives whole, and none of it crosses the wire in the clear', async () => {
    const { raw, sample } = await wireCheck(true);
    assert.ok(raw.length > 16 << 20, `the relay saw the stream (${raw.length} bytes)`);
    assert.equal(raw[0], 0x16, 'a TLS handshake record first');
    assert.equal(raw.indexOf(Buffer.from('QEVM')), -1, 'no stream header in the clear');
    for (const s of sample) assert.equal(raw.indexOf(s), -1, 'a guest sample in the clear');
  });

  it('the same relay sees the guest without TLS (the check above can fail)', async () => {
    const { raw, sample } = await wireCheck(false);
    assert.equal(raw.indexOf(Buffer.from('QEVM')), 0);
    for (const s of sample) assert.notEqual(raw.indexOf(s), -1);
  });

  it('x509 over unix: without tls-hostname "No hostname for certificate validation", with it a migration', async () => {
    await runMigration(
      tlsSpec({
        transport: 'unix',
        expect: { source: 'failed', destination: 'failed', sourceRunState: 'running', destinationRunState: 'inmigrate' },
        after: async ({ src, info }) => {
          assert.equal(info['error-desc'], 'No hostname for certificate validation');
          assert.equal(await src.status(), 'running');
        },
      }),
    );
    await runMigration(tlsSpec({ transport: 'unix', hostname: 'localhost', capabilities: ['events', 'return-path'], expect: { events: { source: ['setup', 'active', 'completed'] } } }));
  });

  it('x509 over exec: (socat to a unix listener) and over fd:', async () => {
    await runMigration(
      tlsSpec({
        hostname: 'localhost',
        transport: (dir) => ({ uri: `exec:socat STDIO UNIX-CONNECT:${shq(join(dir, 'tls.sock'))}`, incoming: `unix:${join(dir, 'tls.sock')}` }),
        capabilities: ['return-path'],
      }),
    );
    // -incoming defer: the destination's tls-creds are set before it takes the fd (as with QEMU)
    await runMigration(tlsSpec({ hostname: 'localhost', transport: 'fd', capabilities: ['return-path'], destination: { defer: true } }));
  });

  it('PSK and anonymous credentials over tcp', async () => {
    const { dir } = pskDir(root, 'psk');
    await runMigration(
      tlsSpec({
        transport: 'tcp',
        srcCreds: ['-object', `tls-creds-psk,id=tls0,dir=${dir},endpoint=client`],
        dstCreds: ['-object', `tls-creds-psk,id=tls0,dir=${dir},endpoint=server`],
        capabilities: ['return-path'],
      }),
    );
    await runMigration(
      tlsSpec({
        transport: 'tcp',
        srcCreds: ['-object', 'tls-creds-anon,id=tls0,endpoint=client'],
        dstCreds: ['-object', 'tls-creds-anon,id=tls0,endpoint=server'],
      }),
    );
  });

  // what works without TLS works with it: the convergence tools, postcopy and its page requests
  const combos: { caps: string[]; params?: Record<string, unknown>; postcopy?: boolean }[] = [
    { caps: ['xbzrle', 'compress', 'auto-converge'], params: { 'max-bandwidth': 24 << 20, 'cpu-throttle-initial': 30 } },
    { caps: ['xbzrle', 'events', 'return-path'], params: { 'max-bandwidth': 32 << 20 } },
    // the destination stays paused (-S), so its RAM is compared with the frozen source (release-ram would empty the source)
    { caps: ['postcopy-ram', 'events'], postcopy: true, params: { 'max-bandwidth': 16 << 20 } },
  ];
  for (const c of combos) {
    it(`x509 with [${c.caps.join(', ')}] gives an identical guest`, async () => {
      await runMigration(
        tlsSpec({
          transport: 'tcp',
          guest: { ...GUEST, smp: 1, workload: 'stress,rate=4M,wss=8M,write=8,seed=3' },
          capabilities: c.caps,
          source: { parameters: { 'tls-creds': 'tls0', ...c.params } },
          during: c.postcopy
            ? async ({ src }) => {
                await waitFor(async () => (await src.execute<Record<string, any>>('query-migrate')).status === 'active', 10000, 'active');
                await src.execute('migrate-start-postcopy');
              }
            : undefined,
          after: c.postcopy
            ? async ({ events }) => assert.ok(events.source.includes('postcopy-active'), `postcopy ran: ${events.source.join(' ')}`)
            : undefined,
          timeoutMs: 90000,
        }),
      );
    });
  }
});

/** A migration that must fail on both sides, the source running on with its memory. */
async function fails(spec: Parameters<typeof tlsSpec>[0], want: { source: string | RegExp; destination?: string | RegExp }): Promise<void> {
  let before = '';
  await runMigration(
    tlsSpec({
      transport: 'tcp',
      ...spec,
      before: async ({ src }) => void (before = await src.digest()),
      expect: { source: 'failed', destination: want.destination === undefined ? null : 'failed', sourceRunState: 'running', destinationRunState: want.destination === undefined ? null : 'inmigrate' },
      after: async (ctx) => {
        const { src, info, dinfo } = ctx;
        const match = (got: unknown, w: string | RegExp, what: string) =>
          typeof w === 'string' ? assert.equal(got, w, what) : assert.match(String(got), w, what);
        match(info['error-desc'], want.source, 'source error-desc');
        if (want.destination !== undefined) match(dinfo!['error-desc'], want.destination, 'destination error-desc');
        // the source stopped its vCPUs at no point: the digest moves on only through the workload (none here)
        assert.equal(await src.digest(), before, 'the source memory is intact');
        if (want.destination !== undefined) assert.equal(await ctx.d.status(), 'inmigrate');
      },
    }),
  );
}

describe('TLS failures end failed on both sides, with the cause', { timeout: 300000 }, () => {
  it('a server signed by a CA the client does not trust', async () => {
    const other = await makeCa('another CA');
    // the client's own certificate comes from the CA it trusts (else it is refused at creation)
    const d = await x509Dirs(root, { ca, clientTrusts: other, clientCa: other, name: 'other-ca' });
    await fails({ srcCreds: x509(d.client, 'client'), dstCreds: x509(d.server, 'server') }, {
      source: "The certificate hasn't got a known issuer",
      destination: /^TLS handshake failed: /,
    });
  });

  it('a server certificate that has expired (loaded with sanity-check=off)', async () => {
    const d = await x509Dirs(root, { ca, name: 'expired', server: { notBefore: new Date(Date.now() - 10 * 86400e3), notAfter: new Date(Date.now() - 86400e3) } });
    await fails({ srcCreds: x509(d.client, 'client'), dstCreds: x509(d.server, 'server', ',sanity-check=off') }, {
      source: 'The certificate has expired',
      destination: /^TLS handshake failed: /,
    });
  });

  it('a hostname the certificate does not name', async () => {
    await fails({ hostname: 'wrong.example' }, { source: 'Certificate does not match the hostname wrong.example', destination: /^TLS handshake failed: / });
  });

  it('no client certificate, and the server verifies its peer', async () => {
    const d = await x509Dirs(root, { ca, name: 'no-client', client: null });
    // TLS 1.3: the server's verdict comes after the client finished; the
    // source reads its alert, or finds the connection closed while it writes
    await fails({ srcCreds: x509(d.client, 'client'), dstCreds: x509(d.server, 'server'), capabilities: ['return-path'] }, {
      source: /^TLS handshake failed: the peer requires a client certificate|^Cannot write to TLS channel: the peer closed the connection/,
      destination: /^TLS handshake failed: No certificate peers/,
    });
  });

  it('PSK: a different key, and an unknown username', async () => {
    const a = pskDir(root, 'psk-a');
    const b = pskDir(root, 'psk-b', [`alice:${a.key}`, `qemu:${'00'.repeat(32)}`]);
    await fails(
      { srcCreds: ['-object', `tls-creds-psk,id=tls0,dir=${b.dir},endpoint=client`], dstCreds: ['-object', `tls-creds-psk,id=tls0,dir=${a.dir},endpoint=server`] },
      { source: /^TLS handshake failed: the keys do not match/, destination: /^TLS handshake failed: the keys do not match/ },
    );
    await fails(
      { srcCreds: ['-object', `tls-creds-psk,id=tls0,dir=${b.dir},endpoint=client,username=alice`], dstCreds: ['-object', `tls-creds-psk,id=tls0,dir=${a.dir},endpoint=server`] },
      { source: "TLS handshake failed: the peer does not know PSK username 'alice'", destination: 'TLS handshake failed: the PSK username of the peer is not in keys.psk' },
    );
  });

  it('a TLS source facing a plain destination, and the other way round', async () => {
    await fails({ destination: { args: [], parameters: {} } }, {
      source: /^TLS handshake failed: the peer closed the connection/,
      destination: 'load of migration failed: Not a migration stream: the peer starts a TLS handshake (set tls-creds here too)',
    });
    await fails({ srcCreds: [], source: { parameters: { 'max-bandwidth': 0 } }, capabilities: ['return-path'] }, {
      source: /./,
      destination: /^TLS handshake failed: the peer does not speak TLS/,
    });
  });

  it('a silent peer: the handshake gives up after its limit', async () => {
    const conns: net.Socket[] = [];
    const silent = net.createServer((c) => conns.push(c));
    await new Promise<void>((r) => silent.listen(0, '127.0.0.1', r));
    const port = (silent.address() as net.AddressInfo).port;
    try {
      await fails({ destination: null, transport: { uri: `tcp:127.0.0.1:${port}` } }, {
        source: 'TLS handshake failed: no answer from the peer within 1.5 s (is it set up for TLS?)',
      });
    } finally {
      silent.close();
      for (const c of conns) c.destroy();
    }
  });

  it('unknown credentials fail the migration, not the command; object-del refuses credentials in use', async () => {
    const vm = await startVm({ args: ['-m', '16M', ...x509(good.client, 'client')] });
    await vm.execute('migrate-set-parameters', { 'tls-creds': 'nope' });
    const port = await freePort();
    const listener = net.createServer((c) => c.destroy());
    await new Promise<void>((r) => listener.listen(port, '127.0.0.1', r));
    try {
      await vm.execute('migrate', { uri: `tcp:127.0.0.1:${port}` });
      const info = await waitMigration(vm, ['failed', 'completed'], 10000);
      assert.equal(info['error-desc'], "No TLS credentials with id 'nope'");
      // a migration that hangs in its handshake holds the credentials
      const silent = net.createServer(() => undefined);
      await new Promise<void>((r) => silent.listen(0, '127.0.0.1', r));
      await vm.execute('migrate-set-parameters', { 'tls-creds': 'tls0' });
      await vm.execute('migrate', { uri: `tcp:127.0.0.1:${(silent.address() as net.AddressInfo).port}` });
      await assert.rejects(vm.execute('object-del', { id: 'tls0' }), { message: "GenericError: object 'tls0' is in use, can not be deleted" });
      await vm.execute('migrate_cancel');
      await waitMigration(vm, ['cancelled', 'failed'], 10000);
      silent.close();
      await vm.execute('object-del', { id: 'tls0' });
      await vm.execute(...(['migrate-set-capabilities', capabilities([])] as const));
    } finally {
      listener.close();
      await vm.quit();
    }
  });
});
