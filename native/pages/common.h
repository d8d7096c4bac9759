// Helpers shared by the files of the pages addon (pages.cc, multifd.cc).
#pragma once

#include <node.h>
#include <v8.h>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>

namespace ferry_pages {

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

inline bool SpanOf(Local<Value> v, Span* out) {
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

inline void Throw(Isolate* isolate, const char* msg) {
  isolate->ThrowException(v8::Exception::RangeError(v8::String::NewFromUtf8(isolate, msg).ToLocalChecked()));
}

inline bool Index(Local<Value> v, size_t* out) {
  if (!v->IsNumber()) return false;
  double d = v.As<v8::Number>()->Value();
  if (!(d >= 0) || d > 9007199254740991.0) return false;
  *out = static_cast<size_t>(d);
  return true;
}

inline uint32_t Be32(const uint8_t* p) {
  return (uint32_t(p[0]) << 24) | (uint32_t(p[1]) << 16) | (uint32_t(p[2]) << 8) | uint32_t(p[3]);
}

// 64 bytes at a time, stopping at the first that is not zero (a page of data
// is told from a zero page by its first bytes).
inline bool IsZero(const uint8_t* p) {
  const uint64_t* w = reinterpret_cast<const uint64_t*>(p);
  for (uint32_t i = 0; i < kPageSize / 8; i += 8) {
    if ((w[i] | w[i + 1] | w[i + 2] | w[i + 3] | w[i + 4] | w[i + 5] | w[i + 6] | w[i + 7]) != 0) return false;
  }
  return true;
}

inline void PutBe32(uint8_t* p, uint32_t v) {
  p[0] = uint8_t(v >> 24);
  p[1] = uint8_t(v >> 16);
  p[2] = uint8_t(v >> 8);
  p[3] = uint8_t(v);
}

// The next page to send at or after *page (below endPage): the first set bit
// of the migration bitmap, and whether that page is zero (never written, its
// `touched` bit clear, or all zero bytes). False, with *page = endPage, when
// there is none.
inline bool NextDirty(const uint32_t* bits, const uint32_t* tbits, const uint8_t* ram, size_t* page, size_t endPage,
                      size_t* out, bool* zero) {
  while (*page < endPage) {
    const uint32_t word = bits[*page >> 5] & (0xffffffffu << (*page & 31));
    if (word == 0) {
      *page = (*page | 31) + 1;
      continue;
    }
    const size_t p = (*page & ~size_t(31)) | size_t(__builtin_ctz(word));
    if (p >= endPage) break;
    *out = p;
    *zero = !((tbits[p >> 5] >> (p & 31)) & 1) || IsZero(ram + uint64_t(p) * kPageSize);
    return true;
  }
  *page = endPage;
  return false;
}

// One sendmsg() (send) or recvmsg() over iov[*i, n), without blocking. On
// success *i moves past the iovecs done and the one done in part is trimmed
// to its rest. Returns the system call's result (errno set when negative).
inline ssize_t IovTransfer(int fd, struct iovec* iov, size_t n, size_t* i, bool send) {
  struct msghdr msg;
  memset(&msg, 0, sizeof msg);
  msg.msg_iov = iov + *i;
  msg.msg_iovlen = n - *i;
  const ssize_t r = send ? sendmsg(fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT) : recvmsg(fd, &msg, MSG_DONTWAIT);
  if (r <= 0) return r;
  size_t left = size_t(r);
  while (*i < n && left >= iov[*i].iov_len) {
    left -= iov[*i].iov_len;
    (*i)++;
  }
  if (*i < n && left > 0) {
    iov[*i].iov_base = static_cast<uint8_t*>(iov[*i].iov_base) + left;
    iov[*i].iov_len -= left;
  }
  return r;
}

// Adds the multifd functions (multifd.cc) to the exports.
void RegisterMultifd(v8::Local<v8::Object> exports);

}  // namespace ferry_pages
