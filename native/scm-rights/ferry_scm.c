/*
 * ferry_scm: read a unix stream socket with recvmsg() and hand the bytes and
 * any SCM_RIGHTS file descriptors to JavaScript. Node's net module cannot
 * receive ancillary data, so the QMP monitor keeps its net.Socket (paused,
 * used for writing only) and reads through this addon instead.
 *
 * JS API (all on the main thread):
 *   open(fd, cb) -> reader    dup()s fd and polls the duplicate for input;
 *                             cb(errno | null, data: Buffer | null, fds: number[])
 *                             data === null && errno === null means EOF
 *   pause(reader) / resume(reader)
 *   close(reader)             stops polling, closes the duplicate fd
 *   send(fd, data, fds) -> n  one sendmsg(MSG_DONTWAIT) of data with fds as
 *                             SCM_RIGHTS; returns bytes sent or -errno
 *   sndbuf(fd, bytes) -> r    setsockopt(SO_SNDBUF); returns 0 or -errno. Not
 *                             about SCM_RIGHTS, but the same kind of socket
 *                             call Node does not offer (postcopy uses it to
 *                             keep the migration socket's queue short).
 *   usertimeout(fd, ms) -> r  setsockopt(TCP_USER_TIMEOUT); returns 0 or -errno
 *                             (migration sockets: a partition fails the
 *                             migration in a bounded time, see
 *                             src/migration/channel/liveness.ts).
 *   dup(fd) -> fd2            fcntl(F_DUPFD_CLOEXEC); returns the new
 *                             descriptor or -errno (a worker thread then
 *                             runs the migration socket on its own fd).
 */
#define NAPI_VERSION 8
#include <node_api.h>
#include <uv.h>

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_FDS 16
#define BUF_SIZE (64 * 1024)

typedef struct {
  uv_poll_t poll;
  napi_env env;
  napi_ref cb;
  napi_async_context actx;
  int fd;
  int active;
  int closing;
  char buf[BUF_SIZE];
} reader_t;

#define CHECK(call)                                                   \
  do {                                                                \
    if ((call) != napi_ok) {                                          \
      napi_throw_error(env, NULL, "ferry_scm: " #call " failed");     \
      return NULL;                                                    \
    }                                                                 \
  } while (0)

static void on_closed(uv_handle_t *h) {
  reader_t *r = (reader_t *)h->data;
  free(r);
}

static void reader_close(reader_t *r) {
  if (r->closing) return;
  r->closing = 1;
  r->active = 0;
  uv_poll_stop(&r->poll);
  close(r->fd);
  napi_delete_reference(r->env, r->cb);
  napi_async_destroy(r->env, r->actx);
  uv_close((uv_handle_t *)&r->poll, on_closed);
}

/* Call cb(err, data, fds) on the JS side; returns 0 if the reader is still open. */
static int deliver(reader_t *r, int err, const char *data, ssize_t len, const int *fds, int nfds) {
  napi_env env = r->env;
  napi_value argv[3], cb, recv, result;
  if (err) napi_create_int32(env, err, &argv[0]);
  else napi_get_null(env, &argv[0]);
  if (data) {
    void *dst;
    napi_create_buffer_copy(env, (size_t)len, data, &dst, &argv[1]);
  } else {
    napi_get_null(env, &argv[1]);
  }
  napi_create_array_with_length(env, (size_t)nfds, &argv[2]);
  for (int i = 0; i < nfds; i++) {
    napi_value v;
    napi_create_int32(env, fds[i], &v);
    napi_set_element(env, argv[2], (uint32_t)i, v);
  }
  napi_get_reference_value(env, r->cb, &cb);
  napi_get_global(env, &recv); /* make_callback needs an object receiver */
  napi_status st = napi_make_callback(env, r->actx, recv, cb, 3, argv, &result);
  if (st == napi_pending_exception) {
    napi_value exc;
    napi_get_and_clear_last_exception(env, &exc);
    napi_fatal_exception(env, exc);
  }
  return r->closing ? -1 : 0;
}

static void on_poll(uv_poll_t *h, int status, int events) {
  reader_t *r = (reader_t *)h->data;
  (void)events;
  if (r->closing) return;
  napi_handle_scope scope;
  napi_open_handle_scope(r->env, &scope);
  if (status < 0) {
    deliver(r, -status, NULL, 0, NULL, 0);
    napi_close_handle_scope(r->env, scope);
    return;
  }
  for (int iter = 0; iter < 16 && r->active && !r->closing; iter++) {
    union {
      char b[CMSG_SPACE(MAX_FDS * sizeof(int))];
      struct cmsghdr align;
    } ctl;
    struct iovec iov = { r->buf, BUF_SIZE };
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = ctl.b;
    msg.msg_controllen = sizeof ctl.b;
    ssize_t n = recvmsg(r->fd, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) break;
      int e = errno;
      uv_poll_stop(&r->poll);
      r->active = 0;
      deliver(r, e, NULL, 0, NULL, 0);
      break;
    }
    int fds[MAX_FDS];
    int nfds = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
      if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
      int cnt = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
      const int *p = (const int *)CMSG_DATA(c);
      for (int i = 0; i < cnt; i++) {
        int fd;
        memcpy(&fd, p + i, sizeof fd);
        if (nfds < MAX_FDS) fds[nfds++] = fd;
        else close(fd);
      }
    }
    if (n == 0 && nfds == 0) {
      uv_poll_stop(&r->poll);
      r->active = 0;
      deliver(r, 0, NULL, 0, NULL, 0); /* EOF */
      break;
    }
    if (deliver(r, 0, r->buf, n, fds, nfds) < 0) break;
  }
  napi_close_handle_scope(r->env, scope);
}

