// Page copies and RAM record encoding and decoding for the migration data path.
//
// V8 copies between typed arrays byte by byte whenever one of them lives in
// a SharedArrayBuffer (guest RAM always does) and the two ends do not share
// an 8-byte alignment, which is the normal case for page payloads inside a
// stream buffer (they follow record headers and block names). memcpy has no
// such limit. Written against the V8 API (node.h): on Node 20 N-API has no
// accessor for a SharedArrayBuffer's memory. Context-aware, so it loads in
// worker threads too.
//
//   copy(dst, dstOffset, src, srcOffset, length)   memcpy between two typed
//       arrays (either may be on a SharedArrayBuffer); RangeError when a range
//       is outside its array
//   loadPages(src, srcOffset, srcEnd, ram, touched, counts) -> bytes consumed
//       decodes consecutive `ram` records of one block from src[srcOffset,
//       srcEnd): CONTINUE|PAGE (header word + 4096 bytes) and CONTINUE|ZERO
//       (header word + fill byte), applied to `ram` (the block's bytes) and
//       its `touched` bitmap (Uint32Array, bit p = page p written) exactly as
//       the JS loader applies them. Stops before the first record that is of
//       another kind, is not complete in src, or whose offset is outside ram;
//       the caller handles that one. counts (Float64Array(2)) gets the number
//       of PAGE and ZERO records added to counts[0] and counts[1].
//   savePages(bitmap, touched, ram, page, endPage, maxPages, out, outOffset,
//             outEnd, counts) -> the page the walk stopped at
//       the source's side of loadPages: walks the migration bitmap (Uint32Array,
//       bit p = page p to send) of one block from `page` up to `endPage`,
//       takes at most maxPages set bits (clearing them) and encodes a
//       CONTINUE|ZERO record (header word + fill byte 0) for each page that is
//       zero — never written (its `touched` bit clear) or all zero bytes — and
//       a CONTINUE|PAGE record (header word + the 4096 bytes) for the others,
//       into out[outOffset, outEnd), exactly as the JS sender does. Stops
//       before a record that does not fit. counts (Float64Array(3)) gets the
//       PAGE records, ZERO records and bytes written added to counts[0..2].
//   sendPages(fd, bitmap, touched, ram, page, endPage, maxPages, maxBytes,
//             stage, stageStart, stagePos, stageEnd, counts)
//       -> the page the walk stopped at
//       savePages without the staging copy: the same records, but sent with
//       sendmsg() on the socket `fd` straight from `ram` (header words from a
//       per-thread scratch area, page payloads as iovecs into guest RAM),
//       after the bytes already staged in stage[stageStart, stagePos). Takes
//       at most maxPages pages and maxBytes bytes of records. When the
//       socket takes less than a batch (full: EAGAIN, or an error), the
//       unit it stopped in (the rest of the staged prefix, or the rest of a
//       record, at most one page and its header) is copied to stage from
//       stageStart on, the records after it go back into the bitmap (the
//       walk takes them again later), and the call returns: the caller
//       hands the staged bytes to the socket's own write path, which waits
//       for room or reports the error. counts (Float64Array(5)): PAGE
//       records, ZERO records and record bytes added to counts[0..2];
//       counts[3] set to the bytes left staged at stageStart (0 when
//       everything went), counts[4] to 1 after a short send, else 0.
#include <node.h>
#include <v8.h>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <cerrno>
#include <sys/socket.h>
#include <sys/uio.h>

#include "common.h"

