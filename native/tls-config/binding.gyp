{
  "targets": [
    {
      "target_name": "ferry_tls_config",
      "sources": ["tls-config.cc"],
      "cflags_cc": ["-O2", "-Wall", "-Wextra", "-std=c++17"]
    }
  ]
}
