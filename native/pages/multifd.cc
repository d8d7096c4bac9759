// The multifd data path (src/migration/multifd/): QEMU 7.2's multifd packets,
// built from the migration bitmap on the main thread and sent and received
// by one worker thread per channel with blocking socket I/O straight from
// and into guest RAM. The layout is in docs/spec/multifd.md.
//
//   multifdWalk(bitmap, touched, ram, page, endPage, maxPages, out, outOffset,
//               outEnd, zeroRecords, packet, counts) -> the page it stopped at
//       walks the migration bitmap of one block from `page` (below endPage),
//       taking at most maxPages set bits. A page with data goes into the
//       packet: its offset (be64) is written at 320 + 8 * n of `packet`
//       (n = counts[0], the pages already in it, updated). A zero page
//       becomes a CONTINUE|ZERO record (header word + fill byte 0) in
//       out[outOffset, outEnd) when zeroRecords is true. Stops before a page
//       that does not fit (packet full at 128 pages, out full, or a zero page
//       with zeroRecords false). counts (Float64Array(4)): [0] pages in the
//       packet, [1] ZERO records added, [2] bytes added to out, [3] pages
//       added to the packet.
//   multifdSend(fd, header, headerLength, ram, pages, ctl, quitIndex)
//       -> bytes sent, or -errno
//       blocks until header[0, headerLength) and then the `pages` pages of
//       ram whose offsets the header lists (be64 at 320 + 8 * i) are all
//       sent; waits in poll() while the socket is full. -ECANCELED once
//       ctl[quitIndex] (an Int32Array) is not zero.
//   multifdRecv(fd, buf, offset, length, ctl, quitIndex) -> bytes, or -errno
//       blocks until buf[offset, offset + length) is filled; fewer bytes
//       means the peer closed the connection.
//   multifdRecvPages(fd, header, pages, ram, touched, ctl, quitIndex)
//       -> bytes, or -errno
//       reads `pages` pages straight into ram at the offsets the header
//       lists (checked by the caller) and sets their bits in `touched`
//       (atomically: other channels write other bits of the same words).
//   shutdownSocket(fd, how) -> 0 or -errno: shutdown(2), which wakes a
//       worker blocked on the socket without closing the descriptor.
#include <cerrno>
#include <cstring>
#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include "common.h"

