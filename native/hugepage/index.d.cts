export declare const available: boolean;
export declare const loadError: unknown;
export declare function madviseHugepage(buf: SharedArrayBuffer | ArrayBuffer | ArrayBufferView): boolean;
export declare function madviseAdvice(
  buf: SharedArrayBuffer | ArrayBuffer | ArrayBufferView,
  name: 'hugepage' | 'nohugepage' | 'willneed' | 'populate_write' | 'dontneed',
): boolean;
