/**
 * `ferry qmp SOCKET [command [key=value ...]]`
 *
 * SOCKET: a unix socket path, unix:PATH, or tcp:HOST:PORT.
 * One-shot: run the command, print `return` as pretty JSON, exit 0; on a QMP
 * error print `error: <class>: <desc>` on stderr and exit 1.
 * Interactive (no command): read lines `command key=value ...` or raw JSON
 * `{...}` from stdin; print replies and events as they arrive; exit on EOF.
 */
import * as readline from 'node:readline';
import type { Readable, Writable } from 'node:stream';
import { QmpConnection, isQmpError } from '../client/index.js';
import type { QmpClient } from '../qmp/client.js';
import { toQmpJson } from '../qmp/json.js';

export interface QmpCliIo {
  stdin?: Readable;
  stdout?: Writable;
  stderr?: Writable;
}

const USAGE = `usage: ferry qmp SOCKET [command [key=value ...]]
  SOCKET    unix socket path, unix:PATH or tcp:HOST:PORT
  command   QMP command to run once; without it, read commands from stdin:
            "command key=value ..." or raw JSON "{...}", one per line
  key=value value is JSON if it parses as JSON (numbers, true, false, null,
            arrays, objects, "quoted strings"), else a string; a.b=1 nests
`;

export class ArgError extends Error {}

function parseValue(v: string): unknown {
  try {
    return JSON.parse(v);
  } catch {
    return v;
  }
}

/** Turn ["a=1", "b.c=x"] into {a: 1, b: {c: "x"}}. */
export function parseKeyValues(pairs: readonly string[]): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const p of pairs) {
    const eq = p.indexOf('=');
    if (eq <= 0) throw new ArgError(`expected key=value, got '${p}'`);
    const key = p.slice(0, eq);
    const value = parseValue(p.slice(eq + 1));
    const path = key.split('.');
    if (path.some((k) => k === '')) throw new ArgError(`bad key '${key}'`);
    let o: Record<string, unknown> = out;
    for (let i = 0; i < path.length - 1; i++) {
      const k = path[i]!;
      const cur = Object.prototype.hasOwnProperty.call(o, k) ? o[k] : undefined;
      if (cur === undefined) {
        const n: Record<string, unknown> = {};
        Object.defineProperty(o, k, { value: n, enumerable: true, writable: true, configurable: true });
        o = n;
      } else if (typeof cur === 'object' && cur !== null && !Array.isArray(cur)) {
        o = cur as Record<string, unknown>;
      } else {
        throw new ArgError(`key '${path.slice(0, i + 1).join('.')}' is both a value and an object`);
      }
    }
    const last = path[path.length - 1]!;
    if (Object.prototype.hasOwnProperty.call(o, last)) throw new ArgError(`key '${key}' given twice`);
    Object.defineProperty(o, last, { value, enumerable: true, writable: true, configurable: true });
  }
  return out;
}

/** Split a line into words; '…' and "…" group, backslash escapes. */
export function splitWords(line: string): string[] {
  const words: string[] = [];
  let cur = '';
  let inWord = false;
  let quote: string | null = null;
  for (let i = 0; i < line.length; i++) {
    const c = line[i]!;
    if (quote) {
      if (c === quote) quote = null;
      else if (c === '\\' && quote === '"' && i + 1 < line.length) cur += line[++i];
      else cur += c;
      continue;
    }
    if (c === "'" || c === '"') {
      quote = c;
      inWord = true;
    } else if (c === '\\' && i + 1 < line.length) {
      cur += line[++i];
      inWord = true;
    } else if (/\s/.test(c)) {
      if (inWord) words.push(cur);
      cur = '';
      inWord = false;
    } else {
      cur += c;
      inWord = true;
    }
  }
  if (quote) throw new ArgError('unterminated quote');
  if (inWord) words.push(cur);
  return words;
}

function pretty(v: unknown): string {
  // via the QMP serializer's parse-compatible text, then indented
  return JSON.stringify(JSON.parse(toQmpJson(v)), null, 2);
}

