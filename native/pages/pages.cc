// Page copies and RAM record decoding for the migration data path.
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
#include <node.h>
#include <v8.h>
#include <cstdint>
#include <cstring>

namespace {

using v8::FunctionCallbackInfo;
using v8::Isolate;
using v8::Local;
using v8::Value;

constexpr uint32_t kPageSize = 4096;
constexpr uint32_t kFlagMask = 0xfff;
constexpr uint32_t kZero = 0x002;
constexpr uint32_t kPage = 0x008;
constexpr uint32_t kContinue = 0x020;

struct Span {
  uint8_t* data;
  size_t len;
};

bool SpanOf(Local<Value> v, Span* out) {
  if (!v->IsArrayBufferView()) return false;
  auto view = v.As<v8::ArrayBufferView>();
  Local<v8::Object> buf = view->Buffer();
  void* base;
  if (buf->IsSharedArrayBuffer()) {
    base = buf.As<v8::SharedArrayBuffer>()->Data();
  } else {
    base = buf.As<v8::ArrayBuffer>()->Data();
  }
  out->data = static_cast<uint8_t*>(base) + view->ByteOffset();
  out->len = view->ByteLength();
  return true;
}

void Throw(Isolate* isolate, const char* msg) {
  isolate->ThrowException(v8::Exception::RangeError(v8::String::NewFromUtf8(isolate, msg).ToLocalChecked()));
}

bool Index(Local<Value> v, size_t* out) {
  if (!v->IsNumber()) return false;
  double d = v.As<v8::Number>()->Value();
  if (!(d >= 0) || d > 9007199254740991.0) return false;
  *out = static_cast<size_t>(d);
  return true;
}

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

inline uint32_t Be32(const uint8_t* p) {
  return (uint32_t(p[0]) << 24) | (uint32_t(p[1]) << 16) | (uint32_t(p[2]) << 8) | uint32_t(p[3]);
}

bool IsZero(const uint8_t* p) {
  const uint64_t* w = reinterpret_cast<const uint64_t*>(p);
  uint64_t acc = 0;
  for (uint32_t i = 0; i < kPageSize / 8; i++) acc |= w[i];
  return acc == 0;
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

}  // namespace

NODE_MODULE_INIT(/* exports, module, context */) {
  NODE_SET_METHOD(exports, "copy", Copy);
  NODE_SET_METHOD(exports, "loadPages", LoadPages);
}
