/**
 * ChannelError: the error type of the migration transports. Its message is
 * QEMU-style text that is shown to the user as is (QMP GenericError desc or
 * MigrationInfo error-desc).
 */
import { MigrationFailure } from '../errors.js';

export class ChannelError extends MigrationFailure {
  readonly kind = 'channel';
  override readonly name = 'ChannelError';
  /** The system error code behind it (ECONNREFUSED, EADDRINUSE, ...), 'ABORT_ERR' for a cancelled connect. */
  readonly code: string | undefined;
  constructor(message: string, code?: string, options?: { cause?: unknown }) {
    super(message, options);
    this.code = code;
  }
}

/** glibc strerror() texts for the codes a transport can meet (QEMU prints strerror). */
const STRERROR: Readonly<Record<string, string>> = {
  EPERM: 'Operation not permitted',
  ENOENT: 'No such file or directory',
  EINTR: 'Interrupted system call',
  EIO: 'Input/output error',
  EBADF: 'Bad file descriptor',
  EAGAIN: 'Resource temporarily unavailable',
  ENOMEM: 'Cannot allocate memory',
  EACCES: 'Permission denied',
  ENOTDIR: 'Not a directory',
  EISDIR: 'Is a directory',
  EINVAL: 'Invalid argument',
  EMFILE: 'Too many open files',
  ENFILE: 'Too many open files in system',
  ENOSPC: 'No space left on device',
  EROFS: 'Read-only file system',
  EPIPE: 'Broken pipe',
  ENAMETOOLONG: 'File name too long',
  ENOTSOCK: 'Socket operation on non-socket',
  EPROTOTYPE: 'Protocol wrong type for socket',
  EAFNOSUPPORT: 'Address family not supported by protocol',
  EADDRINUSE: 'Address already in use',
  EADDRNOTAVAIL: 'Cannot assign requested address',
  ENETDOWN: 'Network is down',
  ENETUNREACH: 'Network is unreachable',
  ECONNABORTED: 'Software caused connection abort',
  ECONNRESET: 'Connection reset by peer',
  ENOTCONN: 'Transport endpoint is not connected',
  ETIMEDOUT: 'Connection timed out',
  ECONNREFUSED: 'Connection refused',
  EHOSTDOWN: 'Host is down',
  EHOSTUNREACH: 'No route to host',
  // getaddrinfo (gai_strerror) texts
  ENOTFOUND: 'Name or service not known',
  EAI_AGAIN: 'Temporary failure in name resolution',
  EAI_FAIL: 'Non-recoverable failure in name resolution',
  EAI_NODATA: 'No address associated with hostname',
  EAI_NONAME: 'Name or service not known',
  EAI_FAMILY: 'ai_family not supported',
};

/** The system error code of a Node error (also unwraps AggregateError from multi-address connects). */
export function errorCode(err: unknown): string | undefined {
  if (err === null || typeof err !== 'object') return undefined;
  const e = err as { code?: unknown; errors?: unknown };
  if (Array.isArray(e.errors) && e.errors.length > 0) {
    // Happy-eyeballs connect: report the last attempt like QEMU (it tries the addresses in turn).
    return errorCode(e.errors[e.errors.length - 1]) ?? (typeof e.code === 'string' ? e.code : undefined);
  }
  return typeof e.code === 'string' ? e.code : undefined;
}

/** strerror()-style text for a Node error. */
export function strerror(err: unknown): string {
  const code = errorCode(err);
  if (code !== undefined && STRERROR[code] !== undefined) return STRERROR[code];
  if (err instanceof Error && err.message) {
    // Node messages look like "connect ECONNREFUSED 127.0.0.1:1": keep the readable part.
    return code ?? err.message;
  }
  return code ?? String(err);
}

/** `prefix: strerror` like QEMU's error_setg_errno. */
export function sysError(prefix: string, err: unknown): ChannelError {
  return new ChannelError(`${prefix}: ${strerror(err)}`, errorCode(err), { cause: err });
}
