/**
 * TLS around any migration transport (docs/spec/tls.md): a ChannelWrapper
 * that runs the handshake over the inner channel's streams and hands the
 * engine a channel whose input and output are the TLS session's. Both the
 * main stream and the return path go through it, since they are the two
 * directions of one channel.
 *
 * What the peer is checked against follows QEMU (crypto/tlssession.c):
 *  - x509 client with verify-peer: the server's chain against our CA, its
 *    validity dates, and its names against the hostname (tls-hostname, or
 *    the host of a tcp: URI; without one: "No hostname for certificate
 *    validation");
 *  - x509 server with verify-peer: the client must present a certificate
 *    that our CA signed;
 *  - psk: both ends prove the same key for the username;
 *  - anon: nothing (encryption without authentication).
 * Unlike QEMU, a handshake has a time limit (a silent peer fails the
 * migration instead of hanging it), and each failure says what went wrong
 * in words a user can act on, after QEMU's "TLS handshake failed: ".
 */
import { isIP } from 'node:net';
import { Duplex } from 'node:stream';
import * as tls from 'node:tls';
import type { TlsCreds } from '../../crypto/tls-creds.js';
import type { Channel } from './channel.js';
import { ChannelError } from './errors.js';
import { WrappedChannel, type ChannelSide, type ChannelWrapper } from './wrap.js';

/** How long a handshake may take before the migration fails. */
export const TLS_HANDSHAKE_TIMEOUT_MS = 10_000;

/** A TLS set-up or handshake failure; the message is shown as error-desc. */
export class TlsChannelError extends ChannelError {
  constructor(message: string, code?: string, options?: { cause?: unknown }) {
    super(message, code ?? 'TLS', options);
  }
}

export interface TlsWrapOptions {
  /** Checked against the server's certificate (client side, x509). */
  hostname?: string;
  handshakeTimeoutMs?: number;
  /** Aborts a handshake in flight (migrate_cancel). */
  signal?: AbortSignal;
}

/** What OpenSSL/Node report while verifying a peer's certificate, in QEMU's words (crypto/tlssession.c). */
const VERIFY_REASONS: Readonly<Record<string, string>> = {
  UNABLE_TO_GET_ISSUER_CERT: "The certificate hasn't got a known issuer",
  UNABLE_TO_GET_ISSUER_CERT_LOCALLY: "The certificate hasn't got a known issuer",
  UNABLE_TO_VERIFY_LEAF_SIGNATURE: "The certificate hasn't got a known issuer",
  DEPTH_ZERO_SELF_SIGNED_CERT: "The certificate hasn't got a known issuer",
  SELF_SIGNED_CERT_IN_CHAIN: "The certificate hasn't got a known issuer",
  CERT_HAS_EXPIRED: 'The certificate has expired',
  CERT_NOT_YET_VALID: 'The certificate is not yet activated',
  CERT_REVOKED: 'The certificate has been revoked',
  CERT_SIGNATURE_FAILURE: 'The certificate is not trusted',
  CERT_UNTRUSTED: 'The certificate is not trusted',
  CERT_REJECTED: 'The certificate is not trusted',
  INVALID_PURPOSE: 'The certificate is not trusted',
  INVALID_CA: 'The certificate is not trusted',
};

/**
 * What the peer told us with an alert, or what our side of OpenSSL found,
 * as a cause a user can act on. Keys are Node's error codes.
 */
