/**
 * `ferry inspect [options] FILE`: what a migration stream holds, section by
 * section, as QEMU's scripts/analyze-migration.py shows it. The stream is
 * read through the destination's own loading loop, so a stream this command
 * accepts is one a Ferry destination accepts (bar its machine's sizes and
 * devices), and a stream it rejects gets the destination's error text.
 *
 *   ferry inspect mig.bin                 one line per section and command
 *   ferry inspect --records mig.bin       every RAM record as well
 *   ferry inspect --desc mig.bin          the vmdesc JSON as well
 *   ferry inspect --json mig.bin          everything as JSON (page data left out)
 *   ferry inspect --no-config dev.bin     a xen-save-devices-state file (no configuration record)
 *   qemu ... -incoming 'exec:cat' | ...   or read stdin with FILE '-'
 */
import { createReadStream } from 'node:fs';
import { strerror } from '../migration/channel/errors.js';
import { formatInspection, inspectStream, type InspectedRecord } from '../migration/index.js';

const USAGE = `usage: ferry inspect [--records] [--desc] [--json] [--no-config] [--device-size IDSTR=BYTES]... FILE|-
`;

export async function main(argv: string[]): Promise<number> {
  const opts = { records: false, desc: false, json: false, configuration: true };
  const deviceSizes: Record<string, number> = {};
  let file: string | undefined;
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === '--records') opts.records = true;
    else if (a === '--desc') opts.desc = true;
    else if (a === '--json') opts.json = true;
    else if (a === '--no-config') opts.configuration = false;
    else if (a === '--device-size') {
      const m = /^([^=]+)=(\d+)$/.exec(argv[++i] ?? '');
      if (!m) return usage('--device-size takes IDSTR=BYTES');
      deviceSizes[m[1]!] = Number(m[2]);
    } else if (a === '-h' || a === '--help') {
      process.stdout.write(USAGE);
      return 0;
    } else if (a.startsWith('--')) return usage(`unknown option '${a}'`);
    else if (file === undefined) file = a;
    else return usage('only one FILE');
  }
  if (file === undefined) return usage('FILE is missing');
  // `ferry inspect f | head` closes our stdout early: that is not an error
  process.stdout.on('error', (e: NodeJS.ErrnoException) => {
    if (e.code === 'EPIPE') process.exit(0);
    throw e;
  });
  const input = file === '-' ? process.stdin : createReadStream(file);
  const opened = new Promise<void>((resolve, reject) => {
    if (file === '-') return resolve();
    input.once('open', () => resolve());
    input.once('error', reject);
  });
  try {
    await opened;
  } catch (e) {
    process.stderr.write(`ferry inspect: Could not open '${file}': ${strerror(e)}\n`);
    return 1;
  }
  try {
    const keepRecords = opts.records;
    const { records } = await inspectStream(input, { configuration: opts.configuration, deviceSizes, keepRecords });
    if (opts.json) process.stdout.write(JSON.stringify(records.map(forJson), null, 2) + '\n');
    else process.stdout.write(formatInspection(records, opts) + '\n');
    return 0;
  } catch (e) {
    process.stderr.write(`ferry inspect: ${file}: ${(e as Error).message}\n`);
    return 1;
  }
}

function usage(msg: string): number {
  process.stderr.write(`ferry inspect: ${msg}\n${USAGE}`);
  return 1;
}

/** Page data and payloads as lengths; the vmdesc as its parsed value. */
function forJson(r: InspectedRecord): unknown {
  if (r.type === 'section') {
    const { payload, ram, ...rest } = r;
    return {
      ...rest,
      ...(payload !== undefined ? { payloadBytes: payload.length } : {}),
      ...(ram && ram.length > 0 ? { ram: ram.map((x) => ('data' in x ? { ...x, data: x.data.length } : x)) } : {}),
    };
  }
  if (r.type === 'command') return { ...r, command: r.command.cmd === 'PACKAGED' ? { cmd: 'PACKAGED', length: r.command.length } : r.command, ...(r.body ? { body: r.body.map(forJson) } : {}) };
  if (r.type === 'vmdesc') return { type: 'vmdesc', at: r.at, value: r.value };
  return r;
}
