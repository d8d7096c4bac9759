/**
 * docs/reliability.md is written by the suites: each owns the text between
 * `<!-- NAME:begin -->` and `<!-- NAME:end -->` and replaces it when it ran
 * whole. The rest of the page is prose kept by hand.
 */
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { REPO_ROOT } from '../helpers/vm.js';

export const RELIABILITY_DOC = join(REPO_ROOT, 'docs', 'reliability.md');

export function writeSection(name: string, markdown: string, file = RELIABILITY_DOC): void {
  const begin = `<!-- ${name}:begin (generated, do not edit) -->`;
  const end = `<!-- ${name}:end -->`;
  const text = existsSync(file) ? readFileSync(file, 'utf8') : '# Reliability\n';
  const block = `${begin}\n${markdown.trim()}\n${end}`;
  const i = text.indexOf(begin);
  const j = text.indexOf(end);
  const next = i >= 0 && j > i ? text.slice(0, i) + block + text.slice(j + end.length) : `${text.trimEnd()}\n\n${block}\n`;
  if (next !== text) writeFileSync(file, next);
}
