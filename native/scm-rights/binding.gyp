{
  "targets": [
    {
      "target_name": "ferry_scm",
      "sources": ["ferry_scm.c"],
      "cflags": ["-Wall", "-Wextra", "-O2"]
    }
  ]
}
