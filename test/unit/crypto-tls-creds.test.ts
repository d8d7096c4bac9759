/**
 * The TLS credential objects (src/crypto/tls-creds.ts): what QEMU checks
 * when it creates them, with QEMU's texts, on real files made by
 * test/helpers/tls-certs.ts; and real handshakes (node:tls over a unix
 * socket pair) with the options each kind produces.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, unlinkSync, writeFileSync } from 'node:fs';
import * as net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as tls from 'node:tls';
import { tlsServerSendsNoTickets } from '../../src/base/native.js';
import { createTlsCreds, TlsCredsError, type TlsCreds } from '../../src/crypto/tls-creds.js';
import { KEY_USAGE, PURPOSE, makeCa, pskDir, x509Dirs, type Ca } from '../helpers/tls-certs.js';

let root = '';
let ca: Ca;
before(async () => {
  root = mkdtempSync(join(tmpdir(), 'ferry-creds-'));
  ca = await makeCa();
});
after(() => rmSync(root, { recursive: true, force: true }));

const DAY = 86_400_000;
let n = 0;
const dirs = (opts: Parameters<typeof x509Dirs>[1] = {}) => x509Dirs(root, { ca, name: `set${n++}`, ...opts });

function refuses(f: () => unknown, message: string | RegExp): void {
  assert.throws(f, (e: unknown) => {
    assert.ok(e instanceof TlsCredsError, String(e));
    if (typeof message === 'string') assert.equal(e.message, message);
    else assert.match(e.message, message);
    return true;
  });
}

/** Handshake a client and a server with these credentials; resolves with what each side saw. */
async function handshake(c: TlsCreds, s: TlsCreds, servername?: string): Promise<{ client: string; server: string }> {
  const path = join(root, `hs${n++}.sock`);
  return new Promise((resolve) => {
    const out = { client: '', server: '' };
    let done = 0;
    const end = (who: 'client' | 'server', what: string): void => {
      if (out[who] !== '') return;
      out[who] = what;
      if (++done === 2) {
        srv.close();
        resolve(out);
      }
    };
    const srv = net.createServer((raw) => {
      const t = new tls.TLSSocket(raw, { ...s.serverOptions(), isServer: true });
      t.on('secure', () => t.write('hello'));
      t.on('error', (e: NodeJS.ErrnoException) => end('server', `error ${e.code}`));
      t.on('close', () => end('server', 'ok'));
    });
    srv.listen(path, () => {
      const t = tls.connect({ path, ...c.clientOptions(), ...(servername ? { servername } : {}), checkServerIdentity: () => undefined });
      t.on('data', () => {
        end('client', `ok ${t.getProtocol()}`);
        t.end();
      });
      t.on('error', (e: NodeJS.ErrnoException) => end('client', `error ${e.code}`));
      t.on('close', () => end('client', 'closed'));
    });
  });
}

