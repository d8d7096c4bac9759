/**
 * Socket reads into a small pool of reusable buffers.
 *
 * A net.Socket normally allocates a new 64 KiB ArrayBuffer for every read
 * (a TLSSocket a 16 KiB one per record):
 * on the destination of a 1 GiB migration that is 16384 allocations whose
 * memory the garbage collector frees and malloc hands back to the kernel,
 * so that the next ones are faulted in again (measured: more than half a
 * second of the destination's CPU per GiB in GC and page faults). Node's
 * `onread` mode reads into a buffer the caller supplies instead; it is an
 * option of `net.connect` and `new net.Socket`, not of sockets a net.Server
 * accepts, so it is switched on here on the existing socket (Node 20: the
 * handle's useUserBuffer and the socket's kBuffer/kBufferCb/kBufferGen
 * slots, found by their descriptions). When any of that is missing, nothing
 * changes and the caller keeps the 'data' events.
 *
 * A buffer goes back to the pool when it is full and the consumer has
 * released every read in it (the StreamReader does once it has read past
 * one). The pool never runs dry: a new buffer is allocated when none is
 * free, and the consumer's flow control (pause at its high-water mark)
 * bounds how many exist.
 */
import { Socket } from 'node:net';

/** Receives one read: a view of the bytes read, and how to give it back once it has been read. */
export type PooledChunkSink = (chunk: Buffer, release: () => void) => void;

interface UserBufferHandle {
  useUserBuffer?: (buf: Uint8Array) => void;
}

function slot(sock: Socket, description: string): symbol | undefined {
  return Object.getOwnPropertySymbols(sock).find((s) => s.description === description);
}

/** The size of each pool buffer. */
export const POOLED_READ_SIZE = 256 * 1024;
/** A buffer takes further reads while at least this much of it is free (a TLS record is at most 16 KiB). */
const MIN_READ = 64 * 1024;

/** A pool buffer: reads fill it front to back; it is free again once it is full and every view of it was released. */
interface PoolBuffer {
  buf: Buffer;
  used: number;
  /** views handed out and not yet released */
  refs: number;
  /** still taking reads */
  filling: boolean;
}

/**
 * Make `sock` (a net.Socket, or a TLSSocket: its decrypted bytes) read into
 * reusable buffers of `size` bytes and hand each read to `sink` instead of
 * emitting 'data' ('end', 'close' and 'error' stay as they are). Reads go
 * one after another into the free part of the current buffer (a TLS socket
 * hands over one record per read). Call before anything reads from the
 * socket's handle in this mode; bytes already buffered by the stream still
 * come as 'data' first. Returns false, and changes nothing, when this Node
 * cannot do it.
 */
export function pooledSocketReads(sock: Socket, sink: PooledChunkSink, size = POOLED_READ_SIZE): boolean {
  if (!(sock instanceof Socket)) return false;
  const handle = (sock as unknown as { _handle?: UserBufferHandle | null })._handle;
  const kBuffer = slot(sock, 'kBuffer');
  const kBufferCb = slot(sock, 'kBufferCb');
  const kBufferGen = slot(sock, 'kBufferGen');
  if (!handle || typeof handle.useUserBuffer !== 'function' || !kBuffer || !kBufferCb || !kBufferGen) return false;
  const s = sock as unknown as Record<symbol, unknown>;
  if (s[kBuffer] !== null && s[kBuffer] !== undefined) return false;

  const free: PoolBuffer[] = [];
  const take = (): PoolBuffer => {
    const pb = free.pop() ?? { buf: Buffer.allocUnsafeSlow(size), used: 0, refs: 0, filling: true };
    pb.used = 0;
    pb.filling = true;
    return pb;
  };
  const giveBack = (pb: PoolBuffer): void => {
    if (free.length < 64) free.push(pb);
  };
  let cur = take();
  s[kBuffer] = cur.buf;
  s[kBufferCb] = (nread: number, view: Buffer): void => {
    const pb = cur;
    pb.used += nread;
    pb.refs++;
    let released = false;
    sink(view.subarray(0, nread), () => {
      if (released) return;
      released = true;
      if (--pb.refs === 0 && !pb.filling) giveBack(pb);
    });
  };
  // called after each read for the buffer of the next one: the rest of this one, or another
  s[kBufferGen] = (): Buffer => {
    if (cur.buf.length - cur.used >= MIN_READ) return cur.buf.subarray(cur.used);
    cur.filling = false;
    if (cur.refs === 0) giveBack(cur);
    cur = take();
    return cur.buf;
  };
  handle.useUserBuffer(cur.buf);
  return true;
}