namespace ferry_pages {

namespace {

constexpr size_t kPacketPages = 128;
constexpr size_t kOffsetsAt = 320;
constexpr int kPollMs = 100;

inline uint64_t Be64(const uint8_t* p) {
  return (uint64_t(Be32(p)) << 32) | Be32(p + 4);
}

inline void PutBe64(uint8_t* p, uint64_t v) {
  PutBe32(p, uint32_t(v >> 32));
  PutBe32(p + 4, uint32_t(v));
}

bool Quit(const Span& ctl, size_t quitIndex) {
  const int32_t* c = reinterpret_cast<const int32_t*>(ctl.data);
  return __atomic_load_n(c + quitIndex, __ATOMIC_SEQ_CST) != 0;
}

// Waits until fd is ready for `events` (or quit); 0, or -errno.
int WaitFd(int fd, short events, const Span& ctl, size_t quitIndex) {
  for (;;) {
    if (Quit(ctl, quitIndex)) return -ECANCELED;
    struct pollfd p = {fd, events, 0};
    int r = poll(&p, 1, kPollMs);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return -errno;
    if (r > 0) return 0;
  }
}

void MultifdWalk(const FunctionCallbackInfo<Value>& args) {
  Isolate* isolate = args.GetIsolate();
  Span bitmap, touched, ram, out, packet, counts;
  size_t page, endPage, maxPages, off, end;
  if (args.Length() < 12 || !SpanOf(args[0], &bitmap) || !SpanOf(args[1], &touched) || !SpanOf(args[2], &ram) ||
      !Index(args[3], &page) || !Index(args[4], &endPage) || !Index(args[5], &maxPages) || !SpanOf(args[6], &out) ||
      !Index(args[7], &off) || !Index(args[8], &end) || !args[9]->IsBoolean() || !SpanOf(args[10], &packet) ||
      !SpanOf(args[11], &counts) || !args[0]->IsUint32Array() || !args[1]->IsUint32Array() ||
      !args[11]->IsFloat64Array() || counts.len < 32 || packet.len < kOffsetsAt + 8 * kPacketPages) {
    return Throw(isolate, "multifdWalk(bitmap, touched, ram, page, endPage, maxPages, out, outOffset, outEnd, "
                          "zeroRecords, packet, counts): bad arguments");
  }
  if (end > out.len || off > end) return Throw(isolate, "multifdWalk: range outside the array");
  if (endPage > (bitmap.len / 4) * 32 || endPage > (touched.len / 4) * 32 || endPage > ram.len / kPageSize) {
    return Throw(isolate, "multifdWalk: endPage outside the block");
  }
  const bool zeroRecords = args[9].As<v8::Boolean>()->Value();
  double* c = reinterpret_cast<double*>(counts.data);
  size_t inPacket = size_t(c[0]);
  if (inPacket > kPacketPages) return Throw(isolate, "multifdWalk: the packet holds more than 128 pages");
  uint32_t* bits = reinterpret_cast<uint32_t*>(bitmap.data);
  const uint32_t* tbits = reinterpret_cast<const uint32_t*>(touched.data);
  const size_t start = off;
  double zero = 0, added = 0;
  size_t taken = 0;
  size_t p;
  bool isZero;
  while (taken < maxPages && NextDirty(bits, tbits, ram.data, &page, endPage, &p, &isZero)) {
    const uint64_t offset = uint64_t(p) * kPageSize;
    if (isZero) {
      if (!zeroRecords || end - off < 9) {
        page = p;
        break;
      }
      uint8_t* h = out.data + off;
      PutBe32(h, uint32_t(offset >> 32));
      PutBe32(h + 4, uint32_t(offset) | kZero | kContinue);
      h[8] = 0;
      off += 9;
      zero++;
    } else {
      if (inPacket == kPacketPages) {
        page = p;
        break;
      }
      PutBe64(packet.data + kOffsetsAt + 8 * inPacket, offset);
      inPacket++;
      added++;
    }
    bits[p >> 5] &= ~(1u << (p & 31));
    taken++;
    page = p + 1;
  }
  if (page > endPage) page = endPage;
  c[0] = double(inPacket);
  c[1] += zero;
  c[2] += double(off - start);
  c[3] += added;
  args.GetReturnValue().Set(static_cast<double>(page));
}

void MultifdSend(const FunctionCallbackInfo<Value>& args) {
  Isolate* isolate = args.GetIsolate();
  Span hdr, ram = {nullptr, 0}, ctl;
  size_t fdv, hlen, pages, quitIndex;
  if (args.Length() < 7 || !Index(args[0], &fdv) || !SpanOf(args[1], &hdr) || !Index(args[2], &hlen) ||
      !(args[3]->IsNull() || SpanOf(args[3], &ram)) || !Index(args[4], &pages) || !SpanOf(args[5], &ctl) ||
      !args[5]->IsInt32Array() || !Index(args[6], &quitIndex) || fdv > 0x7fffffff) {
    return Throw(isolate, "multifdSend(fd, header, headerLength, ram, pages, ctl, quitIndex): bad arguments");
  }
  if (hlen > hdr.len || pages > kPacketPages || (pages > 0 && hdr.len < kOffsetsAt + 8 * pages) ||
      quitIndex >= ctl.len / 4) {
    return Throw(isolate, "multifdSend: range outside the array");
  }
  struct iovec iov[1 + kPacketPages];
  size_t n = 0;
  iov[n++] = {hdr.data, hlen};
  for (size_t i = 0; i < pages; i++) {
    const uint64_t offset = Be64(hdr.data + kOffsetsAt + 8 * i);
    if (offset > ram.len || ram.len - offset < kPageSize) return Throw(isolate, "multifdSend: page outside ram");
    iov[n++] = {ram.data + offset, kPageSize};
  }
  const int fd = int(fdv);
  double sent = 0;
  size_t i = 0;
  while (i < n) {
    const ssize_t r = IovTransfer(fd, iov, n, &i, true);
    if (r < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        int w = WaitFd(fd, POLLOUT, ctl, quitIndex);
        if (w < 0) return args.GetReturnValue().Set(double(w));
        continue;
      }
      return args.GetReturnValue().Set(-double(errno));
    }
    sent += double(r);
  }
  args.GetReturnValue().Set(sent);
}

// Receives into iov[0, n) until full, the peer closes, or an error.
double RecvAll(int fd, struct iovec* iov, size_t n, const Span& ctl, size_t quitIndex) {
  double got = 0;
  size_t i = 0;
  while (i < n) {
    const ssize_t r = IovTransfer(fd, iov, n, &i, false);
    if (r < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        int w = WaitFd(fd, POLLIN, ctl, quitIndex);
        if (w < 0) return double(w);
        continue;
      }
      return -double(errno);
    }
    if (r == 0) break;  // the peer closed
    got += double(r);
  }
  return got;
}