describe('tls-creds-x509', () => {
  it('a good pair loads on both ends and handshakes, each verifying the other', async () => {
    const d = await dirs();
    const s = createTlsCreds('tls-creds-x509', 's', { dir: d.server, endpoint: 'server' });
    const c = createTlsCreds('tls-creds-x509', 'c', { dir: d.client, endpoint: 'client' });
    assert.equal(s.verifyPeer, true);
    assert.equal(c.endpoint, 'client');
    assert.deepEqual(await handshake(c, s, 'localhost'), { client: `ok ${tlsServerSendsNoTickets() ? 'TLSv1.3' : 'TLSv1.2'}`, server: 'ok' });
  });

  it('the server sends nothing after its TLS 1.3 handshake (no session tickets), as QEMU\'s does not', async () => {
    // A QEMU source without the return path never reads: bytes we send after
    // the handshake would lie unread in its socket, and its close would then
    // reset the connection before its last bytes reach us.
    const d = await dirs();
    const s = createTlsCreds('tls-creds-x509', 's', { dir: d.server, endpoint: 'server' });
    const c = createTlsCreds('tls-creds-x509', 'c', { dir: d.client, endpoint: 'client' });
    const path = join(root, `tk${n++}.sock`);
    const srv = net.createServer((raw) => {
      const t = new tls.TLSSocket(raw, { ...s.serverOptions(), isServer: true });
      t.on('error', () => undefined);
    });
    await new Promise<void>((r) => srv.listen(path, r));
    const seen = await new Promise<{ protocol: string | null; tickets: number }>((resolve, reject) => {
      let tickets = 0;
      const t = tls.connect({ path, ...c.clientOptions(), servername: 'localhost', checkServerIdentity: () => undefined });
      t.on('session', () => tickets++);
      t.on('error', reject);
      t.on('secureConnect', () => setTimeout(() => {
        resolve({ protocol: t.getProtocol(), tickets });
        t.destroy();
      }, 200));
    });
    srv.close();
    if (process.env.FERRY_NO_NATIVE === '1') {
      // without native/tls-config the server keeps to TLS 1.2, whose ticket comes inside the handshake
      assert.equal(seen.protocol, 'TLSv1.2');
    } else {
      assert.deepEqual(seen, { protocol: 'TLSv1.3', tickets: 0 });
    }
  });

  it('missing files, with QEMU\'s texts; the client certificate is optional', async () => {
    const d = await dirs();
    unlinkSync(join(d.server, 'server-key.pem'));
    refuses(() => createTlsCreds('tls-creds-x509', 's', { dir: d.server, endpoint: 'server' }), `Unable to access credentials ${join(d.server, 'server-key.pem')}: No such file or directory`);
    refuses(() => createTlsCreds('tls-creds-x509', 's', { dir: join(root, 'nowhere'), endpoint: 'client' }), `Unable to access credentials ${join(root, 'nowhere', 'ca-cert.pem')}: No such file or directory`);
    refuses(() => createTlsCreds('tls-creds-x509', 's', { endpoint: 'server' }), "Missing 'dir' property value");
    const noClient = await dirs({ client: null });
    const c = createTlsCreds('tls-creds-x509', 'c', { dir: noClient.client, endpoint: 'client' });
    assert.equal(c.clientOptions().cert, undefined);
  });

  it('an expired or not yet valid certificate is refused, naming the file; sanity-check=off lets it load', async () => {
    const old = await dirs({ server: { notBefore: new Date(Date.now() - 10 * DAY), notAfter: new Date(Date.now() - DAY) } });
    const file = join(old.server, 'server-cert.pem');
    refuses(() => createTlsCreds('tls-creds-x509', 's', { dir: old.server, endpoint: 'server' }), `The server certificate ${file} has expired`);
    createTlsCreds('tls-creds-x509', 's', { dir: old.server, endpoint: 'server', 'sanity-check': 'off' });
    const young = await dirs({ client: { notBefore: new Date(Date.now() + DAY) } });
    refuses(() => createTlsCreds('tls-creds-x509', 'c', { dir: young.client, endpoint: 'client' }), `The client certificate ${join(young.client, 'client-cert.pem')} is not yet active`);
    const oldCa = await makeCa('old CA', { notAfter: new Date(Date.now() - 1000) });
    const d = await dirs({ ca: oldCa });
    refuses(() => createTlsCreds('tls-creds-x509', 'c', { dir: d.client, endpoint: 'client' }), `The CA certificate ${join(d.client, 'ca-cert.pem')} has expired`);
  });

  it('a key that does not belong to the certificate', async () => {
    const d = await dirs({ server: { wrongKey: true } });
    refuses(
      () => createTlsCreds('tls-creds-x509', 's', { dir: d.server, endpoint: 'server' }),
      `Cannot load certificate '${join(d.server, 'server-cert.pem')}' & key '${join(d.server, 'server-key.pem')}': The certificate and the given key do not match.`,
    );
  });

  it('basic constraints: a leaf that is a CA, a CA that is not', async () => {
    const d = await dirs({ server: { isCa: true } });
    refuses(() => createTlsCreds('tls-creds-x509', 's', { dir: d.server, endpoint: 'server' }), `The certificate ${join(d.server, 'server-cert.pem')} basic constraints show a CA, but we need one for a server`);
    const notCa = await makeCa('not a CA', { isCa: false });
    const e = await dirs({ ca: notCa });
    refuses(() => createTlsCreds('tls-creds-x509', 'c', { dir: e.client, endpoint: 'client' }), `The certificate ${join(e.client, 'ca-cert.pem')} basic constraints do not show a CA`);
  });

  it('key usage and purpose for the endpoint', async () => {
    const d = await dirs({ server: { keyUsage: KEY_USAGE.keyEncipherment } });
    refuses(() => createTlsCreds('tls-creds-x509', 's', { dir: d.server, endpoint: 'server' }), `Certificate ${join(d.server, 'server-cert.pem')} usage does not permit digital signature`);
    // QEMU 7.2 asks for no key encipherment (an EC certificate has only digital signature)
    const ec = await dirs({ server: { keyUsage: KEY_USAGE.digitalSignature } });
    createTlsCreds('tls-creds-x509', 's', { dir: ec.server, endpoint: 'server' });
    const e = await dirs({ server: { purposes: [PURPOSE.CLIENT_AUTH] } });
    refuses(() => createTlsCreds('tls-creds-x509', 's', { dir: e.server, endpoint: 'server' }), `Certificate ${join(e.server, 'server-cert.pem')} purpose does not allow use with a TLS server`);
    const f = await dirs({ client: { purposes: [PURPOSE.SERVER_AUTH] } });
    refuses(() => createTlsCreds('tls-creds-x509', 'c', { dir: f.client, endpoint: 'client' }), `Certificate ${join(f.client, 'client-cert.pem')} purpose does not allow use with a TLS client`);
    // no extended key usage at all allows both
    const g = await dirs({ server: { purposes: null } });
    createTlsCreds('tls-creds-x509', 's', { dir: g.server, endpoint: 'server' });
  });

  it('our own certificate must come from our CA', async () => {
    const other = await makeCa('other CA');
    const d = await dirs({ serverTrusts: other });
    refuses(
      () => createTlsCreds('tls-creds-x509', 's', { dir: d.server, endpoint: 'server' }),
      `Our own certificate ${join(d.server, 'server-cert.pem')} failed validation against ${join(d.server, 'ca-cert.pem')}: The certificate hasn't got a known issuer`,
    );
  });

  it('a CA file that is not PEM, and a property QEMU does not know', async () => {
    const d = await dirs();
    writeFileSync(join(d.client, 'ca-cert.pem'), 'not a certificate\n');
    refuses(() => createTlsCreds('tls-creds-x509', 'c', { dir: d.client, endpoint: 'client' }), `Unable to import CA certificate list ${join(d.client, 'ca-cert.pem')}`);
    refuses(() => createTlsCreds('tls-creds-x509', 'c', { dir: d.client, endpoint: 'middle' }), "Parameter 'endpoint' does not accept value 'middle'");
    refuses(() => createTlsCreds('tls-creds-x509', 'c', { dir: d.client, colour: 'red' }), "Property 'tls-creds-x509.colour' not found");
    refuses(() => createTlsCreds('tls-creds-x509', 'c', { dir: d.client, 'verify-peer': 'maybe' }), "Parameter 'verify-peer' expects 'on' or 'off'");
  });

  it('a server that verifies refuses a client without a certificate; verify-peer=off lets it in', async () => {
    const d = await dirs({ client: null });
    const c = createTlsCreds('tls-creds-x509', 'c', { dir: d.client, endpoint: 'client' });
    const strict = createTlsCreds('tls-creds-x509', 's', { dir: d.server, endpoint: 'server' });
    const r = await handshake(c, strict, 'localhost');
    assert.match(r.server, /^error ERR_SSL_PEER_DID_NOT_RETURN_A_CERTIFICATE/);
    const lax = createTlsCreds('tls-creds-x509', 's', { dir: d.server, endpoint: 'server', 'verify-peer': false });
    assert.equal((await handshake(c, lax, 'localhost')).client, `ok ${tlsServerSendsNoTickets() ? 'TLSv1.3' : 'TLSv1.2'}`);
  });
});

