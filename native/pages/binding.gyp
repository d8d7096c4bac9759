{
  "targets": [
    {
      "target_name": "ferry_pages",
      "sources": ["pages.cc"],
      "cflags_cc": ["-O2", "-Wall", "-Wextra", "-std=c++17"]
    }
  ]
}
