/**
 * The edge where engine errors become QMP errors. Everything below
 * src/commands/ throws its own typed errors (src/migration/errors.ts: the
 * MigrationFailure family, machine errors as plain Errors); only here do they
 * get a QMP error class. QEMU reports all of them as GenericError with the
 * message as `desc`; an internal error (a bug) is also written to stderr
 * with its stack, so that it is not mistaken for a refusal.
 */
import { MigrationFailure } from '../migration/index.js';
import { QmpError } from '../qapi/errors.js';

export function toQmpError(e: unknown): QmpError {
  if (e instanceof QmpError) return e;
  if (e instanceof MigrationFailure && e.kind === 'internal') {
    const cause = (e as { cause?: unknown }).cause;
    process.stderr.write(`ferry: internal error: ${cause instanceof Error ? cause.stack : e.stack}\n`);
  }
  return new QmpError('GenericError', e instanceof Error ? e.message : String(e));
}

/** Run `fn`, turning engine errors into QMP errors. */
export async function generic<T>(fn: () => T | Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (e) {
    throw toQmpError(e);
  }
}
