/**
 * A migration failure with a QEMU-style, user-facing message. The commands
 * layer turns it into a GenericError; the state machines store the message as
 * error-desc.
 */
export class MigrationError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'MigrationError';
  }
}

export function errorMessage(e: unknown): string {
  if (e instanceof Error) return e.message;
  return String(e);
}
