// interim: the interface only, until the crypto branch lands (taken from it at merge)
import type * as tls from 'node:tls';
export type TlsCredsType = 'tls-creds-x509' | 'tls-creds-psk' | 'tls-creds-anon';
export type TlsEndpoint = 'client' | 'server';
export class TlsCredsError extends Error {}
export interface TlsCreds {
  readonly qomType: TlsCredsType;
  readonly id: string;
  readonly endpoint: TlsEndpoint;
  readonly verifyPeer: boolean;
  readonly username?: string;
  clientOptions(): tls.ConnectionOptions;
  serverOptions(): tls.TLSSocketOptions;
}
