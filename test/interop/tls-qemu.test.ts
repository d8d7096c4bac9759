/**
 * TLS between Ferry and QEMU 7.2 (GnuTLS on QEMU's side, OpenSSL on ours):
 * x509 and PSK credentials in QEMU's directory layout, both directions over
 * tcp, the destination set up with -incoming defer as QEMU's users do. RAM
 * must arrive identical; a key that differs fails both ends with the cause.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { runMigration } from '../helpers/migration.js';
import { makeCa, pskDir, x509Dirs } from '../helpers/tls-certs.js';
import { cleanupAll, tempDir } from '../helpers/vm.js';
import { FERRY_COMPAT_ARGS, MEM, QEMU_RAM_ARGS, QEMU_SKIP, assertSameRam, cleanupQemu, pmem, qemuImageArgs } from '../helpers/qemu.js';

after(async () => {
  await cleanupQemu();
  await cleanupAll();
});


let dir = '';
let x509: { server: string; client: string };
let psk: { dir: string; key: string };
let image: Buffer;
let imagePath = '';

type Kind = 'x509' | 'psk';
const creds = (kind: Kind, endpoint: 'server' | 'client', pskAt = psk.dir): string[] =>
  kind === 'x509'
    ? ['-object', `tls-creds-x509,id=tls0,dir=${endpoint === 'server' ? x509.server : x509.client},endpoint=${endpoint}`]
    : ['-object', `tls-creds-psk,id=tls0,dir=${pskAt},endpoint=${endpoint}`];
const srcParams = (kind: Kind) => ({ 'tls-creds': 'tls0', ...(kind === 'x509' ? { 'tls-hostname': 'localhost' } : {}) });

describe('TLS with QEMU 7.2', { skip: QEMU_SKIP, timeout: 300000 }, () => {
  before(async () => {
    dir = tempDir('ferry-tls-interop-');
    x509 = await x509Dirs(dir, { ca: await makeCa() });
    psk = pskDir(dir, 'psk');
    image = randomBytes(MEM);
    image.fill(0, 0x10000, 0x30000);
    imagePath = join(dir, 'guest.img');
    writeFileSync(imagePath, image);
  });

  for (const kind of ['x509', 'psk'] as const) {
    it(`${kind}: Ferry → QEMU`, { timeout: 60000 }, async () => {
      await runMigration({
        tempPrefix: 'ferry-interop-',
        guest: { fill: 'random,seed=4' },
        source: { machine: FERRY_COMPAT_ARGS, args: creds(kind, 'client'), parameters: srcParams(kind) },
        destination: { qemu: true, name: 'qemu', args: [...QEMU_RAM_ARGS, ...creds(kind, 'server')], defer: true, parameters: { 'tls-creds': 'tls0' } },
        transport: 'tcp',
        capabilities: ['return-path'],
        timeoutMs: 30000,
        destinationTimeoutMs: 20000,
        expect: { sameRam: MEM },
        after: ({ d }) => assert.equal(d.stderr.trim(), '', 'QEMU printed nothing while loading'),
      });
    });

    it(`${kind}: QEMU → Ferry`, { timeout: 60000 }, async () => {
      await runMigration({
        dir,
        source: {
          qemu: true,
          name: `qemu-src-${kind}`,
          args: [...qemuImageArgs(imagePath), ...creds(kind, 'client')],
          parameters: srcParams(kind),
        },
        destination: { name: `dst-${kind}`, paused: false, machine: QEMU_RAM_ARGS, args: creds(kind, 'server'), defer: true, parameters: { 'tls-creds': 'tls0' } },
        transport: 'tcp',
        timeoutMs: 30000,
        expect: { sourceRunState: 'postmigrate', destinationRunState: 'running', settleMs: { sourceRunState: 5000, destinationRunState: 10000 } },
        after: async ({ d }) => assertSameRam(await pmem(d, dir), image, `qemu → ferry over TLS (${kind})`),
      });
    });
  }

  it('PSK keys that differ: QEMU → Ferry fails on both ends, the cause on ours', { timeout: 60000 }, async () => {
    const other = pskDir(dir, 'psk-other');
    await runMigration({
      dir,
      source: {
        qemu: true,
        name: 'qemu-src-badkey',
        args: [...qemuImageArgs(imagePath), ...creds('psk', 'client', other.dir)],
        parameters: { 'tls-creds': 'tls0' },
      },
      destination: { name: 'dst-badkey', machine: QEMU_RAM_ARGS, args: creds('psk', 'server'), defer: true, parameters: { 'tls-creds': 'tls0' } },
      transport: 'tcp',
      timeoutMs: 30000,
      expect: { source: 'failed', destination: 'failed', sourceRunState: 'running', destinationRunState: 'inmigrate', settleMs: { sourceRunState: 5000 } },
      after: async ({ dinfo, info }) => {
        assert.match(String(dinfo!['error-desc']), /^TLS handshake failed: the keys do not match/);
        // QEMU's own text comes from GnuTLS
        assert.match(String(info['error-desc']), /TLS|handshake|decrypt/i);
      },
    });
  });
});
