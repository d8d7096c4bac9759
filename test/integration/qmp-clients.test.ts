/**
 * Real QMP clients written for QEMU, unchanged, against `ferry vm`:
 *  - QEMU's Python library qemu.qmp (async QMPClient and legacy sync API)
 *  - qmp-shell, driven through stdin as in interactive use
 *  - go-qemu's qmp package (DigitalOcean), built offline in GOPATH mode
 *  - node-qemu's QMPClient (npm devDependency)
 * Each is skipped with a message when it is not installed; CI installs them
 * with .ci/deps/qmp-clients.sh.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { QMPClient } from 'node-qemu';
import { cleanupAll, REPO_ROOT, startVm, tempDir, type VmHandle } from '../helpers/vm.js';
import { freePort } from '../clients/raw-qmp.js';

after(cleanupAll);

const QEMU_PY = process.env.FERRY_QEMU_PYTHON ?? '/opt/ferry-deps/qemu-python';
const GOPATH_DEBIAN = '/usr/share/gocode';
const CLIENTS = join(REPO_ROOT, 'test', 'clients');

function have(cmd: string, args: string[] = ['--version'], env?: NodeJS.ProcessEnv): boolean {
  const r = spawnSync(cmd, args, { stdio: 'ignore', env: env ?? process.env });
  return r.status === 0;
}

const pyEnv = { ...process.env, PYTHONPATH: QEMU_PY, PYTHONDONTWRITEBYTECODE: '1' };
const pythonSkip = !have('python3')
  ? 'python3 is not installed'
  : !have('python3', ['-c', 'import qemu.qmp, qemu.qmp.qmp_shell'], pyEnv)
    ? `qemu.qmp not found under ${QEMU_PY} (run: source .ci/deps/qmp-clients.sh)`
    : false;
const goSkip = !have('go', ['version'])
  ? 'go is not installed (apt-get install golang-go; see .ci/deps/qmp-clients.sh)'
  : !existsSync(join(GOPATH_DEBIAN, 'src/github.com/digitalocean/go-qemu/qmp/socket.go'))
    ? 'go-qemu not installed (apt-get install golang-github-digitalocean-go-qemu-dev)'
    : false;

function run(cmd: string, args: string[], opts: { env?: NodeJS.ProcessEnv; cwd?: string; timeout?: number } = {}) {
  return new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve) => {
    execFile(cmd, args, { env: opts.env, cwd: opts.cwd, timeout: opts.timeout ?? 30000, maxBuffer: 16 << 20 }, (err, stdout, stderr) => {
      resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr });
    });
  });
}

let vm: VmHandle;
let tcpPort: number;

before(async () => {
  tcpPort = await freePort();
  vm = await startVm({ args: ['-m', '32M', '-qmp', `tcp:127.0.0.1:${tcpPort},server=on,wait=off`] });
});

describe('QEMU python library qemu.qmp', { skip: pythonSkip }, () => {
  for (const kind of ['unix', 'tcp'] as const) {
    it(`async QMPClient and legacy QEMUMonitorProtocol over ${kind}`, async () => {
      const target = kind === 'unix' ? `unix:${vm.sock}` : `tcp:127.0.0.1:${tcpPort}`;
      const r = await run('python3', [join(CLIENTS, 'python', 'qemu_qmp_check.py'), target], { env: pyEnv });
      assert.equal(r.code, 0, r.stderr);
      const out = JSON.parse(r.stdout);
      const a = out.async;
      assert.deepEqual(a.greeting_version, { major: 2, minor: 10, micro: 0 });
      assert.deepEqual(a.greeting_capabilities, []);
      assert.equal(a.status0, 'running');
      assert.deepEqual(a.version.qemu, { major: 2, minor: 10, micro: 0 });
      assert.equal(Object.keys(a.capabilities).length, 12);
      assert.equal(a.capabilities.xbzrle, false);
      assert.equal(a.status_stopped, 'paused');
      assert.deepEqual(a.events, ['STOP', 'RESUME']);
      assert.equal(a.event_timestamps_ok, true);
      assert.equal(a.status_resumed, 'running');
      assert.deepEqual(a.unknown, { class: 'CommandNotFound', desc: 'The command no-such-command has not been found' });
      assert.equal(a.bad_arg.class, 'GenericError');
      assert.equal(a.execute_msg, 'running');
      const l = out.legacy;
      assert.equal(l.status0, 'running');
      assert.equal(l.event1, 'STOP');
      assert.equal(l.status_stopped, 'paused');
      assert.equal(l.event2, 'RESUME');
      assert.equal(l.unknown.class, 'CommandNotFound');
      assert.equal(l.caps_count, 12);
    });
  }
});

describe('qmp-shell', { skip: pythonSkip }, () => {
  async function shell(target: string, input: string, extra: string[] = []): Promise<{ code: number | null; stdout: string; stderr: string }> {
    const home = tempDir('ferry-qmp-shell-');
    const p = spawn('python3', [join(QEMU_PY, 'bin', 'qmp-shell'), ...extra, target], {
      env: { ...pyEnv, HOME: home, TERM: 'dumb' },
      stdio: ['pipe', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    p.stdout.on('data', (b: Buffer) => (stdout += b.toString()));
    p.stderr.on('data', (b: Buffer) => (stderr += b.toString()));
    // type the lines one by one, as a user would
    for (const line of input.split('\n')) {
      p.stdin.write(line + '\n');
      await new Promise((r) => setTimeout(r, 60));
    }
    p.stdin.end();
    const t = setTimeout(() => p.kill('SIGKILL'), 20000);
    const code = await new Promise<number | null>((r) => p.once('exit', (c) => r(c)));
    clearTimeout(t);
    return { code, stdout, stderr };
  }

  for (const kind of ['unix', 'tcp'] as const) {
    it(`runs commands typed on stdin over ${kind}`, async () => {
      const target = kind === 'unix' ? vm.sock : `127.0.0.1:${tcpPort}`;
      const r = await shell(
        target,
        [
          'query-status',
          'query-version',
          'query-migrate-capabilities',
          'stop',
          'query-status',
          'cont',
          '', // an empty line prints the events received so far
          'no-such-command',
          'migrate-set-parameters downtime-limit=450 max-bandwidth=1048576',
          'query-migrate-parameters',
          'migrate-set-capabilities capabilities=[{"capability":"events","state":true}]',
          'query-migrate-capabilities',
          'migrate-set-capabilities capabilities=[{"capability":"events","state":false}]',
          'query-status',
        ].join('\n'),
      );
      assert.equal(r.code, 0, r.stderr + r.stdout);
      assert.match(r.stdout, /Welcome to the QMP low-level shell!/);
      assert.match(r.stdout, /Connected to QEMU 2\.10\.0/);
      // replies are printed with json.dumps: pick them out line by line
      const replies = r.stdout
        .split('\n')
        .map((l) => l.replace(/^(\(QEMU\) )+/, '').trim())
        .filter((l) => l.startsWith('{"'))
        .map((l) => JSON.parse(l));
      const rets = replies.map((x) => x.return ?? x.error);
      assert.equal(rets[0].status, 'running');
      assert.deepEqual(rets[1].qemu, { major: 2, minor: 10, micro: 0 });
      assert.equal(rets[2].length, 12);
      assert.deepEqual(rets[3], {});
      assert.equal(rets[4].status, 'paused');
      assert.deepEqual(rets[5], {});
      assert.deepEqual(rets[6], { class: 'CommandNotFound', desc: 'The command no-such-command has not been found' });
      assert.deepEqual(rets[7], {});
      assert.equal(rets[8]['downtime-limit'], 450);
      assert.equal(rets[8]['max-bandwidth'], 1048576);
      assert.deepEqual(rets[9], {});
      assert.equal(rets[10].find((c: { capability: string }) => c.capability === 'events').state, true);
      assert.equal(rets[12].status, 'running');
      // events printed as Python dicts by the empty line
      assert.match(r.stdout, /'event': 'STOP'/);
      assert.match(r.stdout, /'event': 'RESUME'/);
      // restore the parameter defaults for the other tests
      await vm.execute('migrate-set-parameters', { 'downtime-limit': 300, 'max-bandwidth': 33554432 });
    });
  }

  it('verbose and pretty modes, and a parse error on the command line', async () => {
    const r = await shell(vm.sock, 'query-status\nquery-status bogus\nquery-status x=1', ['-v', '-p']);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /"execute": "query-status"/); // -v echoes the request
    assert.match(r.stdout, /"status": "running"/);
    assert.match(r.stderr, /Error while parsing command line/);
    assert.match(r.stdout, /"desc": "Parameter 'x' is unexpected"/);
  });
});

describe('go-qemu (github.com/digitalocean/go-qemu/qmp)', { skip: goSkip }, () => {
  let bin: string;
  before(async () => {
    const cache = join(tmpdir(), 'ferry-gocache');
    mkdirSync(cache, { recursive: true });
    bin = join(tempDir('ferry-go-'), 'qmpcheck');
    const env = {
      ...process.env,
      GO111MODULE: 'off',
      GOPATH: GOPATH_DEBIAN,
      GOFLAGS: '',
      GOPROXY: 'off',
      GOCACHE: process.env.GOCACHE ?? cache,
    };
    const r = await run('go', ['build', '-o', bin, '.'], { env, cwd: join(CLIENTS, 'go', 'qmpcheck'), timeout: 120000 });
    assert.equal(r.code, 0, `go build failed: ${r.stderr}`);
  });

  for (const kind of ['unix', 'tcp'] as const) {
    it(`SocketMonitor Connect/Run/Events over ${kind}`, async () => {
      const r = await run(bin, [kind, kind === 'unix' ? vm.sock : `127.0.0.1:${tcpPort}`]);
      assert.equal(r.code, 0, r.stderr);
      const out = JSON.parse(r.stdout);
      assert.equal(out.greeting_version, '2.10.0');
      assert.equal(out.greeting_package, 'ferry-0.1.0');
      assert.deepEqual(out.capabilities, []);
      assert.equal(out.status0, 'running');
      assert.deepEqual(out.version.qemu, { major: 2, minor: 10, micro: 0 });
      assert.equal(out.migrate_capabilities, 12);
      assert.equal(out.status_stopped, 'paused');
      assert.equal(out.status_resumed, 'running');
      assert.deepEqual(out.events, ['STOP', 'RESUME']);
      assert.equal(out.unknown_error, 'The command no-such-command has not been found');
      assert.equal(out.events_capability, true);
      await vm.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: false }] });
    });
  }
});

describe('node-qemu QMPClient', () => {
  for (const kind of ['unix', 'tcp'] as const) {
    it(`connect, typed commands, events, errors over ${kind}`, async () => {
      const client = new QMPClient(kind === 'unix' ? { socketPath: vm.sock } : { host: '127.0.0.1', port: tcpPort });
      await client.connect();
      try {
        const events: string[] = [];
        client.on('rawEvent', (e: { event: string; timestamp: { seconds: number; microseconds: number } }) => {
          assert.ok(e.timestamp.seconds > 0 && e.timestamp.microseconds >= 0 && e.timestamp.microseconds <= 999999);
          events.push(e.event);
        });
        let stops = 0;
        client.on('STOP', () => stops++);
        const st = await client.queryStatus();
        assert.equal(st.status, 'running');
        const v = (await client.execute('query-version')) as { qemu: { major: number } };
        assert.equal(v.qemu.major, 2);
        const caps = (await client.queryMigrateCapabilities()) as { capability: string; state: boolean }[];
        assert.equal(caps.length, 12);
        await client.stop();
        assert.equal((await client.queryStatus()).status, 'paused');
        await client.cont();
        assert.equal((await client.queryStatus()).status, 'running');
        const start = Date.now();
        while (events.length < 2 && Date.now() - start < 5000) await new Promise((r) => setTimeout(r, 20));
        assert.deepEqual(events, ['STOP', 'RESUME']);
        assert.equal(stops, 1);
        await assert.rejects(client.execute('no-such-command'), (e: Error & { qmpClass?: string; description?: string }) => {
          assert.equal(e.qmpClass, 'CommandNotFound');
          assert.equal(e.description, 'The command no-such-command has not been found');
          return true;
        });
        // the connection is still usable after the error
        assert.equal((await client.queryStatus()).status, 'running');
      } finally {
        await client.close();
      }
    });
  }
});