void MultifdRecv(const FunctionCallbackInfo<Value>& args) {
  Isolate* isolate = args.GetIsolate();
  Span buf, ctl;
  size_t fdv, off, len, quitIndex;
  if (args.Length() < 6 || !Index(args[0], &fdv) || !SpanOf(args[1], &buf) || !Index(args[2], &off) ||
      !Index(args[3], &len) || !SpanOf(args[4], &ctl) || !args[4]->IsInt32Array() || !Index(args[5], &quitIndex) ||
      fdv > 0x7fffffff) {
    return Throw(isolate, "multifdRecv(fd, buf, offset, length, ctl, quitIndex): bad arguments");
  }
  if (off > buf.len || len > buf.len - off || quitIndex >= ctl.len / 4) {
    return Throw(isolate, "multifdRecv: range outside the array");
  }
  struct iovec iov = {buf.data + off, len};
  args.GetReturnValue().Set(RecvAll(int(fdv), &iov, 1, ctl, quitIndex));
}

void MultifdRecvPages(const FunctionCallbackInfo<Value>& args) {
  Isolate* isolate = args.GetIsolate();
  Span hdr, ram, touched, ctl;
  size_t fdv, pages, quitIndex;
  if (args.Length() < 7 || !Index(args[0], &fdv) || !SpanOf(args[1], &hdr) || !Index(args[2], &pages) ||
      !SpanOf(args[3], &ram) || !SpanOf(args[4], &touched) || !args[4]->IsUint32Array() || !SpanOf(args[5], &ctl) ||
      !args[5]->IsInt32Array() || !Index(args[6], &quitIndex) || fdv > 0x7fffffff) {
    return Throw(isolate, "multifdRecvPages(fd, header, pages, ram, touched, ctl, quitIndex): bad arguments");
  }
  if (pages > kPacketPages || hdr.len < kOffsetsAt + 8 * pages || quitIndex >= ctl.len / 4) {
    return Throw(isolate, "multifdRecvPages: range outside the array");
  }
  struct iovec iov[kPacketPages];
  const size_t pagesInBitmap = (touched.len / 4) * 32;
  for (size_t i = 0; i < pages; i++) {
    const uint64_t offset = Be64(hdr.data + kOffsetsAt + 8 * i);
    if (offset % kPageSize != 0 || offset > ram.len || ram.len - offset < kPageSize ||
        offset / kPageSize >= pagesInBitmap) {
      return Throw(isolate, "multifdRecvPages: page outside ram");
    }
    iov[i] = {ram.data + offset, kPageSize};
  }
  const double got = RecvAll(int(fdv), iov, pages, ctl, quitIndex);
  // the pages that arrived whole are written
  if (got > 0) {
    uint32_t* bits = reinterpret_cast<uint32_t*>(touched.data);
    const size_t whole = size_t(got) / kPageSize;
    for (size_t i = 0; i < whole && i < pages; i++) {
      const size_t p = size_t(Be64(hdr.data + kOffsetsAt + 8 * i) / kPageSize);
      __atomic_fetch_or(bits + (p >> 5), 1u << (p & 31), __ATOMIC_RELAXED);
    }
  }
  args.GetReturnValue().Set(got);
}

void ShutdownSocket(const FunctionCallbackInfo<Value>& args) {
  Isolate* isolate = args.GetIsolate();
  size_t fdv, how;
  if (args.Length() < 2 || !Index(args[0], &fdv) || !Index(args[1], &how) || fdv > 0x7fffffff || how > 2) {
    return Throw(isolate, "shutdownSocket(fd, how): bad arguments");
  }
  const int r = shutdown(int(fdv), int(how));
  args.GetReturnValue().Set(r == 0 ? 0.0 : -double(errno));
}

}  // namespace

void RegisterMultifd(v8::Local<v8::Object> exports) {
  NODE_SET_METHOD(exports, "multifdWalk", MultifdWalk);
  NODE_SET_METHOD(exports, "multifdSend", MultifdSend);
  NODE_SET_METHOD(exports, "multifdRecv", MultifdRecv);
  NODE_SET_METHOD(exports, "multifdRecvPages", MultifdRecvPages);
  NODE_SET_METHOD(exports, "shutdownSocket", ShutdownSocket);
}

}  // namespace ferry_pages