static reader_t *get_reader(napi_env env, napi_value v) {
  void *p = NULL;
  if (napi_get_value_external(env, v, &p) != napi_ok || !p) {
    napi_throw_type_error(env, NULL, "ferry_scm: expected a reader");
    return NULL;
  }
  return (reader_t *)p;
}

static napi_value js_open(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2], ext, name;
  int32_t fd;
  napi_valuetype t;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 2 || napi_get_value_int32(env, argv[0], &fd) != napi_ok) {
    napi_throw_type_error(env, NULL, "ferry_scm.open(fd, cb): fd must be a number");
    return NULL;
  }
  CHECK(napi_typeof(env, argv[1], &t));
  if (t != napi_function) {
    napi_throw_type_error(env, NULL, "ferry_scm.open(fd, cb): cb must be a function");
    return NULL;
  }
  uv_loop_t *loop;
  CHECK(napi_get_uv_event_loop(env, &loop));
  int dfd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (dfd < 0) {
    napi_throw_error(env, NULL, strerror(errno));
    return NULL;
  }
  reader_t *r = (reader_t *)calloc(1, sizeof *r);
  if (!r) {
    close(dfd);
    napi_throw_error(env, NULL, "ferry_scm: out of memory");
    return NULL;
  }
  r->env = env;
  r->fd = dfd;
  int rc = uv_poll_init(loop, &r->poll, dfd);
  if (rc < 0) {
    close(dfd);
    free(r);
    napi_throw_error(env, NULL, uv_strerror(rc));
    return NULL;
  }
  r->poll.data = r;
  napi_create_reference(env, argv[1], 1, &r->cb);
  napi_create_string_utf8(env, "ferry_scm", NAPI_AUTO_LENGTH, &name);
  napi_async_init(env, NULL, name, &r->actx);
  rc = uv_poll_start(&r->poll, UV_READABLE | UV_DISCONNECT, on_poll);
  if (rc < 0) {
    reader_close(r);
    napi_throw_error(env, NULL, uv_strerror(rc));
    return NULL;
  }
  r->active = 1;
  CHECK(napi_create_external(env, r, NULL, NULL, &ext));
  return ext;
}

static napi_value with_reader(napi_env env, napi_callback_info info, int op) {
  size_t argc = 1;
  napi_value argv[1], undef;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  napi_get_undefined(env, &undef);
  if (argc < 1) {
    napi_throw_type_error(env, NULL, "ferry_scm: expected a reader");
    return NULL;
  }
  reader_t *r = get_reader(env, argv[0]);
  if (!r) return NULL;
  if (r->closing) return undef;
  if (op == 0 && r->active) { /* pause */
    uv_poll_stop(&r->poll);
    r->active = 0;
  } else if (op == 1 && !r->active) { /* resume */
    if (uv_poll_start(&r->poll, UV_READABLE | UV_DISCONNECT, on_poll) == 0) r->active = 1;
  } else if (op == 2) {
    reader_close(r);
  }
  return undef;
}

