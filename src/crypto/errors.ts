/** A credential object that cannot be created; the message is QEMU's text (docs/spec/tls.md). */
export class TlsCredsError extends Error {
  override readonly name = 'TlsCredsError';
}
