/**
 * The errors of the NBD layer: a request the server answered with an NBD
 * error value, and a peer that broke the protocol or went away.
 */
import { nbdErrorText } from './protocol.js';

/** The server answered a request (or an option) with an error. */
export class NbdError extends Error {
  override name = 'NbdError';
  constructor(
    /** The NBD error value (NBD_EINVAL, ...); 0 for an option error, whose reply type is in `repType`. */
    readonly errno: number,
    message: string,
    readonly repType?: number,
  ) {
    super(message);
  }

  static fromReply(errno: number, message: string | undefined): NbdError {
    const text = nbdErrorText(errno);
    return new NbdError(errno, message !== undefined && message !== '' ? `${message} (${text})` : text);
  }
}

/** The connection is unusable: closed by the peer, failed, or the peer broke the protocol. */
export class NbdConnectionError extends Error {
  override name = 'NbdConnectionError';
}

/** The strerror text of a Node system error, else its message. */
export function systemErrorText(e: unknown): string {
  const code = (e as NodeJS.ErrnoException | null)?.code;
  const map: Record<string, string> = {
    ENOENT: 'No such file or directory',
    ECONNREFUSED: 'Connection refused',
    ECONNRESET: 'Connection reset by peer',
    EPIPE: 'Broken pipe',
    EACCES: 'Permission denied',
    EADDRINUSE: 'Address already in use',
    EADDRNOTAVAIL: 'Cannot assign requested address',
    ENOTDIR: 'Not a directory',
    ETIMEDOUT: 'Connection timed out',
    EHOSTUNREACH: 'No route to host',
  };
  return (code !== undefined ? map[code] : undefined) ?? (e instanceof Error ? e.message : String(e));
}