namespace ferry_pages {

namespace {

void Copy(const FunctionCallbackInfo<Value>& args) {
  Isolate* isolate = args.GetIsolate();
  Span dst, src;
  size_t dstOff, srcOff, n;
  if (args.Length() < 5 || !SpanOf(args[0], &dst) || !Index(args[1], &dstOff) || !SpanOf(args[2], &src) ||
      !Index(args[3], &srcOff) || !Index(args[4], &n)) {
    return Throw(isolate, "copy(dst, dstOffset, src, srcOffset, length): bad arguments");
  }
  if (dstOff > dst.len || n > dst.len - dstOff || srcOff > src.len || n > src.len - srcOff) {
    return Throw(isolate, "copy: range outside the array");
  }
  memmove(dst.data + dstOff, src.data + srcOff, n);
}


void LoadPages(const FunctionCallbackInfo<Value>& args) {
  Isolate* isolate = args.GetIsolate();
  Span src, ram, touched, counts;
  size_t off, end;
  if (args.Length() < 6 || !SpanOf(args[0], &src) || !Index(args[1], &off) || !Index(args[2], &end) ||
      !SpanOf(args[3], &ram) || !SpanOf(args[4], &touched) || !SpanOf(args[5], &counts) ||
      !args[4]->IsUint32Array() || !args[5]->IsFloat64Array() || counts.len < 16) {
    return Throw(isolate, "loadPages(src, srcOffset, srcEnd, ram, touched, counts): bad arguments");
  }
  if (end > src.len || off > end) return Throw(isolate, "loadPages: range outside the array");
  uint32_t* bits = reinterpret_cast<uint32_t*>(touched.data);
  const size_t pagesInBitmap = (touched.len / 4) * 32;
  const size_t start = off;
  double normal = 0, zero = 0;
  while (end - off >= 9) {
    const uint8_t* h = src.data + off;
    const uint32_t hi = Be32(h);
    const uint32_t lo = Be32(h + 4);
    const uint32_t flags = lo & kFlagMask;
    const uint64_t offset = (uint64_t(hi) << 32) | (lo & ~kFlagMask);
    if (offset >= ram.len || offset + kPageSize > ram.len) break;
    const size_t page = offset / kPageSize;
    if (page >= pagesInBitmap) break;
    uint8_t* dst = ram.data + offset;
    if (flags == (kPage | kContinue)) {
      if (end - off < 8 + kPageSize) break;
      memcpy(dst, h + 8, kPageSize);
      bits[page >> 5] |= 1u << (page & 31);
      off += 8 + kPageSize;
      normal++;
    } else if (flags == (kZero | kContinue)) {
      const uint8_t fill = h[8];
      const bool wasTouched = (bits[page >> 5] >> (page & 31)) & 1;
      if (fill != 0 || (wasTouched && !IsZero(dst))) memset(dst, fill, kPageSize);
      if (fill != 0) bits[page >> 5] |= 1u << (page & 31);
      off += 9;
      zero++;
    } else {
      break;
    }
  }
  double* c = reinterpret_cast<double*>(counts.data);
  c[0] += normal;
  c[1] += zero;
  args.GetReturnValue().Set(static_cast<double>(off - start));
}


void SavePages(const FunctionCallbackInfo<Value>& args) {
  Isolate* isolate = args.GetIsolate();
  Span bitmap, touched, ram, out, counts;
  size_t page, endPage, maxPages, off, end;
  if (args.Length() < 10 || !SpanOf(args[0], &bitmap) || !SpanOf(args[1], &touched) || !SpanOf(args[2], &ram) ||
      !Index(args[3], &page) || !Index(args[4], &endPage) || !Index(args[5], &maxPages) || !SpanOf(args[6], &out) ||
      !Index(args[7], &off) || !Index(args[8], &end) || !SpanOf(args[9], &counts) || !args[0]->IsUint32Array() ||
      !args[1]->IsUint32Array() || !args[9]->IsFloat64Array() || counts.len < 24) {
    return Throw(isolate, "savePages(bitmap, touched, ram, page, endPage, maxPages, out, outOffset, outEnd, counts): bad arguments");
  }
  if (end > out.len || off > end) return Throw(isolate, "savePages: range outside the array");
  const size_t pagesInBitmap = (bitmap.len / 4) * 32;
  if (endPage > pagesInBitmap || endPage > (touched.len / 4) * 32 || endPage > ram.len / kPageSize) {
    return Throw(isolate, "savePages: endPage outside the block");
  }
  uint32_t* bits = reinterpret_cast<uint32_t*>(bitmap.data);
  const uint32_t* tbits = reinterpret_cast<const uint32_t*>(touched.data);
  const size_t start = off;
  double normal = 0, zero = 0;
  size_t taken = 0;
  size_t p;
  bool isZero;
  while (taken < maxPages && NextDirty(bits, tbits, ram.data, &page, endPage, &p, &isZero)) {
    const uint64_t offset = uint64_t(p) * kPageSize;
    const uint8_t* src = ram.data + offset;
    const size_t need = isZero ? 9 : 8 + kPageSize;
    if (end - off < need) {
      page = p;
      break;
    }
    bits[p >> 5] &= ~(1u << (p & 31));
    uint8_t* h = out.data + off;
    PutBe32(h, uint32_t(offset >> 32));
    PutBe32(h + 4, uint32_t(offset) | (isZero ? kZero : kPage) | kContinue);
    if (isZero) {
      h[8] = 0;
      zero++;
    } else {
      memcpy(h + 8, src, kPageSize);
      normal++;
    }
    off += need;
    taken++;
    page = p + 1;
  }
  if (page > endPage) page = endPage;
  double* c = reinterpret_cast<double*>(counts.data);
  c[0] += normal;
  c[1] += zero;
  c[2] += static_cast<double>(off - start);
  args.GetReturnValue().Set(static_cast<double>(page));
}


// sendPages: see the top of the file.
constexpr size_t kHdrCap = 64 * 1024;
constexpr size_t kIovCap = 1024;
constexpr size_t kBatchCap = 512 * 1024;

constexpr size_t kRecCap = kHdrCap / 8;

struct SendBatch {
  uint8_t hdr[kHdrCap];
  struct iovec iov[kIovCap];
  // per record of the batch: its page, whether it is a ZERO record, and
  // where it ends (bytes from the start of the batch, prefix included)
  uint32_t recPage[kRecCap];
  uint8_t recZero[kRecCap];
  size_t recEnd[kRecCap];
};

// one per thread (the addon is context-aware), freed when the thread ends
thread_local std::unique_ptr<SendBatch> tlsBatch;

// Sends iov[0, n) on fd until all is sent or the socket refuses more (full,
// or an error: the socket's own write path reports it). Returns the bytes
// sent; *first is the first iovec not sent completely, trimmed to its unsent
// part (n when all went).
size_t SendAll(int fd, struct iovec* iov, size_t n, size_t* first) {
  size_t sent = 0;
  size_t i = 0;
  while (i < n) {
    const ssize_t r = IovTransfer(fd, iov, n, &i, true);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) break;
    sent += size_t(r);
  }
  *first = i;
  return sent;
}

void SendPages(const FunctionCallbackInfo<Value>& args) {
  Isolate* isolate = args.GetIsolate();
  Span bitmap, touched, ram, stage, counts;
  size_t fdv, page, endPage, maxPages, maxBytes, stageStart, stagePos, stageEnd;
  if (args.Length() < 13 || !Index(args[0], &fdv) || !SpanOf(args[1], &bitmap) || !SpanOf(args[2], &touched) ||
      !SpanOf(args[3], &ram) || !Index(args[4], &page) || !Index(args[5], &endPage) || !Index(args[6], &maxPages) ||
      !Index(args[7], &maxBytes) || !SpanOf(args[8], &stage) || !Index(args[9], &stageStart) ||
      !Index(args[10], &stagePos) || !Index(args[11], &stageEnd) || !SpanOf(args[12], &counts) ||
      !args[1]->IsUint32Array() || !args[2]->IsUint32Array() || !args[12]->IsFloat64Array() || counts.len < 40 ||
      fdv > 0x7fffffff) {
    return Throw(isolate,
                 "sendPages(fd, bitmap, touched, ram, page, endPage, maxPages, maxBytes, stage, stageStart, stagePos, "
                 "stageEnd, counts): bad arguments");
  }
  if (stageEnd > stage.len || stagePos > stageEnd || stageStart > stagePos) {
    return Throw(isolate, "sendPages: range outside the array");
  }
  const size_t pagesInBitmap = (bitmap.len / 4) * 32;
  if (endPage > pagesInBitmap || endPage > (touched.len / 4) * 32 || endPage > ram.len / kPageSize) {
    return Throw(isolate, "sendPages: endPage outside the block");
  }
  if (!tlsBatch) tlsBatch = std::make_unique<SendBatch>();
  SendBatch& B = *tlsBatch;
  const int fd = int(fdv);
  uint32_t* bits = reinterpret_cast<uint32_t*>(bitmap.data);
  const uint32_t* tbits = reinterpret_cast<const uint32_t*>(touched.data);
  double normal = 0, zero = 0, encoded = 0;
  size_t taken = 0;
  size_t prefix = stagePos - stageStart;  // staged bytes that go first
  size_t staged = prefix;
  bool stop = false;
  bool short_ = false;
  while (true) {
    // one batch: [staged prefix] then records, header words in B.hdr
    size_t niov = 0, hlen = 0, blen = 0, nrec = 0;
    bool lastIsHdr = false;
    if (prefix > 0) {
      B.iov[niov++] = {stage.data + stageStart, prefix};
    }
    // what is not sent must fit in stage[stageStart, stageEnd)
    const size_t cap = std::min(kBatchCap, stageEnd - stageStart - prefix);
    size_t p;
    bool isZero;
    while (taken < maxPages && NextDirty(bits, tbits, ram.data, &page, endPage, &p, &isZero)) {
      const uint64_t offset = uint64_t(p) * kPageSize;
      const uint8_t* src = ram.data + offset;
      const size_t need = isZero ? 9 : 8 + kPageSize;
      if (encoded + need > maxBytes) {
        stop = true;
        page = p;
        break;
      }
      if (blen + need > cap || hlen + 9 > kHdrCap || niov + 2 > kIovCap || nrec == kRecCap) {
        page = p;
        break;  // the batch is full
      }
      bits[p >> 5] &= ~(1u << (p & 31));
      uint8_t* h = B.hdr + hlen;
      PutBe32(h, uint32_t(offset >> 32));
      PutBe32(h + 4, uint32_t(offset) | (isZero ? kZero : kPage) | kContinue);
      const size_t hn = isZero ? 9 : 8;
      if (isZero) h[8] = 0;
      if (lastIsHdr) {
        B.iov[niov - 1].iov_len += hn;
      } else {
        B.iov[niov++] = {h, hn};
      }
      hlen += hn;
      if (isZero) {
        lastIsHdr = true;
        zero++;
      } else {
        B.iov[niov++] = {const_cast<uint8_t*>(src), kPageSize};
        lastIsHdr = false;
        normal++;
      }
      blen += need;
      B.recPage[nrec] = uint32_t(p);
      B.recZero[nrec] = isZero ? 1 : 0;
      B.recEnd[nrec] = prefix + blen;
      nrec++;
      encoded += double(need);
      taken++;
      page = p + 1;
    }
    if (blen == 0) break;  // nothing more to send (the prefix stays staged)
    const size_t total = prefix + blen;
    size_t first = 0;
    const size_t sent = SendAll(fd, B.iov, niov, &first);
    if (sent == total) {
      prefix = 0;
      staged = 0;
      if (stop || page >= endPage || taken >= maxPages) break;
      continue;
    }
    // The socket took less (full, or failed). Stage the unit it stopped
    // in: the rest of the prefix, or the rest of the record it was in (a
    // whole record when it stopped on a boundary), so that the caller's
    // write through the socket's own path waits for room (or reports the
    // error). The records after that unit go back into the bitmap, to be
    // taken again by a later walk, and out of the counts.
    short_ = true;
    size_t unitEnd;
    size_t r = 0;
    if (sent < prefix) {
      unitEnd = prefix;
    } else {
      while (B.recEnd[r] <= sent) r++;  // exists: sent < total
      unitEnd = B.recEnd[r];
      r++;
    }
    for (size_t k = r; k < nrec; k++) {
      const uint32_t q = B.recPage[k];
      bits[q >> 5] |= 1u << (q & 31);
      const size_t len = B.recZero[k] ? 9 : 8 + kPageSize;
      if (B.recZero[k]) zero--; else normal--;
      encoded -= double(len);
      taken--;
    }
    if (r < nrec) page = B.recPage[r];
    // copy [sent, unitEnd) of the batch from the trimmed iovecs, in order;
    // the unsent part of the prefix comes first and moves down within stage
    size_t want = unitEnd - sent;
    size_t at = stageStart;
    for (size_t i = first; i < niov && want > 0; i++) {
      const size_t n = std::min(want, B.iov[i].iov_len);
      memmove(stage.data + at, B.iov[i].iov_base, n);
      at += n;
      want -= n;
    }
    staged = at - stageStart;
    break;
  }
  double* c = reinterpret_cast<double*>(counts.data);
  c[0] += normal;
  c[1] += zero;
  c[2] += encoded;
  c[3] = double(staged);
  c[4] = short_ ? 1 : 0;
  if (page > endPage) page = endPage;
  args.GetReturnValue().Set(static_cast<double>(page));
}

}  // namespace

}  // namespace ferry_pages

using namespace ferry_pages;

NODE_MODULE_INIT(/* exports, module, context */) {
  NODE_SET_METHOD(exports, "copy", Copy);
  NODE_SET_METHOD(exports, "loadPages", LoadPages);
  NODE_SET_METHOD(exports, "savePages", SavePages);
  NODE_SET_METHOD(exports, "sendPages", SendPages);
  RegisterMultifd(exports);
}
