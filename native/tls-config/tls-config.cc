// Applies an OpenSSL configuration text to the OpenSSL inside this Node
// process, after start-up. Node reads its OpenSSL configuration only when the
// process starts (--openssl-config, OPENSSL_CONF); Ferry needs one setting
// that node:tls has no option for: a TLS 1.3 server that sends no session
// tickets (SSL_CTX_set_num_tickets(0), "NumTickets = 0" in an ssl_conf
// system_default section), as QEMU's GnuTLS server does. A peer that never
// reads (a QEMU source without the return path) would otherwise hold unread
// tickets in its socket and, on close, reset the connection before its last
// bytes reach us.
//
//   loadConfig(text, appname): string | null   null on success, else why
//
// The symbols come from the OpenSSL that Node itself links in.
#include <node.h>
#include <v8.h>
#include <openssl/bio.h>
#include <openssl/conf.h>
#include <openssl/err.h>
#include <string>

namespace {

using v8::FunctionCallbackInfo;
using v8::Isolate;
using v8::Local;
using v8::Object;
using v8::String;
using v8::Value;

std::string LastError(const char* what) {
  unsigned long e = ERR_get_error();
  std::string out = what;
  if (e != 0) {
    char buf[256];
    ERR_error_string_n(e, buf, sizeof buf);
    out += ": ";
    out += buf;
  }
  ERR_clear_error();
  return out;
}

void LoadConfig(const FunctionCallbackInfo<Value>& args) {
  Isolate* isolate = args.GetIsolate();
  if (args.Length() < 2 || !args[0]->IsString() || !args[1]->IsString()) {
    isolate->ThrowException(v8::Exception::TypeError(String::NewFromUtf8Literal(isolate, "loadConfig(text, appname)")));
    return;
  }
  String::Utf8Value text(isolate, args[0]);
  String::Utf8Value app(isolate, args[1]);
  std::string failure;
  BIO* bio = BIO_new_mem_buf(*text, text.length());
  CONF* conf = bio != nullptr ? NCONF_new(nullptr) : nullptr;
  if (conf == nullptr) {
    failure = LastError("out of memory");
  } else {
    long line = 0;
    if (NCONF_load_bio(conf, bio, &line) <= 0) {
      failure = LastError(("configuration line " + std::to_string(line)).c_str());
    } else if (CONF_modules_load(conf, *app, 0) <= 0) {
      failure = LastError("CONF_modules_load");
    }
  }
  if (conf != nullptr) NCONF_free(conf);
  if (bio != nullptr) BIO_free(bio);
  if (failure.empty()) {
    args.GetReturnValue().SetNull();
  } else {
    args.GetReturnValue().Set(String::NewFromUtf8(isolate, failure.c_str()).ToLocalChecked());
  }
}

void Init(Local<Object> exports) {
  NODE_SET_METHOD(exports, "loadConfig", LoadConfig);
}

}  // namespace

NODE_MODULE(ferry_tls_config, Init)
