{
  "targets": [
    {
      "target_name": "ferry_malloc_tune",
      "sources": ["malloc-tune.c"],
      "cflags": ["-O2", "-Wall", "-Wextra"]
    }
  ]
}
