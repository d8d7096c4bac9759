/**
 * Soak: N back-to-back ping-pong migrations of one guest under a stress
 * workload, alternating capabilities, in one long-lived process (so that
 * its RSS and descriptors show any leak of the engine). Each round migrates
 * the running guest from its owner to a fresh destination machine over a
 * unix socket (the real transport), checks that the destination's memory
 * digest equals the source's at switchover (the destination stays paused
 * until then), starts the destination and destroys the old owner.
 *
 *   npm run soak [-- --rounds 1000 --mem 16] (or npm run bench -- soak ...)
 *
 * Writes bench/results/soak.json. The machines run in this process (the
 * in-process pair of test/helpers/pair.ts); `ferry vm` processes would live
 * for one round each, hiding any growth.
 */
import { mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Machine, type MachineConfig } from '../src/machine/index.js';
import { MigrationDestination, MigrationOptions, MigrationSource, RAM_SECTION, SectionRegistry, machinePort } from '../src/migration/index.js';
import type { MigrationCapability } from '../src/generated/qapi-types.js';

/** The capability sets the rounds cycle through. */
export const CAPS: MigrationCapability[][] = [
  [],
  ['xbzrle'],
  ['compress'],
  ['return-path'],
  ['auto-converge'],
  ['postcopy-ram', 'return-path'],
  ['xbzrle', 'return-path', 'auto-converge'],
  ['compress', 'return-path'],
];

export interface SoakOptions {
  rounds: number;
  ramMiB: number;
  /** called after each round */
  progress?: (r: RoundResult) => void;
}

export interface RoundResult {
  round: number;
  caps: string;
  ms: number;
  digest: string;
  same: boolean;
  rssMiB: number;
  fds: number;
}

export interface SoakResult {
  rounds: number;
  ramMiB: number;
  failures: string[];
  /** RSS and descriptors after the first tenth of the rounds (warm-up) and at the end */
  rss: { warm: number; end: number; max: number };
  fds: { warm: number; end: number; max: number };
  msMedian: number;
  perRound: RoundResult[];
}

const rssMiB = (): number => Number(/VmRSS:\s+(\d+)/.exec(readFileSync('/proc/self/status', 'utf8'))![1]) / 1024;
const fdCount = (): number => readdirSync('/proc/self/fd').length;

function options(caps: MigrationCapability[], source: boolean): MigrationOptions {
  const o = new MigrationOptions();
  if (caps.length) o.setCapabilities(caps.map((capability) => ({ capability, state: true })));
  if (source) o.setParameters({ 'max-bandwidth': 0, 'downtime-limit': 300 });
  return o;
}

function deps() {
  return { lookupFd: () => undefined, sections: new SectionRegistry([RAM_SECTION]), log: () => undefined };
}

export async function runSoak(opts: SoakOptions): Promise<SoakResult> {
  const dir = mkdtempSync(join(tmpdir(), 'ferry-soak-'));
  const guest = { ramSize: opts.ramMiB << 20, smp: 1 } satisfies Partial<MachineConfig>;
  let owner = await Machine.create({ ...guest, fill: { kind: 'random', seed: 5 }, workload: { kind: 'stress', rate: 8 << 20, wss: 2 << 20, start: 0, seed: 9 } });
  const perRound: RoundResult[] = [];
  const failures: string[] = [];
  try {
    for (let round = 0; round < opts.rounds; round++) {
      const caps = CAPS[round % CAPS.length]!;
      const t0 = performance.now();
      const dst = await Machine.create({ ...guest, incoming: true });
      const destination = new MigrationDestination(machinePort(dst, { autostart: false }), options(caps, false), deps());
      const uri = `unix:${join(dir, `r${round}.sock`)}`;
      await destination.start(uri);
      const source = new MigrationSource(machinePort(owner, { autostart: true }), options(caps, true), deps());
      let srcStatus = '';
      source.on('status', (s) => (srcStatus = s));
      source.start(uri);
      await source.whenIdle();
      await destination.whenDone();
      const [a, b] = [await owner.digest(), await dst.digest()];
      const same = srcStatus === 'completed' && a.digest === b.digest;
      if (!same) failures.push(`round ${round} (${caps.join('+') || 'plain'}): source ${srcStatus}, digests ${a.digest} / ${b.digest}`);
      await owner.destroy();
      await dst.start();
      owner = dst;
      const r: RoundResult = { round, caps: caps.join('+') || 'plain', ms: performance.now() - t0, digest: b.digest, same, rssMiB: rssMiB(), fds: fdCount() };
      perRound.push(r);
      opts.progress?.(r);
      if (failures.length > 5) break;
    }
  } finally {
    await owner.destroy();
    rmSync(dir, { recursive: true, force: true });
  }
  const warmAt = Math.max(0, Math.floor(perRound.length / 10) - 1);
  const ms = perRound.map((r) => r.ms).sort((x, y) => x - y);
  return {
    rounds: perRound.length,
    ramMiB: opts.ramMiB,
    failures,
    rss: { warm: perRound[warmAt]?.rssMiB ?? 0, end: perRound.at(-1)?.rssMiB ?? 0, max: Math.max(...perRound.map((r) => r.rssMiB)) },
    fds: { warm: perRound[warmAt]?.fds ?? 0, end: perRound.at(-1)?.fds ?? 0, max: Math.max(...perRound.map((r) => r.fds)) },
    msMedian: ms[ms.length >> 1] ?? 0,
    perRound,
  };
}

async function main(): Promise<void> {
  const arg = (name: string, dflt: number): number => {
    const i = process.argv.indexOf(`--${name}`);
    return i >= 0 ? Number(process.argv[i + 1]) : dflt;
  };
  const rounds = arg('rounds', 1000);
  const ramMiB = arg('mem', 16);
  const r = await runSoak({
    rounds,
    ramMiB,
    progress: (x) => {
      if (x.round % 50 === 49 || !x.same) console.log(`round ${x.round + 1}/${rounds} ${x.caps}: ${x.ms.toFixed(0)} ms, same digest ${x.same}, rss ${x.rssMiB.toFixed(1)} MiB, fds ${x.fds}`);
    },
  });
  const here = dirname(fileURLToPath(import.meta.url));
  const out = join(here, '..', '..', 'bench', 'results');
  mkdirSync(out, { recursive: true });
  const { perRound, ...summary } = r;
  writeFileSync(join(out, 'soak.json'), JSON.stringify({ date: new Date().toISOString(), ...summary, perRound }, null, 1) + '\n');
  console.log(JSON.stringify(summary));
  process.exit(r.failures.length ? 1 : 0);
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) await main();
