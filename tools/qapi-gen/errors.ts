/** Where something was found in the schema sources. */
export interface SourceInfo {
  /** File name as shown in messages (relative to the display base). */
  readonly file: string;
  /** 1-based line number. */
  readonly line: number;
}

/** A schema error; its message reads `FILE:LINE: text`. */
export class QapiSchemaError extends Error {
  constructor(
    readonly info: SourceInfo,
    readonly text: string,
  ) {
    super(`${info.file}:${info.line}: ${text}`);
    this.name = 'QapiSchemaError';
  }
}
