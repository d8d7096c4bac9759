/** QMP error classes (QEMU 2.10 defines exactly these five: QapiErrorClass in qapi/common.json). */
export type QmpErrorClass = import('../generated/qapi-types.js').QapiErrorClass;

/**
 * An error that reaches a QMP client as {"error": {"class", "desc"}}.
 * Thrown by argument validation (always GenericError) and by command handlers.
 */
export class QmpError extends Error {
  constructor(
    readonly errorClass: QmpErrorClass,
    readonly desc: string,
  ) {
    super(desc);
    this.name = 'QmpError';
  }
}

/** Argument validation failure; always a GenericError on the wire. */
export class QapiError extends QmpError {
  constructor(desc: string) {
    super('GenericError', desc);
    this.name = 'QapiError';
  }
}
