/**
 * QEMU's TLS credential objects (docs/spec/tls.md): tls-creds-x509,
 * tls-creds-psk and tls-creds-anon. The files in `dir` are read and checked
 * when the object is created, as QEMU loads them at creation; a session
 * (src/migration/channel/tls.ts) then takes the node:tls options from
 * clientOptions() or serverOptions().
 *
 * Session parameters, chosen to meet QEMU's GnuTLS priorities:
 *  - x509: "NORMAL" there; TLS 1.2 or 1.3 here, Node's default suites. A
 *    server here offers TLS 1.3 only when it sends no session tickets, as
 *    QEMU's does not: a QEMU source without the return path never reads, so
 *    tickets would lie unread in its socket and its close would reset the
 *    connection before its last bytes arrive (native/tls-config; without
 *    that addon the server keeps to TLS 1.2).
 *  - psk: "NORMAL:+ECDHE-PSK:+DHE-PSK:+PSK" there; TLS 1.2 PSK suites here
 *    (Node's TLS 1.3 does not do external PSKs: the server then asks for a
 *    certificate). AES-GCM first: the CPU has AES instructions.
 *  - anon: "NORMAL:+ANON-DH" there; anonymous finite-field DH over TLS 1.2
 *    here (OpenSSL needs security level 0 for suites without
 *    authentication).
 */
import { accessSync, constants, readFileSync } from 'node:fs';
import { createPrivateKey, type KeyObject, type X509Certificate } from 'node:crypto';
import { join } from 'node:path';
import type * as tls from 'node:tls';
import { tlsServerSendsNoTickets } from '../base/native.js';
import { TlsCredsError } from './errors.js';
import { parseCert, parseCertList, sanityCheck } from './x509-checks.js';

export { TlsCredsError };

export type TlsCredsType = 'tls-creds-x509' | 'tls-creds-psk' | 'tls-creds-anon';
export type TlsEndpoint = 'client' | 'server';

export interface TlsCreds {
  readonly qomType: TlsCredsType;
  readonly id: string;
  readonly endpoint: TlsEndpoint;
  /** x509: verify-peer (default on). psk: true (both ends prove the key). anon: false. */
  readonly verifyPeer: boolean;
  /** psk client: the identity sent (default `qemu`). */
  readonly username?: string;
  /** Options for tls.connect (everything but socket, servername, checkServerIdentity). */
  clientOptions(): tls.ConnectionOptions;
  /** Options for new tls.TLSSocket(socket, { isServer: true, ... }). */
  serverOptions(): tls.TLSSocketOptions;
}

const TYPES: readonly TlsCredsType[] = ['tls-creds-x509', 'tls-creds-psk', 'tls-creds-anon'];

export function isTlsCredsType(t: string): t is TlsCredsType {
  return (TYPES as readonly string[]).includes(t);
}

/** PSK suites of TLS 1.2 that GnuTLS's +PSK/+DHE-PSK/+ECDHE-PSK also offer. */
const PSK_CIPHERS = [
  'PSK-AES256-GCM-SHA384',
  'PSK-AES128-GCM-SHA256',
  'DHE-PSK-AES256-GCM-SHA384',
  'DHE-PSK-AES128-GCM-SHA256',
  'ECDHE-PSK-CHACHA20-POLY1305',
  'PSK-CHACHA20-POLY1305',
].join(':');
/** Anonymous DH suites (GnuTLS +ANON-DH). */
const ANON_CIPHERS = 'ADH-AES256-GCM-SHA384:ADH-AES128-GCM-SHA256:@SECLEVEL=0';

/** glibc's strerror for what access(2) can say here. */
function strerror(e: unknown): string {
  const code = (e as NodeJS.ErrnoException).code;
  const known: Record<string, string> = {
    ENOENT: 'No such file or directory',
    EACCES: 'Permission denied',
    ENOTDIR: 'Not a directory',
    ELOOP: 'Too many levels of symbolic links',
  };
  return (code && known[code]) ?? (e as Error).message;
}

