/**
 * The dependency rules of docs/architecture.md, checked on the sources:
 * cli → commands → migration → machine → block → base, with qmp beside
 * commands and crypto beside machine.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '../../..');

function walk(dir: string): string[] {
  const out: string[] = [];
  for (const e of readdirSync(dir)) {
    const p = join(dir, e);
    if (statSync(p).isDirectory()) out.push(...walk(p));
    else if (p.endsWith('.ts')) out.push(p);
  }
  return out;
}

interface Import {
  file: string;
  target: string;
  typeOnly: boolean;
}

function imports(file: string): Import[] {
  const src = readFileSync(file, 'utf8');
  const out: Import[] = [];
  const re = /^\s*(import|export)\s+(type\s+)?[^;]*?from\s+'([^']+)'/gms;
  for (const m of src.matchAll(re)) {
    const spec = m[3]!;
    if (!spec.startsWith('.')) continue;
    const target = relative(root, resolve(dirname(file), spec)).replace(/\.js$/, '.ts');
    out.push({ file: relative(root, file), target, typeOnly: Boolean(m[2]) });
  }
  return out;
}

const all = [...walk(join(root, 'src')), ...walk(join(root, 'tools'))].flatMap(imports);

function check(from: string, allowed: (i: Import) => boolean): void {
  const bad = all.filter((i) => i.file.startsWith(from) && !allowed(i));
  assert.deepEqual(bad.map((i) => `${i.file} → ${i.target}`), []);
}

test('the scan finds imports at all (guards against a broken regex)', () => {
  assert.ok(all.length > 100, `only ${all.length} imports found`);
  assert.ok(all.some((i) => i.file.startsWith('src/migration/') && i.target.startsWith('src/machine/')));
});

test('crypto (TLS credentials) imports only crypto and base', () => {
  check('src/crypto/', (i) => i.target.startsWith('src/crypto/') || i.target.startsWith('src/base/'));
});

test('block (disk images) imports only block and base', () => {
  check('src/block/', (i) => i.target.startsWith('src/block/') || i.target.startsWith('src/base/'));
  // and the check is live: block does use base
  assert.ok(all.some((i) => i.file.startsWith('src/block/') && i.target.startsWith('src/base/')));
});

test('nbd (the NBD server and client) imports only nbd, block and base', () => {
  check('src/nbd/', (i) => ['src/nbd/', 'src/block/', 'src/base/'].some((p) => i.target.startsWith(p)));
  // and the check is live: the image target uses the block layer's types
  assert.ok(all.some((i) => i.file.startsWith('src/nbd/') && i.target.startsWith('src/block/')));
});

test('replication imports only replication, nbd, block and base', () => {
  check('src/replication/', (i) => ['src/replication/', 'src/nbd/', 'src/block/', 'src/base/'].some((p) => i.target.startsWith(p)));
  assert.ok(all.some((i) => i.file.startsWith('src/replication/') && i.target.startsWith('src/nbd/')));
});

test('machine imports only machine, replication (replicated drives), block (the drives\' images) and base', () => {
  check('src/machine/', (i) => ['src/machine/', 'src/replication/', 'src/block/', 'src/base/'].some((p) => i.target.startsWith(p)));
  // and the check is live: the drives do import the block layer
  assert.ok(all.some((i) => i.file === 'src/machine/drives.ts' && i.target.startsWith('src/block/')));
});

test('migration knows nothing of QMP: no qmp, commands, cli; generated types only as types', () => {
  check('src/migration/', (i) => {
    if (i.target.startsWith('src/generated/')) return i.typeOnly && i.target === 'src/generated/qapi-types.ts';
    return ['src/migration/', 'src/machine/', 'src/crypto/', 'src/base/'].some((p) => i.target.startsWith(p));
  });
});

test('qmp knows no command meaning and no engine', () => {
  check('src/qmp/', (i) => ['src/qmp/', 'src/base/', 'src/qapi/'].some((p) => i.target.startsWith(p)));
});

test('the typed client (ferry/client) is the generated client over the QMP socket client, nothing else', () => {
  check('src/client/', (i) => ['src/client/', 'src/qmp/', 'src/generated/qapi-client.ts', 'src/generated/qapi-types.ts'].some((p) => i.target.startsWith(p)));
});

test('the report knows the generated schema types and client, never the engine or the cli', () => {
  check('src/report/', (i) => ['src/report/', 'src/generated/'].some((p) => i.target.startsWith(p)) && !i.target.startsWith('src/generated/qapi-commands.ts'));
  assert.ok(all.some((i) => i.file.startsWith('src/report/') && i.target.startsWith('src/generated/')));
});

test('metrics read the engine as commands do, never the cli or QMP', () => {
  check('src/metrics/', (i) => ['src/metrics/', 'src/migration/', 'src/generated/qapi-types.ts'].some((p) => i.target.startsWith(p)));
});

test('commands never import the cli', () => {
  check('src/commands/', (i) => !i.target.startsWith('src/cli/'));
});

test('tools and src never import each other', () => {
  check('tools/', (i) => i.target.startsWith('tools/'));
  check('src/', (i) => !i.target.startsWith('tools/'));
});

// ---- inside src/migration/ (docs/architecture.md, "Inside the engine")

const M = 'src/migration/';
const inMig = (...dirs: string[]) => (i: Import) => dirs.some((d) => i.target.startsWith(M + d));

test('the byte layer (wire, stream, codec) knows no session, section, channel or postcopy', () => {
  check(M + 'wire/', (i) => inMig('wire/', 'stream/')(i) || i.target === M + 'errors.ts' || i.target.startsWith('src/base/'));
  check(M + 'stream/', (i) => inMig('wire/', 'stream/')(i) || i.target === M + 'errors.ts' || i.target.startsWith('src/base/'));
  check(M + 'codec/', (i) => inMig('codec/')(i) || i.target.startsWith('src/base/'));
});

test('the channel knows only transports, the error family, base and crypto (TLS credentials)', () => {
  check(M + 'channel/', (i) => inMig('channel/')(i) || i.target === M + 'errors.ts' || i.target.startsWith('src/base/') || i.target.startsWith('src/crypto/'));
});

test('the return path is channel and wire, nothing above', () => {
  check(M + 'return-path/', (i) => inMig('return-path/', 'channel/', 'wire/', 'stream/')(i) || i.target === M + 'errors.ts');
});

test('sections, RAM and postcopy use the state machines only as types', () => {
  for (const d of ['sections/', 'ram/', 'postcopy/']) {
    check(M + d, (i) => !i.target.startsWith(M + 'core/') || i.typeOnly);
  }
});

test('COLO uses the state machines only as types (the load loop reads its checkpoints)', () => {
  check(M + 'colo/', (i) => !i.target.startsWith(M + 'core/') || i.typeOnly || i.target === M + 'core/load-loop.ts');
  // and the check is live: COLO does read checkpoints through the load loop
  assert.ok(all.some((i) => i.file.startsWith(M + 'colo/') && i.target === M + 'core/load-loop.ts'));
});

test('the state machines and sessions name no section: RAM comes from the registry', () => {
  for (const f of ['core/outgoing.ts', 'core/incoming.ts', 'core/load-loop.ts', 'core/status.ts', 'postcopy/switch.ts']) {
    check(M + f, (i) => !i.target.startsWith(M + 'ram/'));
  }
  // and the check is live: the facades do import RAM (the default registry)
  assert.ok(all.some((i) => i.file === M + 'core/source.ts' && i.target.startsWith(M + 'ram/')));
});