static napi_value js_pause(napi_env env, napi_callback_info info) { return with_reader(env, info, 0); }
static napi_value js_resume(napi_env env, napi_callback_info info) { return with_reader(env, info, 1); }
static napi_value js_close(napi_env env, napi_callback_info info) { return with_reader(env, info, 2); }

static napi_value js_send(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3], res;
  int32_t fd;
  void *data;
  size_t len;
  uint32_t nfds;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 3 || napi_get_value_int32(env, argv[0], &fd) != napi_ok ||
      napi_get_buffer_info(env, argv[1], &data, &len) != napi_ok ||
      napi_get_array_length(env, argv[2], &nfds) != napi_ok || nfds > MAX_FDS) {
    napi_throw_type_error(env, NULL, "ferry_scm.send(fd, buffer, fds[<=16])");
    return NULL;
  }
  union {
    char b[CMSG_SPACE(MAX_FDS * sizeof(int))];
    struct cmsghdr align;
  } ctl;
  struct iovec iov = { data, len };
  struct msghdr msg;
  memset(&msg, 0, sizeof msg);
  memset(&ctl, 0, sizeof ctl);
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  if (nfds > 0) {
    msg.msg_control = ctl.b;
    msg.msg_controllen = CMSG_SPACE(nfds * sizeof(int));
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(nfds * sizeof(int));
    for (uint32_t i = 0; i < nfds; i++) {
      napi_value v;
      int32_t f;
      if (napi_get_element(env, argv[2], i, &v) != napi_ok || napi_get_value_int32(env, v, &f) != napi_ok) {
        napi_throw_type_error(env, NULL, "ferry_scm.send: fds must be numbers");
        return NULL;
      }
      memcpy(CMSG_DATA(c) + i * sizeof(int), &f, sizeof f);
    }
  }
  ssize_t n;
  do {
    n = sendmsg(fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
  } while (n < 0 && errno == EINTR);
  CHECK(napi_create_int64(env, n < 0 ? -(int64_t)errno : (int64_t)n, &res));
  return res;
}

/* name(fd, value): setsockopt(level, opt) with an int value >= min; returns 0 or -errno. */
static napi_value set_int_opt(napi_env env, napi_callback_info info, int level, int opt, int32_t min, const char *usage) {
  size_t argc = 2;
  napi_value argv[2], res;
  int32_t fd, value;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 2 || napi_get_value_int32(env, argv[0], &fd) != napi_ok ||
      napi_get_value_int32(env, argv[1], &value) != napi_ok || value < min) {
    napi_throw_type_error(env, NULL, usage);
    return NULL;
  }
  int r = setsockopt(fd, level, opt, &value, sizeof value) < 0 ? -errno : 0;
  CHECK(napi_create_int32(env, r, &res));
  return res;
}

static napi_value js_sndbuf(napi_env env, napi_callback_info info) {
  return set_int_opt(env, info, SOL_SOCKET, SO_SNDBUF, 1, "ferry_scm.sndbuf(fd, bytes)");
}

static napi_value js_usertimeout(napi_env env, napi_callback_info info) {
  return set_int_opt(env, info, IPPROTO_TCP, TCP_USER_TIMEOUT, 0, "ferry_scm.usertimeout(fd, ms)");
}

static napi_value js_dup(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1], res;
  int32_t fd;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 1 || napi_get_value_int32(env, argv[0], &fd) != napi_ok || fd < 0) {
    napi_throw_type_error(env, NULL, "ferry_scm.dup(fd)");
    return NULL;
  }
  int r = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  CHECK(napi_create_int32(env, r < 0 ? -errno : r, &res));
  return res;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
    { "open", NULL, js_open, NULL, NULL, NULL, napi_enumerable, NULL },
    { "pause", NULL, js_pause, NULL, NULL, NULL, napi_enumerable, NULL },
    { "resume", NULL, js_resume, NULL, NULL, NULL, napi_enumerable, NULL },
    { "close", NULL, js_close, NULL, NULL, NULL, napi_enumerable, NULL },
    { "send", NULL, js_send, NULL, NULL, NULL, napi_enumerable, NULL },
    { "sndbuf", NULL, js_sndbuf, NULL, NULL, NULL, napi_enumerable, NULL },
    { "usertimeout", NULL, js_usertimeout, NULL, NULL, NULL, napi_enumerable, NULL },
    { "dup", NULL, js_dup, NULL, NULL, NULL, napi_enumerable, NULL },
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
