/**
 * The source's switch to postcopy and the postcopy phase
 * (docs/spec/stream-format.md §11, docs/spec/qmp.md E.4).
 *
 * Once `migrate-start-postcopy` was requested and what must go before the
 * switch fits the downtime budget, the source goes `postcopy-active`, stops
 * the VM, finishes the sections that cannot do postcopy, lets the others
 * say which of the destination's data not to trust (RAM: RAM_DISCARD), and
 * sends PING 2, a PACKAGED blob (LISTEN, the device sections, PING 3, RUN)
 * and PING 4. The destination runs its guest from then on; the source sends
 * the rest of the postcopy sections in small slices, requested data first,
 * then END, EOF (no vmdesc) and waits for the destination's SHUT.
 *
 * The downtime of a postcopy migration is the time from the stop until the
 * package is sent (docs/spec/qmp.md D.2).
 */
import { setImmediate as yieldToLoop } from 'node:timers/promises';
import { PeerError } from '../errors.js';
import { wallClockUs } from '../sections/clock-device.js';
import { BufferSink } from '../stream/writer.js';
import { WIRE } from '../wire/constants.js';
import {
  putCmdPackaged,
  putCmdPing,
  putCmdPostcopyListen,
  putCmdPostcopyRun,
  putEof,
  putFooter,
  putSectionPartEnd,
} from '../wire/records.js';
import type { OutgoingSession } from '../core/outgoing.js';

const S = WIRE.SECTION;
/**
 * Bytes of background pages per PART section after the switch (4 full
 * pages, or about a thousand zero pages). Small, so that a page request
 * waits behind little of the background walk.
 */
const POSTCOPY_SLICE_BYTES = 16 * 1024;
/**
 * SO_SNDBUF after the switch when the destination is on this host: a
 * requested page then queues behind at most about this much (x2, as Linux
 * counts it) in the kernel. Measured in bench/postcopy.ts: 64 KiB gave a
 * p99 fault latency of 10-25 ms, 16 KiB under 5 ms at the same throughput.
 */
const POSTCOPY_SOCKET_BUFFER = 16 * 1024;

export async function runPostcopy(s: OutgoingSession): Promise<void> {
  const w = s.writer!;
  // E.4: postcopy-active comes before the VM stops
  if (!s.deps.status.toIf(['active'], 'postcopy-active')) s.checkCancelled();
  const stopWall = wallClockUs();
  const stopTime = s.now();
  await s.machine.stopForMigration();
  s.vmStopped = true;
  s.inPostcopy = true;
  s.checkCancelled();
  s.trace('postcopy-stopped');
  w.setMaxBandwidth(0);

  const later = s.sections.filter((x) => x.section.postcopy !== undefined);
  // what cannot go after the switch goes now, as in a precopy completion
  for (const { id, section } of s.sections) {
    if (section.postcopy) continue;
    putSectionPartEnd(w, S.END, id);
    await section.completePrecopy(w);
    putFooter(w, id);
  }
  for (const { section } of later) section.postcopy!.switchOver(w);
  putCmdPing(w, 2);
  const pkg = new BufferSink();
  putCmdPostcopyListen(pkg);
  s.writeDevices(pkg, stopWall);
  putCmdPing(pkg, 3);
  putCmdPostcopyRun(pkg);
  putCmdPackaged(w, pkg.length);
  w.putBytes(pkg.toBuffer());
  putCmdPing(w, 4);
  await w.flush();
  s.checkCancelled();
  s.trace('package-sent');
  s.stats.downtime = Math.round(s.now() - stopTime);
  // From here on requested pages must not queue behind megabytes in the
  // kernel. Not earlier: the discards and the package should go at full
  // speed, the guest is stopped until they are in.
  s.channel?.limitSocketBuffers(POSTCOPY_SOCKET_BUFFER);
  s.phase = 'postcopy';

  // A requested page waits for the next slice: nothing here allocates per slice.
  const budget = { maxBytes: POSTCOPY_SLICE_BYTES, maxMillis: 1 };
  for (;;) {
    s.checkCancelled();
    if (w.error) throw w.error;
    let remaining = 0;
    for (const { id, section } of later) {
      const p = section.pending(false);
      const left = p.precopy + p.postcopy;
      if (left === 0) continue;
      remaining += left;
      if (remaining === left) s.trace('postcopy-slice');
      putSectionPartEnd(w, S.PART, id);
      section.postcopy!.iterate(w, budget);
      putFooter(w, id);
    }
    s.stats.remaining = remaining;
    if (remaining === 0) break;
    await w.flush();
    // lets the return path deliver the requests that came meanwhile
    await yieldToLoop();
  }
  for (const { id, section } of later) {
    putSectionPartEnd(w, S.END, id);
    section.postcopy!.complete(w);
    putFooter(w, id);
  }
  putEof(w);
  await w.drain();
  s.checkCancelled();
  s.trace('postcopy-sent');
  const shut = await s.returnPath!.waitForShut();
  s.checkCancelled();
  if (shut !== 0) throw new PeerError(`Destination reported failure (SHUT ${shut})`);
  for (const { section } of later) section.postcopy!.done();
  s.finish(s.now());
}
