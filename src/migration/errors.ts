/**
 * The one family of migration errors. Every failure the engine reports is a
 * MigrationFailure with
 *
 *   kind   what went wrong, in the terms a caller acts on:
 *            usage      the request was refused (QEMU's text), nothing started
 *            stream     the peer sent bytes that are not a valid stream
 *            channel    the transport failed (connect, read, write, a child's exit)
 *            peer       the other side said it failed (return-path SHUT)
 *            cancelled  migrate_cancel
 *            internal   none of those: a bug (a TypeError, a RangeError from an
 *                       unchecked read...). Kept with its stack as `cause`.
 *   phase  where it happened (set once, by the first session that catches it)
 *   cause  the original error, when this one wraps another
 *
 * The message is the user-facing, QEMU-style text (error-desc, GenericError
 * desc). The mapping to QMP error classes happens only in src/commands/.
 * A fuzzer tells "rejected a bad stream" (kind stream) from "crashed on it"
 * (kind internal) by `kind` alone.
 */

export type FailureKind = 'usage' | 'stream' | 'channel' | 'peer' | 'cancelled' | 'internal';

/** Where a failure happened. Source phases first, then the destination's. */
export type MigrationPhase =
  | 'start'
  | 'connect'
  | 'setup'
  | 'iterate'
  | 'complete'
  | 'postcopy-switch'
  | 'postcopy'
  | 'colo'
  | 'return-path'
  | 'listen'
  | 'accept'
  | 'load'
  | 'postcopy-load'
  | 'start-guest';

export abstract class MigrationFailure extends Error {
  abstract readonly kind: FailureKind;
  /** Set by the session that first catches the error (see inPhase). */
  phase: MigrationPhase | undefined;
  constructor(message: string, options?: { cause?: unknown; phase?: MigrationPhase }) {
    super(message, options?.cause !== undefined ? { cause: options.cause } : undefined);
    this.phase = options?.phase;
  }
}

/** A refused request with QEMU's text (`migrate` checks, parameter ranges...). */
export class MigrationError extends MigrationFailure {
  readonly kind = 'usage';
  override readonly name = 'MigrationError';
}

/** The peer said it failed: SHUT with a non-zero value. */
export class PeerError extends MigrationFailure {
  readonly kind = 'peer';
  override readonly name = 'PeerError';
}

/** migrate_cancel. */
export class CancelledError extends MigrationFailure {
  readonly kind = 'cancelled';
  override readonly name = 'CancelledError';
  constructor(options?: { phase?: MigrationPhase }) {
    super('migration cancelled', options);
  }
}

/** A failure that is none of the above: a bug. The message is the cause's; `cause` keeps its stack. */
export class InternalError extends MigrationFailure {
  readonly kind = 'internal';
  override readonly name = 'InternalError';
}

export function errorMessage(e: unknown): string {
  if (e instanceof Error) return e.message;
  return String(e);
}

/**
 * The error as a member of the family, with its phase: a family member gets
 * `phase` if it has none yet; anything else becomes an InternalError around it.
 */
export function inPhase(e: unknown, phase: MigrationPhase): MigrationFailure {
  const f = e instanceof MigrationFailure ? e : new InternalError(errorMessage(e), { cause: e });
  f.phase ??= phase;
  return f;
}

/**
 * An error thrown by code that validates input with plain `Error`s (a
 * device's load(), say): a plain Error is a rejection of that input, any
 * subclass (TypeError, RangeError...) is a bug. `reject` builds the
 * rejection of the right kind.
 */
export function classifyLoadError(e: unknown, reject: (msg: string, cause: unknown) => MigrationFailure): MigrationFailure {
  if (e instanceof MigrationFailure) return e;
  if (e instanceof Error && e.constructor === Error) return reject(e.message, e);
  return new InternalError(errorMessage(e), { cause: e });
}

