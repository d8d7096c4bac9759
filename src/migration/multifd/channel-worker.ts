/**
 * One multifd channel's worker thread (docs/spec/multifd.md). It owns the
 * channel's socket descriptor and does blocking I/O on it with native/pages
 * (multifd.cc), straight from and into guest RAM, which it shares with the
 * main thread through the RAM blocks' SharedArrayBuffers:
 *
 *  - send: the initial packet, then the packets the main thread queues in
 *    the shared slots (ctl HEAD/TAIL), each a header followed by the pages
 *    it lists;
 *  - recv: the initial packet (checked), then packets: their pages go
 *    straight into RAM; at a SYNC packet the worker counts it (ctl SYNCS) and
 *    waits until the main thread has passed the section's EOS (ctl
 *    RELEASED).
 *
 * A run ends when the main thread sets QUIT (and shuts the socket down), or
 * on an error or the peer's end, which it reports with one message. The
 * worker then waits for its next run (workers.ts keeps it).
 */
import { constants } from 'node:os';
import { parentPort } from 'node:worker_threads';
import { strerror } from '../channel/errors.js';
import { multifdNative } from '../../base/native.js';
import { CTL, type ChannelWorkerData, type WorkerMessage, slotMeta } from './shared.js';
import {
  HEADER_SIZE,
  INIT_SIZE,
  MULTIFD_ERR,
  MULTIFD_FLAG_SYNC,
  MULTIFD_MAGIC,
  MULTIFD_VERSION,
  PACKET_PAGES,
  decodeHeader,
  decodeInit,
  encodeInit,
  packetOffset,
} from './wire.js';

const native = multifdNative;
/** The current run's data and control words (one channel of one migration). */
let data: ChannelWorkerData;
let ctl: Int32Array;

function post(m: WorkerMessage): void {
  parentPort!.postMessage(m);
}

function quitting(): boolean {
  return Atomics.load(ctl, CTL.QUIT) !== 0;
}

/** errno numbers by name, for the channel layer's texts (QEMU's strerror words). */
const ERRNO_NAME = new Map(Object.entries(constants.errno).map(([name, n]) => [n, name]));

function ioError(r: number): string {
  if (-r === constants.errno.ECANCELED) return 'cancelled';
  return `multifd channel ${data.id}: ${strerror({ code: ERRNO_NAME.get(-r) ?? `errno ${-r}` })}`;
}

function runSend(): void {
  const slots = new Uint8Array(data.slots);
  const init = encodeInit(data.id, data.uuid);
  let r = native!.send(data.fd, init, INIT_SIZE, null, 0, ctl, CTL.QUIT);
  if (r < 0) return end(r);
  for (;;) {
    const tail = Atomics.load(ctl, CTL.TAIL);
    let head = Atomics.load(ctl, CTL.HEAD);
    while (head === tail) {
      if (quitting()) return post({ kind: 'end' });
      Atomics.wait(ctl, CTL.HEAD, head, 100);
      head = Atomics.load(ctl, CTL.HEAD);
    }
    const slot = tail % data.slotCount;
    const m = slotMeta(slot);
    const block = ctl[m]!;
    const pages = ctl[m + 1]!;
    const hdr = slots.subarray(slot * HEADER_SIZE, (slot + 1) * HEADER_SIZE);
    r = native!.send(data.fd, hdr, HEADER_SIZE, pages > 0 ? data.blocks[block]!.bytes : null, pages, ctl, CTL.QUIT);
    if (r < 0) return end(r);
    Atomics.add(ctl, CTL.TAIL, 1);
    Atomics.notify(ctl, CTL.TAIL);
  }
}

function end(r: number): void {
  if (quitting()) post({ kind: 'end' });
  else post({ kind: 'error', message: ioError(r) });
}