export async function main(argv: string[], io: QmpCliIo = {}): Promise<number> {
  const stdout = io.stdout ?? process.stdout;
  const stderr = io.stderr ?? process.stderr;
  const stdin = io.stdin ?? process.stdin;
  const out = (s: string) => stdout.write(s + '\n');
  const err = (s: string) => stderr.write(s + '\n');

  if (argv[0] === '-h' || argv[0] === '--help') {
    stdout.write(USAGE);
    return 0;
  }
  if (argv.length < 1) {
    stderr.write(USAGE);
    return 2;
  }
  const [target, command, ...rest] = argv as [string, string | undefined, ...string[]];
  let oneShotArgs: Record<string, unknown> | undefined;
  if (command !== undefined) {
    try {
      oneShotArgs = rest.length ? parseKeyValues(rest) : undefined;
    } catch (e) {
      err(`ferry qmp: ${(e as Error).message}`);
      return 2;
    }
  }

  // the typed client (ferry/client); any command name goes through executeRaw
  let conn: QmpConnection;
  try {
    conn = await QmpConnection.connect(target);
  } catch (e) {
    err(`ferry qmp: ${isQmpError(e) ? `error: ${e.errorClass}: ${e.desc}` : (e as Error).message}`);
    return 1;
  }

  if (command !== undefined) {
    try {
      const ret = await conn.executeRaw(command, oneShotArgs);
      out(pretty(ret));
      return 0;
    } catch (e) {
      if (isQmpError(e)) err(`error: ${e.errorClass}: ${e.desc}`);
      else err(`ferry qmp: ${(e as Error).message}`);
      return 1;
    } finally {
      await conn.close();
    }
  }
  return interactive(conn.raw, stdin, stdout, out, err);
}

async function interactive(
  client: QmpClient,
  stdin: Readable,
  stdout: Writable,
  out: (s: string) => void,
  err: (s: string) => void,
): Promise<number> {
  const tty = (stdin as { isTTY?: boolean }).isTTY === true;
  const prompt = tty ? '(qmp) ' : '';
  client.events.on('event', (ev) => out(toQmpJson(ev)));
  client.messages.on('reply', (r) => out(toQmpJson(r)));
  let serverGone = false;
  void client.closed.then(() => {
    serverGone = true;
  });

  const rl = readline.createInterface({ input: stdin, output: tty ? stdout : undefined, terminal: tty });
  if (tty) {
    rl.setPrompt(prompt);
    rl.prompt();
  }
  let sentRaw = false;
  let failures = 0;
  for await (const lineRaw of rl) {
    const line = lineRaw.trim();
    if (serverGone) break;
    if (line === '' || line.startsWith('#')) {
      if (tty) rl.prompt();
      continue;
    }
    if (line.startsWith('{') || line.startsWith('[')) {
      client.sendRaw(line + '\n');
      sentRaw = true;
      if (tty) {
        // give the reply a moment so the prompt comes after it
        await new Promise((r) => setTimeout(r, 50));
        rl.prompt();
      }
      continue;
    }
    let words: string[];
    let args: Record<string, unknown> | undefined;
    try {
      words = splitWords(line);
      args = words.length > 1 ? parseKeyValues(words.slice(1)) : undefined;
    } catch (e) {
      err(`ferry qmp: ${(e as Error).message}`);
      if (tty) rl.prompt();
      continue;
    }
    try {
      const ret = await client.execute(words[0]!, args);
      out(pretty(ret));
    } catch (e) {
      failures++;
      if (isQmpError(e)) err(`error: ${e.errorClass}: ${e.desc}`);
      else {
        err(`ferry qmp: ${(e as Error).message}`);
        if (client.isClosed) break;
      }
    }
    if (tty) rl.prompt();
  }
  rl.close();
  if (client.isClosed) {
    err('ferry qmp: connection closed by the monitor');
    return 1;
  }
  if (sentRaw) {
    // Replies come in order: once a marker command is answered, every raw
    // request before it has been answered too (unless it was left unclosed).
    await client
      .execute('ferry-qmp-sync-marker', undefined, { timeoutMs: 2000 })
      .catch(() => undefined);
  }
  await client.close();
  void failures;
  return 0;
}
