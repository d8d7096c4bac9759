{
  "targets": [
    {
      "target_name": "ferry_pages",
      "sources": ["pages.cc", "multifd.cc"],
      "cflags_cc": ["-O2", "-Wall", "-Wextra", "-std=c++17"]
    }
  ]
}
