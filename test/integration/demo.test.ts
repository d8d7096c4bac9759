import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { cleanupAll, runFerry, tempDir } from '../helpers/vm.js';
import { after } from 'node:test';

after(cleanupAll);

/** Run `ferry demo` as `npm start` does (SIGINT, which stops its VMs, when it takes too long). */
const runDemo = (args: string[], timeoutMs = 120000) => runFerry(['demo', ...args], timeoutMs, 'SIGINT');

describe('ferry demo', () => {
  it('migrates a small VM and verifies it (exit 0, verdict lines, the ETA, a report)', { timeout: 150000 }, async () => {
    const report = join(tempDir(), 'demo.html');
    const r = await runDemo(['--mem', '128M', '--no-progress', '--report', report]);
    const all = `${r.out}\n${r.err}`;
    assert.equal(r.code, 0, all);
    assert.match(r.out, /status\s*│\s*completed/, all);
    assert.match(r.out, /memory digests equal\s*│\s*yes: source ([0-9a-f]{12})\s+destination \1/, all);
    assert.match(r.out, /heartbeat continued\s*│\s*yes/, all);
    assert.match(r.out, /destination running\s*│\s*yes: status running/, all);
    assert.match(r.out, /VERIFIED/, all);
    // no progress bar without a TTY: plain progress lines instead, with the ETA
    assert.match(r.out, /\[\s*[\d.]+ s\] (setup|active|completed) .* ETA \S+/, all);
    assert.match(r.out, /dirty rate: \d+ MiB\/s \(calc-dirty-rate, page-sampling, \d+ ms\)/, all);
    // the report: its path printed, the page and its input written
    assert.match(r.out, new RegExp(`report: ${report.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}`), all);
    assert.ok(existsSync(report.replace(/html$/, 'json')));
    const page = readFileSync(report, 'utf8');
    assert.match(page, /VERIFIED: x-query-memory-digest/);
    assert.match(page, /id="report-data"/);
  });

  it('rejects an unknown option with exit 1', async () => {
    const r = await runDemo(['--bogus']);
    assert.equal(r.code, 1);
    assert.match(r.err, /--bogus: unknown option/);
  });
});
