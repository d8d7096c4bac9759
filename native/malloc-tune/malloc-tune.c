// glibc's malloc tunables for a `ferry vm` process (N-API).
//
// The incoming side of a migration receives its stream in 64 KiB buffers
// that Node allocates for every socket read and frees at the next GC. With
// glibc's defaults the top of the heap is trimmed (given back to the kernel)
// whenever 128 KiB at its end are free, so the same memory is faulted in
// again at once, at the hypervisor's price on our hosts. Raising the trim
// threshold and the top pad keeps it: measured in docs/benchmarks.md
// ("Block migration"): about 0.4 s less system time and 10 % less time for
// a 1 GiB block migration on the destination.
//
//   keepFreedHeap(trimThreshold, topPad): boolean   mallopt(M_TRIM_THRESHOLD),
//                                                    mallopt(M_TOP_PAD); false
//                                                    without glibc
#include <node_api.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif

static napi_value KeepFreedHeap(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  napi_value result;
  int ok = 0;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) == napi_ok && argc == 2) {
    int64_t trim = 0;
    int64_t pad = 0;
    if (napi_get_value_int64(env, argv[0], &trim) == napi_ok && napi_get_value_int64(env, argv[1], &pad) == napi_ok &&
        trim > 0 && pad >= 0 && trim <= 0x7fffffff && pad <= 0x7fffffff) {
#ifdef __GLIBC__
      ok = mallopt(M_TRIM_THRESHOLD, (int)trim) == 1 && mallopt(M_TOP_PAD, (int)pad) == 1;
#endif
    }
  }
  napi_get_boolean(env, ok, &result);
  return result;
}

NAPI_MODULE_INIT() {
  napi_value fn;
  napi_create_function(env, "keepFreedHeap", NAPI_AUTO_LENGTH, KeepFreedHeap, NULL, &fn);
  napi_set_named_property(env, exports, "keepFreedHeap", fn);
  return exports;
}
