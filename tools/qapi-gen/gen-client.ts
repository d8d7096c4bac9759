/**
 * Backend: src/generated/qapi-client.ts, the typed QMP client. One method
 * per command (camelCase of its name) with the schema's argument and
 * return types, typed events (`on`, `waitEvent`) and the error classes.
 * It runs over any QmpTransport (src/client/ adapts src/qmp/client.ts).
 */
import { QapiSchemaError } from './errors.js';
import type { CommandDef, Schema } from './schema.js';
import { defDocText, header, jsdoc, quote } from './util.js';

/** 'x-query-memory-digest' → 'xQueryMemoryDigest', 'qmp_capabilities' → 'qmpCapabilities'. */
export function methodName(command: string): string {
  const words = command.split(/[-_]+/).filter((w) => w !== '');
  return words.map((w, i) => (i === 0 ? w : w.charAt(0).toUpperCase() + w.slice(1))).join('');
}

/** Methods of QmpApi that are not commands. */
const RESERVED = new Set(['execute', 'executeRaw', 'on', 'waitEvent', 'transport', 'constructor', 'call']);

/** Whether a command can be called without arguments (none, or all optional). */
function argsOptional(schema: Schema, c: CommandDef): boolean {
  if (!c.args) return true;
  const t = schema.type(c.args);
  if (t.meta !== 'struct') return false;
  return schema.allMembers(t.name).every((m) => m.optional);
}

