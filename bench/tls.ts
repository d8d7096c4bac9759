/**
 * What TLS costs a migration: Ferry and QEMU 7.2, each plain and over TLS
 * (x509), on the same 1 GiB random guest, alternated run by run, over
 * tcp:127.0.0.1.
 *
 *   node dist/bench/tls.js [--runs 3] [--no-qemu] [--cpu-prof DIR] [--qemu-priority GNUTLS-PRIORITY]
 *
 * Set-up, the same for both engines, as QEMU's documentation tells its users:
 *  - certificates made with the openssl CLI (an EC P-256 CA, a server cert
 *    for CN=localhost with serverAuth, a client cert with clientAuth), laid
 *    out in QEMU's directories (ca-cert.pem, server-cert.pem/-key.pem,
 *    client-cert.pem/-key.pem);
 *  - destination: `-object tls-creds-x509,id=tls0,dir=D,endpoint=server`,
 *    `-incoming defer`, `migrate-set-parameters tls-creds=tls0`,
 *    `migrate-incoming tcp:127.0.0.1:P`;
 *  - source: `-object tls-creds-x509,id=tls0,dir=D,endpoint=client`,
 *    `tls-creds=tls0`, `tls-hostname=localhost`;
 *  - downtime-limit 300 ms; max-bandwidth unlimited (0 on Ferry, 100 GB/s on
 *    QEMU, as bench/migrate.ts); QEMU's GnuTLS at its default priority
 *    ("NORMAL"), Ferry's OpenSSL at Node's defaults.
 * The guests: Ferry `-m 1G -fill random,seed=1`; QEMU memory-backend-ram
 * loaded with the same bytes from a saved stream, -S (startQemuRandomSource
 * in bench/lib). The source starts first, then 2 GiB of huge pages are freed
 * (warmHugePages) and the destination starts and is migrated at once: the
 * "warm" memory state, the same for both engines. Writes bench/results/tls.json.
 */
import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { cpus, loadavg } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  CACHE_DIR,
  MiB,
  cleanupTempDirs,
  freePort,
  median,
  startQemuRandomSource,
  warmHugePages,
  startFerry,
  startQemu,
  tempDir,
  migrateAndMeasure,
  type Measured,
  writeResult,
  type Vm,
} from './lib/common.js';

type Engine = 'ferry' | 'qemu';
type Variant = `${Engine}-${'plain' | 'tls'}`;

interface Run extends Measured {
  variant: Variant;
}

const BIG_BW = 100e9;


/** QEMU's x509 directory layout, made with the openssl CLI. */
function makeCerts(dir: string): { server: string; client: string } {
  const server = join(dir, 'server');
  const client = join(dir, 'client');
  mkdirSync(server, { recursive: true });
  mkdirSync(client, { recursive: true });
  const ssl = (...a: string[]): void => {
    execFileSync('openssl', a, { stdio: ['ignore', 'ignore', 'pipe'] });
  };
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes'];
  ssl('req', '-x509', ...ec, '-keyout', join(dir, 'ca-key.pem'), '-out', join(dir, 'ca-cert.pem'), '-days', '2', '-subj', '/CN=Ferry bench CA',
    '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign');
  for (const [who, at, eku, cn] of [['server', server, 'serverAuth', 'localhost'], ['client', client, 'clientAuth', 'client']] as const) {
    const ext = join(dir, `${who}.ext`);
    writeFileSync(ext, `basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=${eku}\n${who === 'server' ? 'subjectAltName=DNS:localhost\n' : ''}`);
    ssl('req', ...ec, '-keyout', join(at, `${who}-key.pem`), '-out', join(dir, `${who}.csr`), '-subj', `/CN=${cn}`);
    ssl('x509', '-req', '-in', join(dir, `${who}.csr`), '-CA', join(dir, 'ca-cert.pem'), '-CAkey', join(dir, 'ca-key.pem'), '-CAcreateserial',
      '-days', '2', '-extfile', ext, '-out', join(at, `${who}-cert.pem`));
    execFileSync('cp', [join(dir, 'ca-cert.pem'), join(at, 'ca-cert.pem')]);
  }
  return { server, client };
}

const qemuPriority = ((): string | undefined => {
  const i = process.argv.indexOf('--qemu-priority');
  return i >= 0 ? process.argv[i + 1] : undefined;
})();

