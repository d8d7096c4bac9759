/**
 * The console comparison's rules (src/migration/colo/compare.ts), fed line
 * by line: what is released when, and when a checkpoint is asked for.
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { ConsoleCompare } from '../../src/migration/colo/compare.js';

function setup(mode: 'trigger' | 'full', timeoutMs = 1000) {
  let t = 0;
  const out: string[] = [];
  let asked = 0;
  const c = new ConsoleCompare(mode, timeoutMs, {
    release: (text) => out.push(text),
    checkpoint: () => asked++,
    now: () => t,
  });
  return { c, out, asked: () => asked, advance: (ms: number) => (t += ms) };
}

describe('console comparison', () => {
  it('full: a primary line is held until the secondary printed the same, in order', () => {
    const { c, out, asked } = setup('full');
    assert.equal(c.primaryLine('a\n'), true);
    assert.equal(c.primaryLine('b\n'), true);
    assert.deepEqual(out, []);
    assert.equal(c.held, 2);
    c.secondaryLine('a\n');
    assert.deepEqual(out, ['a\n']);
    c.secondaryLine('b\n');
    assert.deepEqual(out, ['a\n', 'b\n']);
    assert.equal(c.held, 0);
    assert.equal(asked(), 0);
    assert.equal(c.matched, 2);
  });

  it('the secondary may print first', () => {
    const { c, out } = setup('full');
    c.secondaryLine('x\n');
    c.primaryLine('x\n');
    assert.deepEqual(out, ['x\n']);
  });

  it('a difference asks for one checkpoint; the held lines go out once it is loaded', () => {
    const { c, out, asked } = setup('full');
    c.primaryLine('p1\n');
    c.secondaryLine('s1\n');
    assert.equal(asked(), 1);
    c.primaryLine('p2\n');
    c.secondaryLine('s2\n');
    assert.equal(asked(), 1, 'one request per epoch');
    assert.deepEqual(out, []);
    c.closeEpoch(); // the snapshot
    c.primaryLine('p3\n'); // after the snapshot: the next epoch
    c.loaded();
    assert.deepEqual(out, ['p1\np2\n']);
    assert.equal(c.held, 1);
    c.secondaryLine('p3\n');
    assert.deepEqual(out, ['p1\np2\n', 'p3\n']);
    assert.equal(c.checkpointsAsked, 1);
  });

  it('a matched line waits behind an older one still held', () => {
    const { c, out } = setup('full');
    c.primaryLine('old\n');
    c.secondaryLine('other\n'); // mismatch: asked, old waits for the checkpoint
    c.closeEpoch();
    c.primaryLine('new\n');
    c.secondaryLine('new\n'); // cannot happen before loaded() on a real link, but order still holds
    assert.deepEqual(out, []);
    c.loaded();
    assert.deepEqual(out, ['old\nnew\n']);
  });

  it('a line that waits compare-timeout for its twin asks for a checkpoint', () => {
    const { c, asked, advance } = setup('trigger', 500);
    c.primaryLine('lonely\n');
    advance(499);
    c.tick();
    assert.equal(asked(), 0);
    advance(1);
    c.tick();
    assert.equal(asked(), 1);
    // and a secondary line alone too, in the next epoch
    c.closeEpoch();
    c.secondaryLine('also lonely\n');
    advance(500);
    c.tick();
    assert.equal(asked(), 2);
  });

  it('trigger: lines go out at once, differences still ask for checkpoints', () => {
    const { c, out, asked } = setup('trigger');
    assert.equal(c.primaryLine('a\n'), false);
    c.secondaryLine('b\n');
    assert.equal(asked(), 1);
    assert.deepEqual(out, []);
    assert.equal(c.held, 0);
  });

  it('leaving full releases everything; releaseAll on failover', () => {
    const { c, out } = setup('full');
    c.primaryLine('a\n');
    c.configure('trigger', 1000);
    assert.deepEqual(out, ['a\n']);
    c.configure('full', 1000);
    c.primaryLine('b\n');
    c.releaseAll();
    assert.deepEqual(out, ['a\n', 'b\n']);
  });
});
