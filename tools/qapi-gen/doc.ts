/**
 * Documentation blocks: the `##` … `##` comment blocks of the schema.
 *
 * A block that starts with `@Name:` documents the definition that follows
 * it. Inside, `@member: text` lines describe members (or enum values), and
 * lines such as `Returns:`, `Since:`, `Example:` or `Notes:` open sections.
 * Any other block is free-form text; a first line `= Title` is a heading.
 */
import { QapiSchemaError, type SourceInfo } from './errors.js';

export interface DocSection {
  readonly name: string;
  /** Section text; for examples the lines are kept verbatim. */
  readonly text: string;
}

export interface DocBlock {
  readonly info: SourceInfo;
  /** The documented definition, or undefined for free-form text. */
  readonly symbol?: string;
  /** Heading text and level (1 for `=`, 2 for `==`) of a free-form block. */
  readonly heading?: { readonly level: number; readonly text: string };
  /** Body paragraphs (lines joined with '\n'; paragraphs separated by blank lines). */
  readonly body: string;
  /** Member/value descriptions in source order. */
  readonly args: ReadonlyMap<string, string>;
  readonly sections: readonly DocSection[];
}

const SECTION = /^(Returns|Since|Example|Examples|Note|Notes|TODO|Features|Errors):\s*(.*)$/;

export function parseDocBlock(lines: readonly string[], info: SourceInfo): DocBlock {
  let i = 0;
  let symbol: string | undefined;
  let heading: { level: number; text: string } | undefined;
  const first = lines[0] ?? '';
  const sym = /^@([^\s:]+):\s*$/.exec(first);
  if (sym) {
    symbol = sym[1]!;
    i = 1;
  } else if (first.startsWith('@')) {
    throw new QapiSchemaError({ file: info.file, line: info.line + 1 }, `definition documentation must start with '@NAME:' on a line of its own`);
  } else {
    const h = /^(=+)\s+(.*)$/.exec(first);
    if (h) {
      heading = { level: h[1]!.length, text: h[2]!.trim() };
      i = 1;
    }
  }
  const body: string[] = [];
  const args = new Map<string, string[]>();
  const sections: Array<{ name: string; lines: string[] }> = [];
  type State = { k: 'body' } | { k: 'arg'; lines: string[] } | { k: 'section'; s: { name: string; lines: string[] } };
  let st: State = { k: 'body' };
  for (; i < lines.length; i++) {
    const line = lines[i]!;
    const lineNo = info.line + 1 + i;
    const verbatim: boolean = st.k === 'section' && /^Examples?$/.test(st.s.name);
    const sec = SECTION.exec(line);
    if (sec) {
      const s = { name: sec[1]!, lines: sec[2] ? [sec[2]] : [] };
      sections.push(s);
      st = { k: 'section', s };
      continue;
    }
    const arg: RegExpExecArray | null = !verbatim && symbol !== undefined ? /^@([^\s:]+):\s*(.*)$/.exec(line) : null;
    if (arg) {
      const name = arg[1]!;
      if (args.has(name)) throw new QapiSchemaError({ file: info.file, line: lineNo }, `'${name}' is documented twice`);
      const l: string[] = arg[2] ? [arg[2]] : [];
      args.set(name, l);
      st = { k: 'arg', lines: l };
      continue;
    }
    if (line.trim() === '') {
      if (st.k === 'arg') st = { k: 'body' };
      else if (st.k === 'section') st.s.lines.push('');
      else body.push('');
      continue;
    }
    if (st.k === 'arg') st.lines.push(line.trim());
    else if (st.k === 'section') st.s.lines.push(verbatim ? line : line.trim());
    else body.push(line);
  }
  const trimBlank = (ls: string[]): string[] => {
    let a = 0;
    let b = ls.length;
    while (a < b && ls[a]!.trim() === '') a++;
    while (b > a && ls[b - 1]!.trim() === '') b--;
    return ls.slice(a, b);
  };
  const out: DocBlock = {
    info,
    body: collapseBlank(trimBlank(body)).join('\n'),
    args: new Map([...args].map(([k, v]) => [k, v.join('\n')])),
    sections: sections.map((s) => ({ name: s.name, text: trimBlank(s.lines).join('\n') })),
    ...(symbol !== undefined ? { symbol } : {}),
    ...(heading ? { heading } : {}),
  };
  return out;
}

function collapseBlank(ls: string[]): string[] {
  const out: string[] = [];
  for (const l of ls) {
    if (l.trim() === '' && out.length > 0 && out[out.length - 1]!.trim() === '') continue;
    out.push(l);
  }
  return out;
}

/** Text of the first section with one of the given names, if any. */
export function docSection(doc: DocBlock | undefined, ...names: string[]): string | undefined {
  return doc?.sections.find((s) => names.includes(s.name))?.text;
}
