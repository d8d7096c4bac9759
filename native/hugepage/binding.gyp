{
  "targets": [
    {
      "target_name": "ferry_hugepage",
      "sources": ["hugepage.cc"],
      "cflags_cc": ["-O2", "-Wall", "-Wextra", "-std=c++17"]
    }
  ]
}