describe('tls-creds-psk', () => {
  it('the same key handshakes; the client needs its username in keys.psk', async () => {
    const { dir, key } = pskDir(root, 'psk-a');
    const s = createTlsCreds('tls-creds-psk', 's', { dir, endpoint: 'server' });
    const c = createTlsCreds('tls-creds-psk', 'c', { dir, endpoint: 'client' });
    assert.equal(c.username, 'qemu');
    assert.equal((await handshake(c, s)).client, 'ok TLSv1.2');
    refuses(() => createTlsCreds('tls-creds-psk', 'c', { dir, endpoint: 'client', username: 'alice' }), `Username alice not found in PSK file ${join(dir, 'keys.psk')}`);
    refuses(() => createTlsCreds('tls-creds-psk', 's', { dir, endpoint: 'server', username: 'alice' }), 'username should not be set when endpoint=server');
    const other = pskDir(root, 'psk-b', [`qemu:${key.replace(/^../, 'ff')}`, 'alice:00ff']);
    const c2 = createTlsCreds('tls-creds-psk', 'c', { dir: other.dir, endpoint: 'client' });
    assert.match((await handshake(c2, s)).server, /^error /, 'a different key fails');
    const c3 = createTlsCreds('tls-creds-psk', 'c', { dir: other.dir, endpoint: 'client', username: 'alice' });
    assert.match((await handshake(c3, s)).server, /^error ERR_SSL_PSK_IDENTITY_NOT_FOUND/, 'alice is not in the server file');
  });

  it('a missing file, and a key that is not hexadecimal', () => {
    refuses(() => createTlsCreds('tls-creds-psk', 'c', { dir: join(root, 'none'), endpoint: 'client' }), `Unable to access credentials ${join(root, 'none', 'keys.psk')}: No such file or directory`);
    const { dir } = pskDir(root, 'psk-bad', ['qemu:xyz']);
    refuses(() => createTlsCreds('tls-creds-psk', 'c', { dir, endpoint: 'client' }), `The key of username qemu in PSK file ${join(dir, 'keys.psk')} is not hexadecimal`);
  });
});

describe('tls-creds-anon', () => {
  it('needs no files and handshakes with anonymous DH', async () => {
    const s = createTlsCreds('tls-creds-anon', 's', { endpoint: 'server' });
    const c = createTlsCreds('tls-creds-anon', 'c', {});
    assert.equal(c.verifyPeer, false);
    assert.equal((await handshake(c, s)).client, 'ok TLSv1.2');
  });
});