const HANDSHAKE_REASONS: Readonly<Record<string, string>> = {
  ERR_SSL_TLSV1_ALERT_UNKNOWN_CA: 'the peer does not trust our certificate (unknown CA)',
  ERR_SSL_SSLV3_ALERT_BAD_CERTIFICATE: 'the peer rejected our certificate (bad certificate)',
  ERR_SSL_SSLV3_ALERT_CERTIFICATE_EXPIRED: 'the peer rejected our certificate: it has expired or is not yet valid',
  ERR_SSL_SSLV3_ALERT_CERTIFICATE_UNKNOWN: 'the peer rejected our certificate (certificate unknown)',
  ERR_SSL_SSLV3_ALERT_UNSUPPORTED_CERTIFICATE: 'the peer rejected our certificate (unsupported certificate)',
  ERR_SSL_SSLV3_ALERT_CERTIFICATE_REVOKED: 'the peer rejected our certificate: it has been revoked',
  ERR_SSL_TLSV13_ALERT_CERTIFICATE_REQUIRED: 'the peer requires a client certificate and we have none (client-cert.pem)',
  ERR_SSL_PEER_DID_NOT_RETURN_A_CERTIFICATE: 'No certificate peers: the client sent no certificate, and verify-peer is on',
  ERR_SSL_TLSV1_ALERT_UNKNOWN_PSK_IDENTITY: 'the peer does not know our PSK username',
  ERR_SSL_PSK_IDENTITY_NOT_FOUND: 'the PSK username of the peer is not in keys.psk',
  ERR_SSL_TLSV1_ALERT_DECRYPT_ERROR: 'the keys do not match (a different pre-shared key?)',
  ERR_SSL_DECRYPTION_FAILED_OR_BAD_RECORD_MAC: 'the keys do not match (a different pre-shared key?)',
  ERR_SSL_BAD_RECORD_MAC: 'the keys do not match (a different pre-shared key?)',
  ERR_SSL_SSLV3_ALERT_BAD_RECORD_MAC: 'the keys do not match (a different pre-shared key?)',
  ERR_SSL_CIPHER_OPERATION_FAILED: 'the keys do not match (a different pre-shared key?)',
  ERR_SSL_WRONG_VERSION_NUMBER: 'the peer does not speak TLS (is tls-creds set on both sides?)',
  ERR_SSL_HTTP_REQUEST: 'the peer does not speak TLS (is tls-creds set on both sides?)',
  ERR_SSL_PACKET_LENGTH_TOO_LONG: 'the peer does not speak TLS (is tls-creds set on both sides?)',
  ERR_SSL_UNSUPPORTED_PROTOCOL: 'the peer offers no TLS version we accept',
  ERR_SSL_SSLV3_ALERT_HANDSHAKE_FAILURE: 'the peer found nothing in common with us (credentials of another kind?)',
  ERR_SSL_NO_SHARED_CIPHER: 'nothing in common with the peer (credentials of another kind?)',
  ERR_SSL_NO_SUITABLE_SIGNATURE_ALGORITHM: 'nothing in common with the peer (credentials of another kind?)',
  ECONNRESET: 'the peer closed the connection (is it set up for TLS with credentials it accepts?)',
  EPIPE: 'the peer closed the connection (is it set up for TLS with credentials it accepts?)',
};

function describeHandshakeError(e: unknown, creds: TlsCreds, hostname: string | undefined): string {
  const err = e as NodeJS.ErrnoException & { reason?: string };
  const code = err.code ?? '';
  if (code === 'ERR_TLS_CERT_ALTNAME_INVALID') return `Certificate does not match the hostname ${hostname ?? ''}`;
  const verify = VERIFY_REASONS[code];
  if (verify !== undefined) return verify;
  let why = HANDSHAKE_REASONS[code];
  if (why === undefined && /socket disconnected|ended by the other party/i.test(err.message)) {
    why = 'the peer closed the connection (is it set up for TLS with credentials it accepts?)';
  }
  if (code === 'ERR_SSL_TLSV1_ALERT_UNKNOWN_PSK_IDENTITY' && creds.username !== undefined) {
    why = `the peer does not know PSK username '${creds.username}'`;
  }
  return `TLS handshake failed: ${why ?? err.reason ?? err.message.split('\n')[0]}`;
}

/**
 * A duplex over the inner channel. A socket is used as it is (Node then
 * runs TLS over the socket's own handle, the fast path); two one-way
 * streams (an exec: child's pipes) are joined.
 */
function innerDuplex(inner: Channel): Duplex {
  if ((inner.input as unknown) === inner.output && inner.input instanceof Duplex) return inner.input;
  return Duplex.from({ readable: inner.input, writable: inner.output });
}

