/**
 * Parsers for the `-workload` and `-fill` option strings, for the CLI:
 *   idle
 *   sweep[,start=SIZE][,end=SIZE][,steps=N]
 *   stress[,rate=SIZE][,wss=SIZE][,start=SIZE][,write=BYTES][,seed=N][,steps=N][,read=on|off]
 *   zero | random[,seed=N] | text[,seed=N]
 *   (-disk-workload) drive=NAME[,rate=SIZE][,wss=SIZE][,start=SIZE][,write=SIZE][,seed=N][,steps=N][,read=on|off]
 */
import { parseSize } from '../base/size.js';
import type { DiskWorkloadConfig } from './disk-workload.js';
import type { FillConfig, WorkloadConfig } from './types.js';

function splitOpts(spec: string, what: string): { head: string; opts: Map<string, string> } {
  const parts = spec.split(',');
  return { head: parts[0]!.trim(), opts: keyValues(parts.slice(1), what) };
}

function keyValues(parts: readonly string[], what: string): Map<string, string> {
  const opts = new Map<string, string>();
  for (const p of parts) {
    const eq = p.indexOf('=');
    if (eq <= 0) throw new Error(`Invalid ${what} option '${p}': expected key=value`);
    const k = p.slice(0, eq).trim();
    if (opts.has(k)) throw new Error(`Duplicate ${what} option '${k}'`);
    opts.set(k, p.slice(eq + 1).trim());
  }
  return opts;
}

function parseOnOff(v: string, what: string): boolean {
  if (v !== 'on' && v !== 'off') throw new Error(`Invalid ${what} '${v}': expected on or off`);
  return v === 'on';
}

function parseUint(s: string, what: string, max = Number.MAX_SAFE_INTEGER): number {
  if (!/^\d+$/.test(s)) throw new Error(`Invalid ${what} '${s}': expected a non-negative integer`);
  const v = Number(s);
  if (v > max) throw new Error(`Invalid ${what} '${s}': maximum is ${max}`);
  return v;
}

function onlyKeys(opts: Map<string, string>, allowed: string[], what: string): void {
  for (const k of opts.keys()) {
    if (!allowed.includes(k)) {
      throw new Error(`Unknown ${what} option '${k}' (allowed: ${allowed.join(', ') || 'none'})`);
    }
  }
}

export function parseWorkload(spec: string): WorkloadConfig {
  const { head, opts } = splitOpts(spec, 'workload');
  switch (head) {
    case 'idle':
      onlyKeys(opts, [], 'workload idle');
      return { kind: 'idle' };
    case 'sweep': {
      onlyKeys(opts, ['start', 'end', 'steps'], 'workload sweep');
      const w: WorkloadConfig = { kind: 'sweep' };
      if (opts.has('start')) w.start = parseSize(opts.get('start')!, 'sweep start');
      if (opts.has('end')) w.end = parseSize(opts.get('end')!, 'sweep end');
      if (opts.has('steps')) w.steps = parseUint(opts.get('steps')!, 'steps');
      return w;
    }
    case 'stress': {
      onlyKeys(opts, ['rate', 'wss', 'start', 'write', 'seed', 'steps', 'read'], 'workload stress');
      const w: WorkloadConfig = { kind: 'stress' };
      if (opts.has('rate')) w.rate = parseSize(opts.get('rate')!, 'stress rate');
      if (opts.has('wss')) w.wss = parseSize(opts.get('wss')!, 'stress wss');
      if (opts.has('start')) w.start = parseSize(opts.get('start')!, 'stress start');
      if (opts.has('write')) w.write = parseSize(opts.get('write')!, 'stress write');
      if (opts.has('seed')) w.seed = parseUint(opts.get('seed')!, 'seed', 0xffffffff);
      if (opts.has('steps')) w.steps = parseUint(opts.get('steps')!, 'steps');
      if (opts.has('read') && parseOnOff(opts.get('read')!, 'stress read')) w.read = true;
      return w;
    }
    default:
      throw new Error(`Unknown workload '${head}' (expected idle, sweep or stress)`);
  }
}

export function parseFill(spec: string): FillConfig {
  const { head, opts } = splitOpts(spec, 'fill');
  if (head !== 'zero' && head !== 'random' && head !== 'text') {
    throw new Error(`Unknown fill '${head}' (expected zero, random or text)`);
  }
  onlyKeys(opts, ['seed'], 'fill');
  const f: FillConfig = { kind: head };
  if (opts.has('seed')) f.seed = parseUint(opts.get('seed')!, 'seed', 0xffffffff);
  return f;
}

/**
 * `-disk-workload drive=NAME[,rate=SIZE][,wss=SIZE][,start=SIZE][,write=SIZE][,seed=N][,steps=N][,read=on|off]`:
 * sizes take the K/M/G suffixes (rate is bytes per second of virtual time).
 * The values are checked against the drive by the machine.
 */
export function parseDiskWorkload(spec: string): DiskWorkloadConfig {
  const opts = keyValues(spec.split(','), 'disk workload');
  onlyKeys(opts, ['drive', 'rate', 'wss', 'start', 'write', 'seed', 'steps', 'read'], 'disk workload');
  const drive = opts.get('drive');
  if (drive === undefined || drive === '') throw new Error("Parameter 'drive' is missing (the drive's name, as query-block shows it)");
  const w: DiskWorkloadConfig = { drive };
  if (opts.has('rate')) w.rate = parseSize(opts.get('rate')!, 'disk workload rate');
  if (opts.has('wss')) w.wss = parseSize(opts.get('wss')!, 'disk workload wss');
  if (opts.has('start')) w.start = parseSize(opts.get('start')!, 'disk workload start');
  if (opts.has('write')) w.write = parseSize(opts.get('write')!, 'disk workload write');
  if (opts.has('seed')) w.seed = parseUint(opts.get('seed')!, 'seed', 0xffffffff);
  if (opts.has('steps')) w.steps = parseUint(opts.get('steps')!, 'steps');
  if (opts.has('read') && parseOnOff(opts.get('read')!, 'disk workload read')) w.read = true;
  return w;
}

/** Canonical string form of a workload (for logs and `info`). */
export function formatWorkload(w: WorkloadConfig): string {
  const parts: string[] = [w.kind];
  for (const [k, v] of Object.entries(w)) {
    if (k === 'kind' || v === undefined) continue;
    parts.push(`${k}=${typeof v === 'boolean' ? (v ? 'on' : 'off') : v}`);
  }
  return parts.join(',');
}