/** qcrypto_tls_creds_get_path: a required file must be readable; an optional one may be missing. */
function credPath(dir: string | undefined, file: string, required: boolean): string | undefined {
  if (dir === undefined) {
    if (required) throw new TlsCredsError("Missing 'dir' property value");
    return undefined;
  }
  const path = join(dir, file);
  try {
    accessSync(path, constants.R_OK);
    return path;
  } catch (e) {
    if (!required && (e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw new TlsCredsError(`Unable to access credentials ${path}: ${strerror(e)}`);
  }
}

/** dh-params.pem, when the directory has one (finite-field DH for the DHE and anonymous suites). */
function dhParams(dir: string | undefined): string | undefined {
  const path = credPath(dir, 'dh-params.pem', false);
  return path === undefined ? undefined : readText(path, 'DH parameters');
}

function readText(path: string, what: string): string {
  try {
    return readFileSync(path, 'utf8');
  } catch (e) {
    throw new TlsCredsError(`Cannot load ${what} ${path}: ${strerror(e)}`);
  }
}

/** A QOM bool from QMP (true/false) or the command line (on/off, yes/no, true/false). */
function boolProp(props: Record<string, unknown>, name: string, dflt: boolean): boolean {
  const v = props[name];
  if (v === undefined) return dflt;
  if (typeof v === 'boolean') return v;
  if (v === 'on' || v === 'yes' || v === 'true' || v === 'y') return true;
  if (v === 'off' || v === 'no' || v === 'false' || v === 'n') return false;
  throw new TlsCredsError(`Parameter '${name}' expects 'on' or 'off'`);
}

function strProp(props: Record<string, unknown>, name: string): string | undefined {
  const v = props[name];
  if (v === undefined) return undefined;
  if (typeof v !== 'string') throw new TlsCredsError(`Invalid parameter type for '${name}', expected: string`);
  return v;
}

function endpointProp(props: Record<string, unknown>): TlsEndpoint {
  const v = props.endpoint ?? 'client';
  if (v !== 'client' && v !== 'server') throw new TlsCredsError(`Parameter 'endpoint' does not accept value '${String(v)}'`);
  return v;
}

const KNOWN_PROPS: Record<TlsCredsType, readonly string[]> = {
  'tls-creds-x509': ['endpoint', 'dir', 'verify-peer', 'sanity-check', 'passwordid', 'priority'],
  'tls-creds-psk': ['endpoint', 'dir', 'verify-peer', 'username', 'priority'],
  'tls-creds-anon': ['endpoint', 'dir', 'verify-peer', 'priority'],
};

/**
 * Load and check the credential files now, as QEMU does at object
 * creation. Throws TlsCredsError with QEMU's text.
 */
export function createTlsCreds(qomType: TlsCredsType, id: string, props: Record<string, unknown>, now = new Date()): TlsCreds {
  for (const k of Object.keys(props)) {
    if (!KNOWN_PROPS[qomType].includes(k)) throw new TlsCredsError(`Property '${qomType}.${k}' not found`);
  }
  if (props.priority !== undefined) throw new TlsCredsError("Property 'priority' is not supported: Ferry uses OpenSSL, not a GnuTLS priority string");
  const endpoint = endpointProp(props);
  const dir = strProp(props, 'dir');
  switch (qomType) {
    case 'tls-creds-x509':
      return x509(id, endpoint, dir, props, now);
    case 'tls-creds-psk':
      return psk(id, endpoint, dir, props);
    case 'tls-creds-anon':
      return anon(id, endpoint, dir, props);
  }
}

function x509(id: string, endpoint: TlsEndpoint, dir: string | undefined, props: Record<string, unknown>, now: Date): TlsCreds {
  const verifyPeer = boolProp(props, 'verify-peer', true);
  const check = boolProp(props, 'sanity-check', true);
  const passwordid = strProp(props, 'passwordid');
  const server = endpoint === 'server';
  const caFile = credPath(dir, 'ca-cert.pem', true)!;
  const crlFile = credPath(dir, 'ca-crl.pem', false);
  const certFile = credPath(dir, server ? 'server-cert.pem' : 'client-cert.pem', server);
  const keyFile = credPath(dir, server ? 'server-key.pem' : 'client-key.pem', server);
  const dhparam = server ? dhParams(dir) : undefined;

  const caPem = readText(caFile, 'CA cert list');
  const cas = parseCertList(caPem, caFile);
  let cert: X509Certificate | undefined;
  let certPem: string | undefined;
  if (certFile !== undefined) {
    certPem = readText(certFile, 'CA cert list');
    cert = parseCert(certPem, certFile, endpoint);
  }
  if (check) sanityCheck({ role: endpoint, cert: cert && { x509: cert, file: certFile! }, cas, caFile, now });

  let keyPem: string | undefined;
  if (cert !== undefined && keyFile !== undefined) {
    // there are no secret objects in Ferry: a passwordid names nothing
    if (passwordid !== undefined) throw new TlsCredsError(`No secret with id '${passwordid}'`);
    keyPem = readText(keyFile, 'key');
    let key: KeyObject;
    try {
      key = createPrivateKey(keyPem);
    } catch (e) {
      throw new TlsCredsError(`Cannot load certificate '${certFile}' & key '${keyFile}': ${(e as Error).message}`);
    }
    if (!cert.checkPrivateKey(key)) {
      throw new TlsCredsError(`Cannot load certificate '${certFile}' & key '${keyFile}': The certificate and the given key do not match.`);
    }
  }
  let crl: string | undefined;
  if (crlFile !== undefined) {
    crl = readText(crlFile, 'CRL');
    if (!/-----BEGIN X509 CRL-----/.test(crl)) throw new TlsCredsError(`Cannot load CRL '${crlFile}': Base64 decoding error.`);
  }
  const common = {
    ca: caPem,
    ...(crl !== undefined ? { crl } : {}),
    ...(certPem !== undefined && keyPem !== undefined ? { cert: certPem, key: keyPem } : {}),
    minVersion: 'TLSv1.2' as const,
    rejectUnauthorized: verifyPeer,
  };
  return {
    qomType: 'tls-creds-x509',
    id,
    endpoint,
    verifyPeer,
    clientOptions: () => ({ ...common }),
    // QEMU's server always asks for a client certificate; verify-peer decides whether it must be good.
    // TLS 1.3 only when our server sends no session tickets (see tlsServerSendsNoTickets)
    serverOptions: () =>
      ({
        ...common,
        ...(tlsServerSendsNoTickets() ? {} : { maxVersion: 'TLSv1.2' as const }),
        requestCert: true,
        ...(dhparam !== undefined ? { dhparam } : {}),
      }) as tls.TLSSocketOptions,
  };
}

/** keys.psk: `username:hexkey` lines. */
function readPskFile(path: string): Map<string, Buffer> {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (e) {
    throw new TlsCredsError(`Cannot read PSK file ${path}: ${strerror(e)}`);
  }
  const keys = new Map<string, Buffer>();
  for (const line of text.split('\n')) {
    const colon = line.indexOf(':');
    if (colon <= 0) continue;
    const name = line.slice(0, colon);
    const hex = line.slice(colon + 1).trim();
    if (!keys.has(name)) keys.set(name, hex.length > 0 && hex.length % 2 === 0 && /^[0-9a-fA-F]+$/.test(hex) ? Buffer.from(hex, 'hex') : Buffer.alloc(0));
  }
  return keys;
}

function psk(id: string, endpoint: TlsEndpoint, dir: string | undefined, props: Record<string, unknown>): TlsCreds {
  const given = strProp(props, 'username');
  const base = { maxVersion: 'TLSv1.2' as const, ciphers: PSK_CIPHERS };
  if (endpoint === 'server') {
    if (given !== undefined) throw new TlsCredsError('username should not be set when endpoint=server');
    const dhparam = dhParams(dir) ?? 'auto';
    const file = credPath(dir, 'keys.psk', true)!;
    const keys = readPskFile(file);
    return {
      qomType: 'tls-creds-psk',
      id,
      endpoint,
      verifyPeer: true,
      clientOptions: () => ({ ...base }),
      serverOptions: () =>
        ({
          ...base,
          dhparam,
          // an unknown name, or a key that is not valid hex, fails the handshake (unknown_psk_identity)
          pskCallback: (_socket: tls.TLSSocket, identity: string) => {
            const k = keys.get(identity);
            return k !== undefined && k.length > 0 ? k : null;
          },
        }) as tls.TLSSocketOptions,
    };
  }
  const file = credPath(dir, 'keys.psk', true)!;
  const username = given ?? 'qemu';
  const key = readPskFile(file).get(username);
  if (key === undefined) throw new TlsCredsError(`Username ${username} not found in PSK file ${file}`);
  if (key.length === 0) throw new TlsCredsError(`The key of username ${username} in PSK file ${file} is not hexadecimal`);
  return {
    qomType: 'tls-creds-psk',
    id,
    endpoint,
    verifyPeer: true,
    username,
    clientOptions: () => ({ ...base, pskCallback: () => ({ identity: username, psk: key }) }),
    serverOptions: () => ({ ...base }),
  };
}

function anon(id: string, endpoint: TlsEndpoint, dir: string | undefined, props: Record<string, unknown>): TlsCreds {
  boolProp(props, 'verify-peer', true);
  const dhparam = endpoint === 'server' ? (dhParams(dir) ?? 'auto') : undefined;
  const base = { maxVersion: 'TLSv1.2' as const, ciphers: ANON_CIPHERS, rejectUnauthorized: false };
  return {
    qomType: 'tls-creds-anon',
    id,
    endpoint,
    verifyPeer: false,
    clientOptions: () => ({ ...base }),
    serverOptions: () => ({ ...base, dhparam }) as tls.TLSSocketOptions,
  };
}