/** Run the handshake; resolves with the secure socket, or rejects with a TlsChannelError. */
function handshake(inner: Channel, side: ChannelSide, creds: TlsCreds, opts: TlsWrapOptions): Promise<tls.TLSSocket> {
  const hostname = opts.hostname;
  const x509Client = creds.qomType === 'tls-creds-x509' && side === 'outgoing';
  if (x509Client && creds.verifyPeer && (hostname === undefined || hostname === '')) {
    return Promise.reject(new TlsChannelError('No hostname for certificate validation'));
  }
  if (!inner.bidirectional) {
    return Promise.reject(new TlsChannelError('TLS needs a channel that carries both directions, and this one is one-way'));
  }
  const raw = innerDuplex(inner);
  return new Promise<tls.TLSSocket>((resolve, reject) => {
    let sock: tls.TLSSocket | undefined;
    let done = false;
    const timeoutMs = opts.handshakeTimeoutMs ?? TLS_HANDSHAKE_TIMEOUT_MS;
    const timer = setTimeout(() => {
      finish(new TlsChannelError(`TLS handshake failed: no answer from the peer within ${timeoutMs / 1000} s (is it set up for TLS?)`, 'ETIMEDOUT'));
    }, timeoutMs);
    const onAbort = (): void => finish(new TlsChannelError('TLS handshake cancelled', 'ABORT_ERR'));
    const onError = (e: Error): void => finish(new TlsChannelError(describeHandshakeError(e, creds, hostname), (e as NodeJS.ErrnoException).code, { cause: e }));
    const onClose = (): void => finish(new TlsChannelError(describeHandshakeError(new Error('socket disconnected'), creds, hostname), 'ECONNRESET'));
    const onSecure = (s: tls.TLSSocket): void => {
      sock = s;
      // Node's server lets a failed client verification through when rejectUnauthorized is off: check it here, with QEMU's text
      if (side === 'incoming' && creds.qomType === 'tls-creds-x509' && creds.verifyPeer && !s.authorized) {
        const code = String(s.authorizationError ?? 'UNSPECIFIED');
        finish(new TlsChannelError(VERIFY_REASONS[code] ?? `The certificate is not trusted (${code})`, code));
        return;
      }
      finish(undefined);
    };
    function finish(err: TlsChannelError | undefined): void {
      if (done) return;
      done = true;
      clearTimeout(timer);
      opts.signal?.removeEventListener('abort', onAbort);
      raw.off('close', onClose);
      sock?.off('error', onError);
      sock?.off('close', onClose);
      if (err === undefined && sock !== undefined) return resolve(sock);
      // swallow what the destroyed sockets still report
      sock?.on('error', () => undefined);
      raw.on('error', () => undefined);
      sock?.destroy();
      raw.destroy();
      reject(err);
    }
    if (opts.signal?.aborted) return onAbort();
    opts.signal?.addEventListener('abort', onAbort, { once: true });
    raw.once('close', onClose);
    if (side === 'outgoing') {
      const s = tls.connect({
        ...creds.clientOptions(),
        socket: raw,
        // SNI is for names only (RFC 6066); an IP address is still checked below
        ...(hostname !== undefined && hostname !== '' && isIP(hostname) === 0 ? { servername: hostname } : {}),
        checkServerIdentity: (_host, cert) => (x509Client && creds.verifyPeer ? tls.checkServerIdentity(hostname ?? '', cert) : undefined),
      });
      sock = s;
      s.on('error', onError);
      s.once('close', onClose);
      s.once('secureConnect', () => onSecure(s));
    } else {
      // a one-connection tls.Server: only its connection path checks the
      // client's certificate and sets authorized (a bare server TLSSocket does not)
      const server = tls.createServer(creds.serverOptions());
      server.once('tlsClientError', (e: Error, s: tls.TLSSocket) => {
        sock = s;
        onError(e);
      });
      server.once('secureConnection', (s: tls.TLSSocket) => {
        s.on('error', onError);
        s.once('close', onClose);
        onSecure(s);
      });
      server.emit('connection', raw);
    }
  });
}

