/**
 * A postcopy source facing a hostile destination: the test listens on a unix
 * socket, swallows the stream and writes return-path messages by hand
 * (docs/spec/stream-format.md §12). Every malformed message fails the migration with
 * a precise error, and since the switch to postcopy never happened the
 * source VM runs on with its memory intact.
 */
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, type Server, type Socket } from 'node:net';
import { join } from 'node:path';
import { encodeRpPong, encodeRpReqPages, encodeRpReqPagesId, encodeRpShut } from '../../src/migration/wire/records.js';
import { runMigration } from '../helpers/migration.js';
import { cleanupAll, startVm, tempDir, type VmHandle } from '../helpers/vm.js';

after(cleanupAll);

function rawRp(type: number, body: number[]): Buffer {
  const b = Buffer.alloc(4 + body.length);
  b.writeUInt16BE(type, 0);
  b.writeUInt16BE(body.length, 2);
  Buffer.from(body).copy(b, 4);
  return b;
}

/** A destination that reads everything and answers `reply` once the stream started. */
async function hostile(path: string, reply: Buffer): Promise<{ server: Server; got: () => number }> {
  let bytes = 0;
  let sent = false;
  const server = createServer((s: Socket) => {
    s.on('error', () => undefined);
    s.on('data', (d: Buffer) => {
      bytes += d.length;
      if (!sent && bytes > 64) {
        sent = true;
        s.write(Buffer.concat([encodeRpPong(1), reply]));
      }
    });
  });
  await new Promise<void>((r) => server.listen(path, r));
  return { server, got: () => bytes };
}

const CASES: Array<[string, Buffer, string | RegExp]> = [
  ['REQ_PAGES before any REQ_PAGES_ID', encodeRpReqPages(0, 4096), /ram_save_queue_pages no previous block$/],
  ['misaligned request', encodeRpReqPagesId(0x800, 4096, 'pc.ram'), /Misaligned page request, start: 800 len: 4096$/],
  ['request past the block', encodeRpReqPagesId(32 << 20, 4096, 'pc.ram'), /request overrun start=2000000 len=1000 blocklen=2000000$/],
  ['request for an unknown block', encodeRpReqPagesId(0, 4096, 'nope'), /ram_save_queue_pages no block 'nope'$/],
  ['unknown message type', rawRp(9, []), /RP: Received invalid message 0x0009 length 0x0000$/],
  ['PONG with a bad length', rawRp(2, [0, 0, 1]), /RP: Received 'PONG' message \(0x0002\) withincorrect length 3 expecting 4$/],
  ['SHUT 1', encodeRpShut(1), 'Destination reported failure (SHUT 1)'],
];

describe('postcopy source: malformed return-path messages', () => {
  let src: VmHandle;
  let digest: string;
  for (const [name, reply, desc] of CASES) {
    it(name, async () => {
      const dir = tempDir();
      if (!src) {
        src = await startVm({ dir, name: 'src', args: ['-m', '32M', '-fill', 'random,seed=8'] });
        await src.execute('migrate-set-capabilities', { capabilities: [{ capability: 'postcopy-ram', state: true }] });
        // slow enough that the reply arrives long before the end of the first pass
        await src.execute('migrate-set-parameters', { 'max-bandwidth': 4e6 });
        digest = await src.digest();
      }
      const path = join(dir, 'rp.sock');
      const { server } = await hostile(path, reply);
      // the same source each time: failed, and running again
      const { info } = await runMigration({
        dir,
        source: { vm: src },
        destination: null,
        transport: { uri: `unix:${path}` },
        expect: { source: 'failed', sourceRunState: 'running' },
      });
      server.close();
      if (typeof desc === 'string') assert.equal(info['error-desc'], desc);
      else assert.match(info['error-desc'], desc);
      assert.equal(await src.digest(), digest, 'memory intact');
    });
  }

  it('a failed switch: SHUT 1 before PONG 3 gives the guest back; after PONG 3 it stays stopped', async () => {
    for (const pong3 of [false, true]) {
      const dir = tempDir();
      const path = join(dir, `sw-${pong3}.sock`);
      // answer PONG 1 and 2 and, once the package is there, maybe PONG 3, then fail
      let buf = Buffer.alloc(0);
      const server = createServer((s: Socket) => {
        s.on('error', () => undefined);
        let step = 0;
        s.on('data', (d: Buffer) => {
          buf = Buffer.concat([buf, d]);
          // PING 4 follows the package: 08 00 02 00 04 00 00 00 04
          if (step === 0 && buf.includes(Buffer.from([8, 0, 2, 0, 4, 0, 0, 0, 4]))) {
            step = 1;
            s.write(Buffer.concat([encodeRpPong(1), encodeRpPong(2), ...(pong3 ? [encodeRpPong(3)] : []), encodeRpShut(1)]));
            s.end();
          }
        });
      });
      await new Promise<void>((r) => server.listen(path, r));
      const { info } = await runMigration({
        dir,
        guest: { mem: '16M', fill: 'random,seed=2', workload: 'stress,rate=1M,seed=1' },
        source: { name: `sw${pong3}`, parameters: { 'max-bandwidth': 2e6 } },
        destination: null,
        transport: { uri: `unix:${path}` },
        capabilities: ['postcopy-ram'],
        during: ({ src }) => src.execute('migrate-start-postcopy'),
        // PONG 3 seen: the destination's guest may have run, ours stays stopped
        expect: { source: 'failed', sourceRunState: pong3 ? 'postmigrate' : 'running' },
      });
      server.close();
      assert.equal(info['error-desc'], 'Destination reported failure (SHUT 1)');
    }
  });
});
