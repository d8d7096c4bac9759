/**
 * The pre-shared key of a tls-creds-psk object as node:tls takes it. Kept
 * apart from tls-creds.ts so that a TLS worker thread
 * (src/migration/channel/tls-worker.ts) can rebuild the callback without
 * loading the x509 checks.
 */
import type * as tls from 'node:tls';

/** A psk client's identity and key, or a psk server's keys.psk by username. */
export type PskSecret = { identity: string; key: Buffer } | ReadonlyMap<string, Buffer>;

/** node:tls's pskCallback for a psk secret: the client sends its identity and key; the server looks the identity up. */
export function pskCallbackOptions(psk: PskSecret): Pick<tls.ConnectionOptions, 'pskCallback'> | Pick<tls.TlsOptions, 'pskCallback'> {
  if (!(psk instanceof Map)) {
    const { identity, key } = psk as { identity: string; key: Buffer };
    return { pskCallback: () => ({ identity, psk: key }) };
  }
  const keys = psk;
  return {
    // an unknown name, or a key that is not valid hex, fails the handshake (unknown_psk_identity)
    pskCallback: (_socket: tls.TLSSocket, identity: string) => {
      const k = keys.get(identity);
      return k !== undefined && k.length > 0 ? k : null;
    },
  };
}