export function genClient(schema: Schema, source: string): string {
  const seen = new Map<string, string>();
  for (const c of schema.commands) {
    const m = methodName(c.name);
    if (RESERVED.has(m)) throw new QapiSchemaError(c.info, `command '${c.name}' would be client method '${m}', which is reserved`);
    const other = seen.get(m);
    if (other !== undefined) throw new QapiSchemaError(c.info, `commands '${other}' and '${c.name}' would both be client method '${m}'`);
    seen.set(m, c.name);
  }
  const errorEnum = schema.defs.get('QapiErrorClass');
  let out = header(source, 'typed QMP client');
  out += `import type * as T from './qapi-types.js';\n`;
  out += `import type { CommandArgs, CommandName, CommandReturns } from './qapi-commands.js';\n`;
  out += `import type { EventData, EventName } from './qapi-events.js';\n\n`;
  out += `export type { CommandArgs, CommandName, CommandReturns, EventData, EventName };\n\n`;

  out += `/** The error classes a command can fail with (QapiErrorClass). */\n`;
  if (errorEnum && errorEnum.meta === 'enum') {
    out += `export type QmpErrorClass = T.QapiErrorClass;\n`;
    out += `export const QMP_ERROR_CLASSES: readonly QmpErrorClass[] = [${errorEnum.values.map(quote).join(', ')}];\n\n`;
  } else {
    out += `export type QmpErrorClass = string;\nexport const QMP_ERROR_CLASSES: readonly QmpErrorClass[] = [];\n\n`;
  }

  out += `/** Per-call options a transport understands. */\n`;
  out += `export interface QmpCallOptions {\n  /** reject when no answer came in time */\n  timeoutMs?: number;\n  /** descriptors passed with the command (SCM_RIGHTS) */\n  fds?: number[];\n}\n\n`;
  out += `/** An event as it arrives. */\nexport interface QmpRawEvent {\n  event: string;\n  data?: unknown;\n  timestamp: { seconds: number; microseconds: number };\n}\n\n`;
  out += `/** One event with its schema-typed data. */\n`;
  out += `export interface QmpEventOf<E extends EventName> {\n  event: E;\n  data: EventData[E];\n  timestamp: { seconds: number; microseconds: number };\n}\n\n`;
  out += `/** Any event of the schema. */\nexport type QmpAnyEvent = { [E in EventName]: QmpEventOf<E> }[EventName];\n\n`;
  out += `/**\n * What the client needs of a QMP connection: run a command (resolving\n * with \`return\`, rejecting with a QmpCommandError-like error that has\n * \`errorClass\` and \`desc\`) and deliver events.\n */\n`;
  out += `export interface QmpTransport {\n  execute(command: string, args?: object, opts?: QmpCallOptions): Promise<unknown>;\n`;
  out += `  /** Calls \`listener\` for every event from now on; returns the unsubscribe function. */\n  subscribe(listener: (ev: QmpRawEvent) => void): () => void;\n`;
  out += `  /** Resolves when the connection closed. */\n  readonly closed: Promise<void>;\n}\n\n`;
  out += `/** An error with a QMP error class (what a transport rejects with when the command failed). */\n`;
  out += `export interface QmpErrorLike {\n  errorClass: string;\n  desc: string;\n  command?: string;\n}\n\n`;
  out += `/** Whether \`e\` is a command's error answer (of class \`cls\`, when given). */\n`;
  out += `export function isQmpError(e: unknown, cls?: QmpErrorClass): e is Error & QmpErrorLike & { errorClass: QmpErrorClass } {\n`;
  out += `  if (!(e instanceof Error)) return false;\n  const x = e as Partial<QmpErrorLike>;\n`;
  out += `  return typeof x.errorClass === 'string' && typeof x.desc === 'string' && (cls === undefined || x.errorClass === cls);\n}\n\n`;

  out += `/**\n * The typed QMP client: one method per command of the schema, typed\n * events and errors. Commands a peer does not have (a QEMU answering a\n * Ferry extension) fail with CommandNotFound, as any client would see.\n */\n`;
  out += `export class QmpApi {\n  constructor(readonly transport: QmpTransport) {}\n\n`;
  out += `  /** Run a command by name, typed by the schema. */\n`;
  out += `  execute<C extends CommandName>(command: C, args?: CommandArgs[C], opts?: QmpCallOptions): Promise<CommandReturns[C]> {\n`;
  out += `    return this.transport.execute(command, args as object | undefined, opts) as Promise<CommandReturns[C]>;\n  }\n\n`;
  out += `  /** Run any command, named or not in the schema (answers are not typed). */\n`;
  out += `  executeRaw(command: string, args?: object, opts?: QmpCallOptions): Promise<unknown> {\n    return this.transport.execute(command, args, opts);\n  }\n\n`;
  out += `  /** Listen for one event (from now on); returns the unsubscribe function. */\n`;
  out += `  on<E extends EventName>(event: E, listener: (ev: QmpEventOf<E>) => void): () => void {\n`;
  out += `    return this.transport.subscribe((ev) => {\n      if (ev.event === event) listener(ev as QmpEventOf<E>);\n    });\n  }\n\n`;
  out += `  /** The next event \`event\` (that \`predicate\` accepts); rejects after \`timeoutMs\` (default 10 s) or when the connection closes. */\n`;
  out += `  waitEvent<E extends EventName>(event: E, opts: { predicate?: (ev: QmpEventOf<E>) => boolean; timeoutMs?: number } = {}): Promise<QmpEventOf<E>> {\n`;
  out += `    const timeoutMs = opts.timeoutMs ?? 10000;\n`;
  out += `    return new Promise<QmpEventOf<E>>((resolve, reject) => {\n`;
  out += `      let done = false;\n`;
  out += `      const finish = (): void => {\n        done = true;\n        clearTimeout(timer);\n        off();\n      };\n`;
  out += `      const timer = setTimeout(() => {\n        finish();\n        reject(new Error(\`timed out after \${timeoutMs} ms waiting for event \${event}\`));\n      }, timeoutMs);\n`;
  out += `      const off = this.on(event, (ev) => {\n        if (done || (opts.predicate && !opts.predicate(ev))) return;\n        finish();\n        resolve(ev);\n      });\n`;
  out += `      void this.transport.closed.then(() => {\n        if (done) return;\n        finish();\n        reject(new Error(\`QMP connection closed while waiting for event \${event}\`));\n      });\n`;
  out += `    });\n  }\n`;
  for (const c of schema.commands) {
    const m = methodName(c.name);
    const q = quote(c.name);
    out += '\n' + jsdoc(defDocText(c), '  ');
    if (!c.args) {
      out += `  ${m}(opts?: QmpCallOptions): Promise<CommandReturns[${q}]> {\n    return this.execute(${q}, undefined, opts);\n  }\n`;
    } else {
      const opt = argsOptional(schema, c) ? '?' : '';
      out += `  ${m}(args${opt}: CommandArgs[${q}], opts?: QmpCallOptions): Promise<CommandReturns[${q}]> {\n    return this.execute(${q}, args, opts);\n  }\n`;
    }
  }
  out += `}\n`;
  return out;
}
