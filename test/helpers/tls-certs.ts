/**
 * TLS credentials made at run time, in QEMU's directory layout
 * (docs/tls.md): a CA, server and client certificates with the extensions
 * that QEMU's checks want (and ways to get each one wrong), and keys.psk
 * files. No private key is committed; everything lives in the caller's
 * temp directory. Certificates come from @peculiar/x509 over WebCrypto
 * (EC P-256: a whole set takes a few milliseconds), so that validity dates
 * in the past or the future need no faked clock.
 *
 *   const ca = await makeCa();
 *   const { server, client } = await x509Dirs(dir, { ca });
 *   // -object tls-creds-x509,id=tls0,dir=${server},endpoint=server
 */
import 'reflect-metadata';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { randomBytes, webcrypto } from 'node:crypto';
import * as x509 from '@peculiar/x509';

x509.cryptoProvider.set(webcrypto as never);

type KeyPair = webcrypto.CryptoKeyPair;

const ALG = { name: 'ECDSA', namedCurve: 'P-256', hash: 'SHA-256' };
const DAY = 86_400_000;
const SERVER_AUTH = '1.3.6.1.5.5.7.3.1';
const CLIENT_AUTH = '1.3.6.1.5.5.7.3.2';

let serial = 1;
const nextSerial = (): string => (serial++).toString(16).padStart(2, '0');

export interface Ca {
  cert: x509.X509Certificate;
  keys: KeyPair;
  pem: string;
}

async function keyPem(k: webcrypto.CryptoKey): Promise<string> {
  return x509.PemConverter.encode(await webcrypto.subtle.exportKey('pkcs8', k), 'PRIVATE KEY');
}

async function newKeys(): Promise<KeyPair> {
  return (await webcrypto.subtle.generateKey(ALG, true, ['sign', 'verify'])) as KeyPair;
}

export async function makeCa(name = 'Ferry test CA', opts: { notBefore?: Date; notAfter?: Date; isCa?: boolean } = {}): Promise<Ca> {
  const keys = await newKeys();
  const cert = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: nextSerial(),
    name: `CN=${name}`,
    notBefore: opts.notBefore ?? new Date(Date.now() - DAY),
    notAfter: opts.notAfter ?? new Date(Date.now() + 30 * DAY),
    keys,
    signingAlgorithm: ALG,
    extensions: [
      new x509.BasicConstraintsExtension(opts.isCa ?? true, undefined, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign, true),
    ],
  });
  return { cert, keys, pem: cert.toString('pem') };
}

export interface LeafOptions {
  /** subjectAltName entries (server default: localhost and 127.0.0.1); IPs are told from names by their form */
  names?: string[];
  notBefore?: Date;
  notAfter?: Date;
  /** basicConstraints CA:TRUE on a leaf (QEMU refuses it) */
  isCa?: boolean;
  /** the extended key usage OIDs, critical (default: the role's); null: none */
  purposes?: string[] | null;
  /** the key usage bits, critical (default digitalSignature | keyEncipherment) */
  keyUsage?: number;
  /** write another certificate's key instead (a mismatch) */
  wrongKey?: boolean;
}

export interface Leaf {
  certPem: string;
  keyPem: string;
}

export async function makeLeaf(ca: Ca, role: 'server' | 'client', opts: LeafOptions = {}): Promise<Leaf> {
  const keys = await newKeys();
  const names = opts.names ?? (role === 'server' ? ['localhost', '127.0.0.1'] : []);
  const purposes = opts.purposes === undefined ? [role === 'server' ? SERVER_AUTH : CLIENT_AUTH] : opts.purposes;
  const extensions: x509.Extension[] = [
    new x509.BasicConstraintsExtension(opts.isCa ?? false, undefined, true),
    new x509.KeyUsagesExtension(opts.keyUsage ?? x509.KeyUsageFlags.digitalSignature | x509.KeyUsageFlags.keyEncipherment, true),
  ];
  if (purposes !== null) extensions.push(new x509.ExtendedKeyUsageExtension(purposes, true));
  if (names.length) {
    extensions.push(
      new x509.SubjectAlternativeNameExtension(names.map((value) => ({ type: /^[0-9.]+$|:/.test(value) ? ('ip' as const) : ('dns' as const), value }))),
    );
  }
  const cert = await x509.X509CertificateGenerator.create({
    serialNumber: nextSerial(),
    subject: `CN=${names[0] ?? `ferry ${role}`}`,
    issuer: ca.cert.subject,
    notBefore: opts.notBefore ?? new Date(Date.now() - DAY),
    notAfter: opts.notAfter ?? new Date(Date.now() + 30 * DAY),
    signingKey: ca.keys.privateKey,
    publicKey: keys.publicKey,
    signingAlgorithm: ALG,
    extensions,
  });
  const key = opts.wrongKey ? (await newKeys()).privateKey : keys.privateKey;
  return { certPem: cert.toString('pem'), keyPem: await keyPem(key) };
}

export interface X509DirsOptions {
  /** the CA that signs both (default: a new one) */
  ca?: Ca;
  /** the CA the client trusts (default: ca) */
  clientTrusts?: Ca;
  /** the CA that signs the client's certificate (default: ca) */
  clientCa?: Ca;
  /** the CA the server trusts (default: ca) */
  serverTrusts?: Ca;
  server?: LeafOptions;
  /** null: no client certificate in the client directory */
  client?: LeafOptions | null;
  /** a name for the pair of directories under root (default x509) */
  name?: string;
}

/** A server and a client directory in QEMU's layout, under root/NAME/. */
export async function x509Dirs(root: string, opts: X509DirsOptions = {}): Promise<{ server: string; client: string; ca: Ca }> {
  const ca = opts.ca ?? (await makeCa());
  const base = join(root, opts.name ?? 'x509');
  const server = join(base, 'server');
  const client = join(base, 'client');
  mkdirSync(server, { recursive: true });
  mkdirSync(client, { recursive: true });
  const s = await makeLeaf(ca, 'server', opts.server);
  writeFileSync(join(server, 'ca-cert.pem'), (opts.serverTrusts ?? ca).pem);
  writeFileSync(join(server, 'server-cert.pem'), s.certPem);
  writeFileSync(join(server, 'server-key.pem'), s.keyPem, { mode: 0o600 });
  writeFileSync(join(client, 'ca-cert.pem'), (opts.clientTrusts ?? ca).pem);
  if (opts.client !== null) {
    const c = await makeLeaf(opts.clientCa ?? ca, 'client', opts.client);
    writeFileSync(join(client, 'client-cert.pem'), c.certPem);
    writeFileSync(join(client, 'client-key.pem'), c.keyPem, { mode: 0o600 });
  }
  return { server, client, ca };
}

/** A directory with keys.psk holding these `username:hexkey` lines (default: qemu with a fresh key). */
export function pskDir(root: string, name: string, lines?: string[]): { dir: string; key: string } {
  const dir = join(root, name);
  mkdirSync(dir, { recursive: true });
  const key = randomBytes(32).toString('hex');
  writeFileSync(join(dir, 'keys.psk'), (lines ?? [`qemu:${key}`]).join('\n') + '\n', { mode: 0o600 });
  return { dir, key };
}

export const KEY_USAGE = x509.KeyUsageFlags;
export const PURPOSE = { SERVER_AUTH, CLIENT_AUTH };
