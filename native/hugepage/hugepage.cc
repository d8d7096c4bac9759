// madvise(MADV_HUGEPAGE) over the memory of a SharedArrayBuffer (or an
// ArrayBuffer / typed array), for the RAM blocks of a Ferry guest.
//
// Written against the V8 API (node.h), not N-API: on Node 20 N-API has no
// accessor for a SharedArrayBuffer's memory.
//
//   madviseHugepage(buf): boolean   true when madvise succeeded on the
//                                   2 MiB-aligned part of the buffer
//   madviseAdvice(buf, name): boolean  'hugepage' | 'nohugepage' | 'willneed' | 'populate_write' |
//                                   'dontneed' (only the whole host pages inside buf)
#include <node.h>
#include <v8.h>
#include <sys/mman.h>
#include <unistd.h>
#include <cerrno>
#include <cstdint>
#include <cstring>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

namespace {

using v8::FunctionCallbackInfo;
using v8::Isolate;
using v8::Local;
using v8::Object;
using v8::Value;

bool MemoryOf(Local<Value> v, char** data, size_t* len) {
  if (v->IsSharedArrayBuffer()) {
    auto bs = v.As<v8::SharedArrayBuffer>()->GetBackingStore();
    *data = static_cast<char*>(bs->Data());
    *len = bs->ByteLength();
    return true;
  }
  if (v->IsArrayBuffer()) {
    auto bs = v.As<v8::ArrayBuffer>()->GetBackingStore();
    *data = static_cast<char*>(bs->Data());
    *len = bs->ByteLength();
    return true;
  }
  if (v->IsArrayBufferView()) {
    auto view = v.As<v8::ArrayBufferView>();
    auto bs = view->Buffer()->GetBackingStore();
    *data = static_cast<char*>(bs->Data()) + view->ByteOffset();
    *len = view->ByteLength();
    return true;
  }
  return false;
}

bool Advise(char* data, size_t len, int advice) {
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  // whole pages inside [data, data+len): madvise needs an aligned start
  uintptr_t start = (reinterpret_cast<uintptr_t>(data) + page - 1) & ~(page - 1);
  uintptr_t end = (reinterpret_cast<uintptr_t>(data) + len) & ~(page - 1);
  if (end <= start) return false;
  return madvise(reinterpret_cast<void*>(start), end - start, advice) == 0;
}

void Throw(Isolate* iso, const char* msg) {
  iso->ThrowException(v8::Exception::TypeError(v8::String::NewFromUtf8(iso, msg).ToLocalChecked()));
}

void MadviseHugepage(const FunctionCallbackInfo<Value>& args) {
  Isolate* iso = args.GetIsolate();
  char* data;
  size_t len;
  if (args.Length() < 1 || !MemoryOf(args[0], &data, &len)) {
    return Throw(iso, "madviseHugepage: expected a SharedArrayBuffer, ArrayBuffer or typed array");
  }
  args.GetReturnValue().Set(Advise(data, len, MADV_HUGEPAGE));
}

void MadviseAdvice(const FunctionCallbackInfo<Value>& args) {
  Isolate* iso = args.GetIsolate();
  char* data;
  size_t len;
  if (args.Length() < 2 || !MemoryOf(args[0], &data, &len) || !args[1]->IsString()) {
    return Throw(iso, "madviseAdvice: expected (buffer, name)");
  }
  v8::String::Utf8Value name(iso, args[1]);
  int advice;
  if (strcmp(*name, "hugepage") == 0) advice = MADV_HUGEPAGE;
  else if (strcmp(*name, "nohugepage") == 0) advice = MADV_NOHUGEPAGE;
  else if (strcmp(*name, "willneed") == 0) advice = MADV_WILLNEED;
  else if (strcmp(*name, "populate_write") == 0) advice = MADV_POPULATE_WRITE;
  else if (strcmp(*name, "dontneed") == 0) advice = MADV_DONTNEED;
  else return Throw(iso, "madviseAdvice: unknown advice");
  args.GetReturnValue().Set(Advise(data, len, advice));
}

}  // namespace

// Context-aware: the prefault runs on helper worker threads, and a module
// registered with plain NODE_MODULE refuses to load in a worker.
NODE_MODULE_INIT(/* exports, module, context */) {
  NODE_SET_METHOD(exports, "madviseHugepage", MadviseHugepage);
  NODE_SET_METHOD(exports, "madviseAdvice", MadviseAdvice);
}
