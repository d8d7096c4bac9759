/**
 * `ferry report` end to end: a traced postcopy migration between two
 * `ferry vm` processes (so that every chart has data: passes, the expected
 * downtime, the switch, the destination's page faults), its report page
 * written, then loaded in headless Chromium (Debian's chromium through
 * playwright-core): every chart drew on its canvas, the console stayed
 * clean, nothing but the page itself was requested, and a screenshot is
 * kept under test-output/report/ as the test's artifact. `ferry report`
 * itself redraws the page from the JSON input and refuses a wrong file.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { collectReport, writeReport } from '../../src/report/collect.js';
import type { ReportInput } from '../../src/report/types.js';
import { CHROMIUM_SKIP, launchChromium } from '../helpers/browser.js';
import { cleanupAll, REPO_ROOT, runToExit, FERRY_MAIN, startVm, tempDir, waitFor, type VmHandle } from '../helpers/vm.js';

after(cleanupAll);

/** Where the test keeps its artifacts (gitignored). */
const OUT = join(REPO_ROOT, 'test-output', 'report');

const GUEST = ['-m', '64M', '-smp', '2', '-workload', 'stress,rate=48M,seed=7,read=on', '-fill', 'text,seed=7'];

describe('ferry report', () => {
  let dir: string;
  let input: ReportInput;
  let html: string;

  before(async () => {
    dir = tempDir();
    let src: VmHandle;
    let dst: VmHandle;
    [src, dst] = await Promise.all([
      startVm({ dir, name: 'src', args: GUEST }),
      startVm({ dir, name: 'dst', args: [...GUEST.slice(0, 8), '-incoming', 'defer'] }),
    ]);
    const s = src.api;
    const d = dst.api;
    await s.calcDirtyRate({ 'calc-time': 300, 'calc-time-unit': 'millisecond', 'sample-pages': 4096 });
    await waitFor(async () => (await s.queryDirtyRate()).status === 'measured', 5000, 'the measurement', 20);
    for (const c of [s, d]) {
      await c.migrateSetCapabilities({ capabilities: [{ capability: 'postcopy-ram', state: true }] });
      await c.xTraceMigration({ enable: true, interval: 50 });
    }
    await s.migrateSetParameters({ 'max-bandwidth': 24_000_000, 'downtime-limit': 50 });
    const uri = `unix:${dir}/mig.sock`;
    await d.migrateIncoming({ uri });
    await s.migrate({ uri });
    // some precopy passes, then postcopy: the guest runs on the destination and faults
    await waitFor(async () => ((await s.queryMigrate()).ram?.['dirty-sync-count'] ?? 0) >= 2, 30000, 'a second pass', 50);
    await s.migrateStartPostcopy();
    await waitFor(async () => (await s.queryMigrate()).status === 'completed', 60000, 'the source', 50);
    await waitFor(async () => (await d.queryMigrate()).status === 'completed', 30000, 'the destination', 50);
    input = await collectReport(s, d, { title: 'report test: postcopy of a 64 MiB guest' });
    mkdirSync(OUT, { recursive: true });
    html = writeReport(input, join(OUT, 'postcopy.html')).html;
  });

  it('the input holds both traces: decisions, the postcopy switch and the faults', () => {
    assert.ok(input.source.decisions.some((x) => x.decision === 'postcopy'), JSON.stringify(input.source.decisions));
    assert.ok(input.destination, 'the destination trace');
    const faults = input.destination!.faults.reduce((n, w) => n + w.faults, 0);
    assert.ok(faults > 0, 'page faults were recorded on the destination');
    for (const w of input.destination!.faults) assert.ok(w['p50-us'] <= w['p99-us'] && w['p99-us'] <= w['max-us'], JSON.stringify(w));
    assert.ok(input.source.events.some((e) => e.kind === 'status' && e.status === 'postcopy-active'));
  });

  it('the page is self-contained: the data, the script and uPlot inline, no URL to fetch', () => {
    const page = readFileSync(html, 'utf8');
    assert.match(page, /uPlot/);
    assert.doesNotMatch(page, /<script[^>]+src=/i);
    assert.doesNotMatch(page, /<link[^>]+href=/i);
    // the only URL is uPlot's licence banner, in a comment
    const urls = [...page.matchAll(/https?:\/\/[^\s"'<>)]+/g)].map((m) => m[0]);
    assert.deepEqual(urls, ['https://github.com/leeoniya/uPlot']);
    assert.match(page, /default-src 'none'/);
  });

  it('draws every chart in Chromium with no console error and no request', { skip: CHROMIUM_SKIP, timeout: 60000 }, async () => {
    const browser = await launchChromium();
    try {
      const page = await browser.context.newPage();
      const problems: string[] = [];
      const requests: string[] = [];
      page.on('console', (m) => {
        if (m.type() === 'error' || m.type() === 'warning') problems.push(`${m.type()}: ${m.text()}`);
      });
      page.on('pageerror', (e) => problems.push(`pageerror: ${e.message}`));
      page.on('request', (r) => requests.push(r.url()));
      await page.goto(`file://${html}`);
      // (browser code as text: this program is not compiled with the DOM's types)
      await page.waitForFunction('document.body.dataset.chartsTotal !== undefined', undefined, { timeout: 20000 });
      const charts = (await page.evaluate(`[...document.querySelectorAll('.chart')].map((box) => {
        const canvas = box.querySelector('canvas');
        let inked = 0;
        if (canvas) {
          const px = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
          for (let i = 3; i < px.length; i += 4) if (px[i] !== 0) inked++;
        }
        return { id: box.id, drawn: box.dataset.drawn, inked };
      })`)) as { id: string; drawn: string; inked: number }[];
      const shot = join(OUT, 'postcopy.png');
      await page.screenshot({ path: shot, fullPage: true });
      assert.ok(statSync(shot).size > 10000, 'a screenshot was kept');
      assert.deepEqual(
        charts.map((c) => c.id),
        ['chart-throughput', 'chart-remaining', 'chart-dirty-rate', 'chart-passes', 'chart-throttle', 'chart-downtime', 'chart-faults', 'chart-eta'],
      );
      for (const c of charts) {
        assert.equal(c.drawn, 'yes', `${c.id} did not draw`);
        assert.ok(c.inked > 500, `${c.id}: only ${c.inked} pixels drawn`);
      }
      assert.deepEqual(problems, []);
      assert.deepEqual(requests, [`file://${html}`]);
    } finally {
      await browser.close();
    }
  });

  it('ferry report redraws the page from its JSON input, and refuses a file that is not one', async () => {
    const json = html.replace(/\.html$/, '.json');
    const out = join(dir, 'again.html');
    const ok = await runToExit(process.execPath, [FERRY_MAIN, 'report', json, '-o', out], 30000);
    assert.equal(ok.code, 0, ok.stderr);
    const again = readFileSync(out, 'utf8');
    assert.match(again, /report test: postcopy of a 64 MiB guest/);
    assert.match(again, /Switchover decisions/);
    const bad = join(dir, 'bad.json');
    writeFileSync(bad, JSON.stringify({ hello: 1 }));
    const r = await runToExit(process.execPath, [FERRY_MAIN, 'report', bad], 30000);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /not a Ferry migration report input/);
    const r2 = await runToExit(process.execPath, [FERRY_MAIN, 'report'], 30000);
    assert.equal(r2.code, 2);
  });
});