/** The wrapper for one migration: TLS with these credentials. */
export function tlsWrapper(creds: TlsCreds, opts: TlsWrapOptions = {}): ChannelWrapper {
  return async (inner, side) => {
    const sock = await handshake(inner, side, creds, opts);
    const label = `tls (${sock.getProtocol() ?? 'TLS'}, ${sock.getCipher()?.name ?? 'unknown cipher'})`;
    return new WrappedChannel(inner, {
      input: sock,
      output: sock,
      label,
      // QEMU: "Cannot read from TLS channel: %s" (a flipped byte fails the record's MAC)
      describeError: (e) => {
        const code = (e as NodeJS.ErrnoException).code;
        // TLS 1.3: the server judges our certificate after our side finished, so its alert comes later
        if (code !== undefined && /^ERR_SSL_.*ALERT/.test(code) && HANDSHAKE_REASONS[code] !== undefined) return describeHandshakeError(e, creds, opts.hostname);
        const why = (e as { reason?: string }).reason ?? e.message.split('\n')[0];
        const verb = code === 'EPIPE' || code === 'ERR_STREAM_WRITE_AFTER_END' ? 'write to' : 'read from';
        if (code === 'EPIPE' || code === 'ECONNRESET') return `Cannot ${verb} TLS channel: the peer closed the connection (did it refuse our credentials? its error says)`;
        return `Cannot ${verb} TLS channel: ${why}`;
      },
    });
  };
}

/** Apply `outer` to what `inner` returns: transport → inner → outer. */
export function chainWrappers(inner: ChannelWrapper | undefined, outer: ChannelWrapper | undefined): ChannelWrapper | undefined {
  if (inner === undefined) return outer;
  if (outer === undefined) return inner;
  return async (ch, side) => {
    const mid = await inner(ch, side);
    try {
      return await outer(mid, side);
    } catch (e) {
      mid.close();
      throw e;
    }
  };
}

/** How the engine finds credentials by id: the object, 'other' for an object that is not TLS credentials, undefined for none. */
export type TlsCredsLookup = (id: string) => TlsCreds | 'other' | undefined;

/** What a VM gives the engine for TLS. */
export interface TlsDeps {
  lookup: TlsCredsLookup;
  /** Handshake time limit (default TLS_HANDSHAKE_TIMEOUT_MS). */
  handshakeTimeoutMs?: number;
}

/** migration/tls.c: the credentials named by tls-creds, for this end of the session. */
export function resolveTlsCreds(lookup: TlsCredsLookup | undefined, id: string, endpoint: TlsCreds['endpoint']): TlsCreds {
  const found = lookup?.(id);
  if (found === undefined) throw new TlsChannelError(`No TLS credentials with id '${id}'`);
  if (found === 'other') throw new TlsChannelError(`Object with id '${id}' is not TLS credentials`);
  if (found.endpoint !== endpoint) throw new TlsChannelError(`Expected TLS credentials for a ${endpoint} endpoint`);
  return found;
}

/**
 * The TLS wrapper of one migration, or undefined when tls-creds is unset.
 * The credentials are looked up when the transport is up, as QEMU does, so
 * a bad id fails the migration (error-desc) rather than the command.
 */
export function migrationTls(
  credsId: string,
  deps: TlsDeps | undefined,
  side: ChannelSide,
  opts: { hostname?: string; uriHost?: string; signal?: AbortSignal },
): ChannelWrapper | undefined {
  if (credsId === '') return undefined;
  return async (inner, s) => {
    const creds = resolveTlsCreds(deps?.lookup, credsId, side === 'outgoing' ? 'client' : 'server');
    const hostname = opts.hostname !== undefined && opts.hostname !== '' ? opts.hostname : opts.uriHost;
    return tlsWrapper(creds, { hostname, handshakeTimeoutMs: deps?.handshakeTimeoutMs, signal: opts.signal })(inner, s);
  };
}