function runRecv(): void {
  const init = new Uint8Array(INIT_SIZE);
  let r = native!.recv(data.fd, init, 0, INIT_SIZE, ctl, CTL.QUIT);
  if (r < 0) return end(r);
  if (r < INIT_SIZE) return post({ kind: 'eof', atPacket: r === 0 });
  const msg = decodeInit(init);
  // QEMU 7.2 prints these with the channel's number in arrival order in front
  const bad = (m: string): void => post({ kind: 'error', message: MULTIFD_ERR.initialPacket(data.id, m) });
  if (msg.magic !== MULTIFD_MAGIC) return bad(MULTIFD_ERR.initMagic(msg.magic));
  if (msg.version !== MULTIFD_VERSION) return bad(MULTIFD_ERR.initVersion(msg.version));
  if (Buffer.compare(Buffer.from(msg.uuid), Buffer.from(data.uuid)) !== 0) return bad(MULTIFD_ERR.uuid(msg.uuid, data.uuid, msg.id));
  if (msg.id >= data.channels) return bad(MULTIFD_ERR.channelId(msg.version));
  post({ kind: 'init', id: msg.id });

  const hdr = new Uint8Array(HEADER_SIZE);
  const byName = new Map(data.blocks.map((b, i) => [b.name, i]));
  for (;;) {
    r = native!.recv(data.fd, hdr, 0, HEADER_SIZE, ctl, CTL.QUIT);
    if (r < 0) return end(r);
    if (r < HEADER_SIZE) return quitting() ? post({ kind: 'end' }) : post({ kind: 'eof', atPacket: r === 0 });
    const h = decodeHeader(hdr);
    if (h.magic !== MULTIFD_MAGIC) return post({ kind: 'error', message: MULTIFD_ERR.packetMagic(h.magic) });
    if (h.version !== MULTIFD_VERSION) return post({ kind: 'error', message: MULTIFD_ERR.packetVersion(h.version) });
    if (h.pagesAlloc > PACKET_PAGES) return post({ kind: 'error', message: MULTIFD_ERR.tooManyPages(h.pagesAlloc, PACKET_PAGES) });
    if (h.normalPages > h.pagesAlloc) return post({ kind: 'error', message: MULTIFD_ERR.tooManyPages(h.normalPages, h.pagesAlloc) });
    if (h.normalPages > 0) {
      const b = byName.get(h.block);
      if (b === undefined) return post({ kind: 'error', message: MULTIFD_ERR.unknownBlock(h.block) });
      const block = data.blocks[b]!;
      const size = block.bytes.length;
      for (let i = 0; i < h.normalPages; i++) {
        const off = packetOffset(hdr, i);
        // QEMU 7.2 checks offset > used_length - page size; a misaligned offset is ours to refuse too
        if (off > size - 4096 || off % 4096 !== 0) return post({ kind: 'error', message: MULTIFD_ERR.offset(off, size) });
      }
      r = native!.recvPages(data.fd, hdr, h.normalPages, block.bytes, block.touched, ctl, CTL.QUIT);
      if (r < 0) return end(r);
      if (r < h.normalPages * 4096) return quitting() ? post({ kind: 'end' }) : post({ kind: 'eof', atPacket: false });
      Atomics.add(ctl, CTL.PAGES, h.normalPages);
    }
    if ((h.flags & MULTIFD_FLAG_SYNC) !== 0) {
      const n = Atomics.add(ctl, CTL.SYNCS, 1) + 1;
      Atomics.notify(ctl, CTL.SYNCS);
      while (Atomics.load(ctl, CTL.RELEASED) < n) {
        if (quitting()) return post({ kind: 'end' });
        Atomics.wait(ctl, CTL.RELEASED, Atomics.load(ctl, CTL.RELEASED), 100);
      }
    }
  }
}

// Each message is one run: a channel of one migration. The run blocks this
// thread until it ends; its last message (end, error or eof) says so.
parentPort!.on('message', (d: ChannelWorkerData) => {
  data = d;
  ctl = new Int32Array(d.ctl);
  if (native === null) post({ kind: 'error', message: 'multifd needs native/pages, which is not built' });
  else if (d.role === 'send') runSend();
  else runRecv();
});
parentPort!.postMessage({ kind: 'ready' });
