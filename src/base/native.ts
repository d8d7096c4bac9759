/**
 * Optional native helpers (native/*), each with a pure-JS fallback: when an
 * addon is not built, or FERRY_NO_NATIVE=1, the calls do nothing and return
 * false.
 */
import { createRequire } from 'node:module';
import { dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

interface HugepageAddon {
  available: boolean;
  madviseHugepage(buf: SharedArrayBuffer | ArrayBuffer): boolean;
  madviseAdvice(buf: SharedArrayBuffer | ArrayBuffer | ArrayBufferView, advice: string): boolean;
}

/** dist/src/base → repo root (three up), where native/ lives. */
const root = resolve(dirname(fileURLToPath(import.meta.url)), '../../..');
let hugepage: HugepageAddon | null | undefined;

function loadHugepage(): HugepageAddon | null {
  if (hugepage !== undefined) return hugepage;
  try {
    hugepage = createRequire(import.meta.url)(resolve(root, 'native/hugepage/index.cjs')) as HugepageAddon;
  } catch {
    hugepage = null;
  }
  return hugepage;
}

/**
 * Ask the kernel to back this buffer with transparent huge pages, as QEMU
 * does for guest RAM (THP is madvise-only on our hosts). Must be called
 * before the memory is first touched. Returns whether the advice was given.
 */
export function adviseHugepages(buf: SharedArrayBuffer): boolean {
  const hp = loadHugepage();
  return hp !== null && hp.available && hp.madviseHugepage(buf);
}

/**
 * Fault every host page inside the buffer (or view) in for writing without
 * changing its contents (MADV_POPULATE_WRITE). Blocks the calling thread: call it from a
 * worker. Returns false when the addon or the kernel cannot do it.
 */
export function populateWrite(buf: SharedArrayBuffer | Uint8Array): boolean {
  const hp = loadHugepage();
  return hp !== null && hp.available && hp.madviseAdvice(buf, 'populate_write');
}

/**
 * Gives the host memory behind the whole host pages inside `view` back to
 * the kernel (MADV_DONTNEED): RSS falls, the pages read back as zero and are
 * faulted in again (zeroed) on the next touch. Bytes of partial host pages
 * at either end of the view are left alone, so release large contiguous
 * ranges: a SharedArrayBuffer's memory does not start on a host page
 * boundary (measured on Node 20 / glibc: 16 bytes past one for buffers of
 * 1 MiB and up, the malloc chunk header), so one 4 KiB guest page never
 * holds a whole host page and releasing it alone frees nothing; N
 * contiguous guest pages free N-1 host pages. Returns false without the
 * addon or when no whole host page lies inside the view.
 */
export function releaseMemory(view: Uint8Array): boolean {
  const hp = loadHugepage();
  return hp !== null && hp.available && hp.madviseAdvice(view, 'dontneed');
}

interface SocketAddon {
  sndbuf(fd: number, bytes: number): number;
  usertimeout?(fd: number, ms: number): number;
}
let sockAddon: SocketAddon | null | undefined;

function loadSocketAddon(): SocketAddon | null {
  if (sockAddon !== undefined) return sockAddon;
  sockAddon = null;
  if (process.env.FERRY_NO_NATIVE === '1') return null;
  try {
    const a = createRequire(import.meta.url)(resolve(root, 'native/scm-rights/build/Release/ferry_scm.node')) as Partial<SocketAddon>;
    if (typeof a.sndbuf === 'function') sockAddon = a as SocketAddon;
  } catch {
    sockAddon = null;
  }
  return sockAddon;
}

/**
 * setsockopt(SO_SNDBUF) on a socket's descriptor (the kernel doubles the
 * value). Node offers no way to do it for stream sockets. Returns false
 * without the addon or on failure.
 */
export function setSendBuffer(fd: number, bytes: number): boolean {
  const a = loadSocketAddon();
  return a !== null && a.sndbuf(fd, bytes) === 0;
}

/**
 * setsockopt(TCP_USER_TIMEOUT): how long sent data may stay unacknowledged
 * (and keepalive probes unanswered) before the kernel drops the connection
 * with ETIMEDOUT. Returns false without the addon or on failure.
 */
export function setTcpUserTimeout(fd: number, ms: number): boolean {
  const a = loadSocketAddon();
  return a !== null && typeof a.usertimeout === 'function' && a.usertimeout(fd, ms) === 0;
}

interface TlsConfigAddon {
  loadConfig(text: string, appname: string): string | null;
}
let noTickets: boolean | undefined;

/** An ssl_conf system_default section: applied by OpenSSL to every SSL_CTX made afterwards. */
const NO_TICKETS_CONF = ['ferry_conf = ferry_init', '[ferry_init]', 'ssl_conf = ferry_ssl', '[ferry_ssl]', 'system_default = ferry_sys', '[ferry_sys]', 'NumTickets = 0', ''].join('\n');

/**
 * Makes every TLS 1.3 server context created from now on send no session
 * tickets (OpenSSL's NumTickets = 0), as QEMU's GnuTLS server sends none;
 * node:tls has no option for it, so native/tls-config loads the setting into
 * Node's OpenSSL. Done once per process. Returns false without the addon (or
 * with FERRY_NO_NATIVE=1): the caller must then keep its server to TLS 1.2,
 * which has no post-handshake messages.
 */
export function tlsServerSendsNoTickets(): boolean {
  if (noTickets !== undefined) return noTickets;
  noTickets = false;
  if (process.env.FERRY_NO_NATIVE === '1') return false;
  try {
    const a = createRequire(import.meta.url)(resolve(root, 'native/tls-config/build/Release/ferry_tls_config.node')) as Partial<TlsConfigAddon>;
    noTickets = typeof a.loadConfig === 'function' && a.loadConfig(NO_TICKETS_CONF, 'ferry_conf') === null;
  } catch {
    noTickets = false;
  }
  return noTickets;
}

interface PagesAddon {
  copy(dst: Uint8Array, dstOffset: number, src: Uint8Array, srcOffset: number, length: number): void;
  loadPages(src: Uint8Array, srcOffset: number, srcEnd: number, ram: Uint8Array, touched: Uint32Array, counts: Float64Array): number;
  savePages(
    bitmap: Uint32Array, touched: Uint32Array, ram: Uint8Array, page: number, endPage: number, maxPages: number,
    out: Uint8Array, outOffset: number, outEnd: number, counts: Float64Array,
  ): number;
  sendPages?(
    fd: number, bitmap: Uint32Array, touched: Uint32Array, ram: Uint8Array, page: number, endPage: number, maxPages: number,
    maxBytes: number, stage: Uint8Array, stageStart: number, stagePos: number, stageEnd: number, counts: Float64Array,
  ): number;
  multifdWalk?(
    bitmap: Uint32Array, touched: Uint32Array, ram: Uint8Array, page: number, endPage: number, maxPages: number,
    out: Uint8Array, outOffset: number, outEnd: number, zeroRecords: boolean, packet: Uint8Array, counts: Float64Array,
  ): number;
  multifdSend?(fd: number, header: Uint8Array, headerLength: number, ram: Uint8Array | null, pages: number, ctl: Int32Array, quitIndex: number): number;
  multifdRecv?(fd: number, buf: Uint8Array, offset: number, length: number, ctl: Int32Array, quitIndex: number): number;
  multifdRecvPages?(fd: number, header: Uint8Array, pages: number, ram: Uint8Array, touched: Uint32Array, ctl: Int32Array, quitIndex: number): number;
  shutdownSocket?(fd: number, how: number): number;
}

function loadPagesAddon(): PagesAddon | null {
  if (process.env.FERRY_NO_NATIVE === '1') return null;
  try {
    const a = createRequire(import.meta.url)(resolve(root, 'native/pages/build/Release/ferry_pages.node')) as Partial<PagesAddon>;
    return typeof a.copy === 'function' && typeof a.loadPages === 'function' && typeof a.savePages === 'function' ? (a as PagesAddon) : null;
  } catch {
    return null;
  }
}

const pages = loadPagesAddon();

/** Whether the page-copy addon (native/pages) is loaded. */
export const nativePages: boolean = pages !== null;

/**
 * Copies `length` bytes from src[srcOffset..] to dst[dstOffset..]. V8 copies
 * byte by byte when either array is on a SharedArrayBuffer (guest RAM) and
 * the two ends are not 8-byte aligned alike, which page payloads inside
 * stream buffers never are; native/pages does a memcpy. The fallback is
 * TypedArray.set. Ranges outside either array throw a RangeError.
 */
export const copyBytes: (dst: Uint8Array, dstOffset: number, src: Uint8Array, srcOffset: number, length: number) => void =
  pages !== null
    ? pages.copy
    : (dst, dstOffset, src, srcOffset, length) => {
        if (srcOffset + length > src.length) throw new RangeError('copy: range outside the array');
        dst.set(src.subarray(srcOffset, srcOffset + length), dstOffset);
      };

/**
 * Decodes the run of `CONTINUE|PAGE` and `CONTINUE|ZERO` records of one RAM
 * block that starts at src[srcOffset] and is complete before srcEnd, into
 * `ram` and its `touched` bitmap, and adds the PAGE and ZERO counts to
 * counts[0] and counts[1]. Returns the bytes consumed, stopping before the
 * first record of another kind, incomplete, or outside the block (the
 * caller's record loop takes it). Returns 0 without native/pages.
 */
export const loadPageRun: (src: Uint8Array, srcOffset: number, srcEnd: number, ram: Uint8Array, touched: Uint32Array, counts: Float64Array) => number =
  pages !== null ? pages.loadPages : () => 0;

/**
 * Keep freed malloc heap in the process instead of trimming it back to the
 * kernel at every free (native/malloc-tune: glibc's M_TRIM_THRESHOLD and
 * M_TOP_PAD). An incoming stream arrives in buffers Node allocates per
 * socket read; with glibc's defaults their memory goes back to the kernel
 * and is faulted in again at once (docs/benchmarks.md, "Block migration").
 * Returns whether the tunables were set (false without the addon or glibc).
 */
export function keepFreedHeap(trimThreshold = 256 << 20, topPad = 64 << 20): boolean {
  try {
    const addon = createRequire(import.meta.url)(resolve(root, 'native/malloc-tune/index.cjs')) as { keepFreedHeap(t: number, p: number): boolean };
    return addon.keepFreedHeap(trimThreshold, topPad);
  } catch {
    return false;
  }
}

/**
 * The sender's side of loadPageRun: walks the migration bitmap of one block
 * from `page` to `endPage`, takes at most maxPages set bits (clearing them)
 * and encodes each page as a `CONTINUE|ZERO` record (never written, or all
 * zero) or a `CONTINUE|PAGE` record into out[outOffset, outEnd), stopping
 * before a record that does not fit; adds the PAGE records, ZERO records and
 * bytes written to counts[0..2]. Returns the page the walk stopped at.
 * Without native/pages it returns `page` and does nothing: the JS sender
 * encodes every record itself.
 */
export const savePageRun: (
  bitmap: Uint32Array, touched: Uint32Array, ram: Uint8Array, page: number, endPage: number, maxPages: number,
  out: Uint8Array, outOffset: number, outEnd: number, counts: Float64Array,
) => number = pages !== null ? pages.savePages : (_b, _t, _r, page) => page;

/**
 * savePageRun without the staging copy: the same records, sent with
 * sendmsg() on the socket `fd` straight out of guest RAM (page payloads as
 * iovecs into `ram`), after the bytes already staged in
 * stage[stageStart, stagePos). Takes at most maxPages pages and maxBytes bytes
 * of records. When the socket takes less than a batch (full, or failed), the
 * unit it stopped in (the rest of the staged prefix, or the rest of one
 * record) is copied to stage from stageStart on, the records after it go
 * back into the bitmap, and the run stops: the caller hands the staged bytes
 * to the socket's own write path, which waits for room or reports the error.
 * Adds the PAGE records, ZERO records and record bytes to counts[0..2], sets
 * counts[3] to the bytes left staged at stageStart and counts[4] to 1 after a
 * short send. Returns the page the walk stopped at. null without
 * native/pages (or with FERRY_NO_ZEROCOPY=1): the sender then encodes into
 * its staging buffer.
 */
export const sendPageRun: ((
  fd: number, bitmap: Uint32Array, touched: Uint32Array, ram: Uint8Array, page: number, endPage: number, maxPages: number,
  maxBytes: number, stage: Uint8Array, stageStart: number, stagePos: number, stageEnd: number, counts: Float64Array,
) => number) | null = pages !== null && typeof pages.sendPages === 'function' && process.env.FERRY_NO_ZEROCOPY !== '1' ? pages.sendPages : null;

/** The multifd data path of native/pages (multifd.cc; src/migration/multifd/). */
export interface MultifdNative {
  /**
   * Walks one block's migration bitmap from `page`: pages with data go into
   * the packet (their be64 offsets at 320 + 8 * n, n = counts[0], updated),
   * zero pages become CONTINUE|ZERO records in out[outOffset, outEnd) when
   * zeroRecords is true. counts: [0] pages in the packet, [1] ZERO records,
   * [2] bytes put in out, [3] pages added to the packet. Returns the page it
   * stopped at.
   */
  walk(
    bitmap: Uint32Array, touched: Uint32Array, ram: Uint8Array, page: number, endPage: number, maxPages: number,
    out: Uint8Array, outOffset: number, outEnd: number, zeroRecords: boolean, packet: Uint8Array, counts: Float64Array,
  ): number;
  /** Blocking: the header, then the pages of `ram` it lists. Bytes sent, or -errno (-ECANCELED once ctl[quitIndex] is set). */
  send(fd: number, header: Uint8Array, headerLength: number, ram: Uint8Array | null, pages: number, ctl: Int32Array, quitIndex: number): number;
  /** Blocking: fills buf[offset, offset + length); fewer bytes when the peer closed; -errno. */
  recv(fd: number, buf: Uint8Array, offset: number, length: number, ctl: Int32Array, quitIndex: number): number;
  /** Blocking: the pages the header lists, straight into ram, their `touched` bits set. Bytes, or -errno. */
  recvPages(fd: number, header: Uint8Array, pages: number, ram: Uint8Array, touched: Uint32Array, ctl: Int32Array, quitIndex: number): number;
  /** shutdown(2) (0 read, 1 write, 2 both): wakes a worker blocked on the socket. 0 or -errno. */
  shutdown(fd: number, how: number): number;
}

/** null when native/pages is not built (multifd is then refused) or has no multifd functions. */
export const multifdNative: MultifdNative | null =
  pages !== null && typeof pages.multifdWalk === 'function' && typeof pages.multifdSend === 'function' &&
  typeof pages.multifdRecv === 'function' && typeof pages.multifdRecvPages === 'function' && typeof pages.shutdownSocket === 'function'
    ? {
        walk: pages.multifdWalk.bind(pages),
        send: pages.multifdSend.bind(pages),
        recv: pages.multifdRecv.bind(pages),
        recvPages: pages.multifdRecvPages.bind(pages),
        shutdown: pages.shutdownSocket.bind(pages),
      }
    : null;