async function runOnce(variant: Variant, certs: { server: string; client: string }, timeoutMs: number): Promise<Run> {
  const [engine, mode] = variant.split('-') as [Engine, 'plain' | 'tls'];
  const tls = mode === 'tls';
  const dir = tempDir();
  const port = await freePort();
  const uri = `tcp:127.0.0.1:${port}`;
  const rec: Run = { variant, ok: false };
  let src: Vm | null = null;
  let dst: Vm | null = null;
  // --qemu-priority P: QEMU's tls-creds-x509 `priority` (GnuTLS priority string; default: GnuTLS's own, "NORMAL")
  const priority = engine === 'qemu' && qemuPriority ? `,priority=${qemuPriority}` : '';
  const creds = (endpoint: 'server' | 'client'): string[] =>
    tls ? ['-object', `tls-creds-x509,id=tls0,dir=${endpoint === 'server' ? certs.server : certs.client},endpoint=${endpoint}${priority}`] : [];
  try {
    if (engine === 'ferry') {
      // --cpu-prof DIR: V8 CPU profiles of both Ferry processes, DIR/<variant>-<side>/
      const prof = (side: string): string[] => (profileDir ? ['--cpu-prof', `--cpu-prof-dir=${join(profileDir, `${variant}-${side}`)}`] : []);
      src = await startFerry(['-m', '1G', '-fill', 'random,seed=1', ...creds('client')], dir, { name: 'src', nodeFlags: prof('src') });
      await warmHugePages(2 * 1024 * MiB);
      dst = await startFerry(['-m', '1G', '-S', ...creds('server'), '-incoming', 'defer'], dir, { name: 'dst', nodeFlags: prof('dst') });
    } else {
      src = await startQemuRandomSource(dir, creds('client'));
      await warmHugePages(2 * 1024 * MiB);
      dst = await startQemu(['-machine', 'none,memory-backend=m', '-object', 'memory-backend-ram,id=m,size=1G', '-S', ...creds('server'), '-incoming', 'defer'], dir, { name: 'dst' });
    }
    if (tls) await dst.execute('migrate-set-parameters', { 'tls-creds': 'tls0' });
    await dst.execute('migrate-incoming', { uri });
    await src.execute('migrate-set-parameters', {
      'max-bandwidth': engine === 'ferry' ? 0 : BIG_BW,
      'downtime-limit': 300,
      ...(tls ? { 'tls-creds': 'tls0', 'tls-hostname': 'localhost' } : {}),
    });
    Object.assign(rec, await migrateAndMeasure(src, dst, uri, timeoutMs));
    return rec;
  } catch (e) {
    rec.error = e instanceof Error ? e.message : String(e);
    return rec;
  } finally {
    await Promise.all([src?.quit(), dst?.quit()]);
  }
}

function arg(name: string): string | undefined {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : undefined;
}

const profileDir = arg('cpu-prof');

const stats = (v: number[]): { median: number; min: number; max: number } | null =>
  v.length ? { median: median(v), min: Math.min(...v), max: Math.max(...v) } : null;

export async function main(): Promise<void> {
  const runs = Math.max(1, Number(arg('runs') ?? '3'));
  const withQemu = !process.argv.includes('--no-qemu');
  const variants: Variant[] = withQemu ? ['ferry-plain', 'ferry-tls', 'qemu-plain', 'qemu-tls'] : ['ferry-plain', 'ferry-tls'];
  // in the bench cache (other people's cleanups empty /tmp/ferry-*), but not under tempDir():
  // cleanupTempDirs() after each run would take the certificates with it
  mkdirSync(CACHE_DIR, { recursive: true });
  const certDir = mkdtempSync(join(CACHE_DIR, 'tls-certs-'));
  const certs = makeCerts(certDir);
  console.log(`tls bench: ${runs} run(s) per variant, random 1 GiB guest; ${cpus().length} CPUs; load ${loadavg().map((x) => x.toFixed(2)).join(' ')}`);
  const all = new Map<Variant, Run[]>(variants.map((v) => [v, []]));
  for (let i = 0; i < runs; i++) {
    // alternate the order so drift hits every variant evenly
    for (const v of i % 2 ? [...variants].reverse() : variants) {
      const r = await runOnce(v, certs, 120000);
      all.get(v)!.push(r);
      console.log(`  ${v} #${i + 1}: ${r.ok ? `total ${r.totalTimeMs} ms, downtime ${r.downtimeMs} ms, setup ${r.setupTimeMs} ms, ${((r.transferredBytes ?? 0) / MiB).toFixed(0)} MiB` : `FAILED ${r.error}`}`);
      cleanupTempDirs();
    }
  }
  const summary: Record<string, unknown> = {};
  for (const v of variants) {
    const ok = all.get(v)!.filter((r) => r.ok);
    summary[v] = {
      okRuns: ok.length,
      totalTimeMs: stats(ok.map((r) => r.totalTimeMs!)),
      downtimeMs: stats(ok.map((r) => r.downtimeMs!)),
      setupTimeMs: stats(ok.map((r) => r.setupTimeMs!)),
      wallToDestDoneMs: stats(ok.map((r) => r.wallToDestDoneMs!)),
    };
  }
  const med = (v: Variant): number => ((summary[v] as any)?.totalTimeMs?.median as number) ?? NaN;
  const ratios = {
    ferryTlsOverPlain: med('ferry-tls') / med('ferry-plain'),
    qemuTlsOverPlain: withQemu ? med('qemu-tls') / med('qemu-plain') : null,
    ferryTlsOverQemuTls: withQemu ? med('ferry-tls') / med('qemu-tls') : null,
  };
  console.log('\ntotal-time, ms: median [min–max]');
  for (const v of variants) {
    const t = (summary[v] as any).totalTimeMs;
    console.log(`  ${v.padEnd(12)} ${t ? `${t.median} [${t.min}–${t.max}]` : '-'}  (${(summary[v] as any).okRuns}/${runs} ok)`);
  }
  console.log(`ratios: Ferry TLS/plain ${ratios.ferryTlsOverPlain.toFixed(2)}` +
    (withQemu ? `, QEMU TLS/plain ${ratios.qemuTlsOverPlain!.toFixed(2)}, Ferry TLS / QEMU TLS ${ratios.ferryTlsOverQemuTls!.toFixed(2)}` : ''));
  const p = writeResult('tls', {
    bench: 'tls',
    date: new Date().toISOString(),
    memoryState: 'warm (2 GiB of huge pages freed just before each destination started)',
    settings: { guest: 'random 1 GiB', downtimeLimitMs: 300, uri: 'tcp:127.0.0.1', creds: 'x509, EC P-256, openssl CLI', runs },
    runs: Object.fromEntries(all),
    summary,
    ratios,
  });
  console.log(`wrote ${p}`);
  rmSync(certDir, { recursive: true, force: true });
}

if (process.argv[1] === fileURLToPath(import.meta.url)) await main();
