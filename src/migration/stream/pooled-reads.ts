/**
 * Socket reads into a small pool of reusable buffers.
 *
 * A net.Socket normally allocates a new 64 KiB ArrayBuffer for every read:
 * on the destination of a 1 GiB migration that is 16384 allocations whose
 * memory the garbage collector frees and malloc hands back to the kernel,
 * so that the next ones are faulted in again (measured: more than half a
 * second of the destination's CPU per GiB in GC and page faults). Node's
 * `onread` mode reads into a buffer the caller supplies instead; it is an
 * option of `net.connect` and `new net.Socket`, not of sockets a net.Server
 * accepts, so it is switched on here on the existing socket (Node 20: the
 * handle's useUserBuffer and the socket's kBuffer/kBufferCb/kBufferGen
 * slots, found by their descriptions). When any of that is missing, or for
 * a TLS socket (whose reads go through the TLS layer), nothing changes and
 * the caller keeps the 'data' events.
 *
 * A buffer goes back to the pool when the consumer releases it (the
 * StreamReader does once it has read past it). The pool never runs dry: a
 * new buffer is allocated when none is free, and the consumer's flow
 * control (pause at its high-water mark) bounds how many exist.
 */
import { Socket } from 'node:net';
import { TLSSocket } from 'node:tls';

/** Receives one read: a view of `nread` bytes of a pool buffer, and how to give the buffer back. */
export type PooledChunkSink = (chunk: Buffer, release: () => void) => void;

interface UserBufferHandle {
  useUserBuffer?: (buf: Uint8Array) => void;
}

function slot(sock: Socket, description: string): symbol | undefined {
  return Object.getOwnPropertySymbols(sock).find((s) => s.description === description);
}

/** The default size of each pool buffer (one read at most). */
export const POOLED_READ_SIZE = 256 * 1024;

/**
 * Make `sock` read into reusable buffers of `size` bytes and hand each read
 * to `sink` instead of emitting 'data' ('end', 'close' and 'error' stay as
 * they are). Call before anything reads from the socket. Returns false, and
 * changes nothing, when this Node cannot do it or the socket is not a plain
 * stream socket.
 */
export function pooledSocketReads(sock: Socket, sink: PooledChunkSink, size = POOLED_READ_SIZE): boolean {
  if (!(sock instanceof Socket) || sock instanceof TLSSocket) return false;
  const handle = (sock as unknown as { _handle?: UserBufferHandle | null })._handle;
  const kBuffer = slot(sock, 'kBuffer');
  const kBufferCb = slot(sock, 'kBufferCb');
  const kBufferGen = slot(sock, 'kBufferGen');
  if (!handle || typeof handle.useUserBuffer !== 'function' || !kBuffer || !kBufferCb || !kBufferGen) return false;
  const s = sock as unknown as Record<symbol, unknown>;
  if (s[kBuffer] !== null && s[kBuffer] !== undefined) return false;

  const free: Buffer[] = [];
  const take = (): Buffer => free.pop() ?? Buffer.allocUnsafeSlow(size);
  const first = take();
  s[kBuffer] = first;
  s[kBufferCb] = (nread: number, buf: Buffer): void => {
    let released = false;
    sink(buf.subarray(0, nread), () => {
      if (released) return;
      released = true;
      if (free.length < 64) free.push(buf);
    });
  };
  // called after each read for the buffer of the next one
  s[kBufferGen] = take;
  handle.useUserBuffer(first);
  return true;
}
