/**
 * Shapes shared by the QMP server and client. `CommandDef` is structurally the
 * same as the one in src/generated/qapi-commands.ts, declared here so that the
 * monitor does not depend on generated code being present.
 */

export interface CommandDef {
  readonly name: string;
  readonly boxed: boolean;
  /** Returns the validated arguments; throws QapiError with QEMU's text. */
  validate(args: unknown): unknown;
}

export interface QmpVersion {
  qemu: { major: number; minor: number; micro: number };
  package: string;
}

export interface QmpGreeting {
  QMP: { version: QmpVersion; capabilities: string[] };
}

export interface QmpTimestamp {
  seconds: number;
  microseconds: number;
}

export interface QmpEventMessage {
  event: string;
  data?: Record<string, unknown>;
  timestamp: QmpTimestamp;
}

export interface QmpErrorBody {
  class: string;
  desc: string;
}

export type QmpReply =
  | { return: unknown; id?: unknown }
  | { error: QmpErrorBody; id?: unknown };

export const DEFAULT_QMP_VERSION: QmpVersion = Object.freeze({
  qemu: Object.freeze({ major: 2, minor: 10, micro: 0 }),
  package: 'ferry',
}) as QmpVersion;
