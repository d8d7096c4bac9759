/** Backend: src/generated/qapi-events.ts, a typed emitter per event. */
import type { Schema } from './schema.js';
import { argsTsType } from './gen-commands.js';
import { defDocText, header, jsdoc, quote } from './util.js';

export function genEvents(schema: Schema, source: string): string {
  const evs = schema.events;
  let out = header(source, 'typed event emitters');
  out += `import type * as T from './qapi-types.js';\n\n`;
  out += `/** Data of each event (\`undefined\` for events without data). */\n`;
  out += `export interface EventData {\n`;
  for (const e of evs) out += `  ${quote(e.name)}: ${e.args ? argsTsType(schema, e, 'T.', '  ') : 'undefined'};\n`;
  out += `}\n\n`;
  out += `/** Names of all events. */\nexport type EventName = keyof EventData;\n\n`;
  out += `/** Every event name, in schema order. */\n`;
  out += `export const EVENT_NAMES: readonly EventName[] = [${evs.map((e) => quote(e.name)).join(', ')}];\n\n`;
  out += `/**\n * Typed front end of an event sink: each method passes its event name and\n * data (a shallow copy; none for events without data) to \`emit\`.\n */\n`;
  out += `export class QapiEvents {\n`;
  out += `  constructor(private readonly emit: (name: string, data?: Record<string, unknown>) => void) {}\n`;
  for (const e of evs) {
    out += '\n' + jsdoc(defDocText(e), '  ');
    if (e.args) {
      out += `  ${e.name}(data: EventData[${quote(e.name)}]): void {\n`;
      out += `    this.emit(${quote(e.name)}, { ...(data as unknown as Record<string, unknown>) });\n  }\n`;
    } else {
      out += `  ${e.name}(): void {\n    this.emit(${quote(e.name)});\n  }\n`;
    }
  }
  out += `}\n`;
  return out;
}
