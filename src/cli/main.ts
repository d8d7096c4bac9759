#!/usr/bin/env node
/** `ferry` — the command-line entry point. */
import { createRequire } from 'node:module';

const USAGE = `usage: ferry <command> [options]

commands:
  vm [qemu-style options]     start a virtual machine driven over QMP
  qmp SOCKET [cmd [k=v ...]]  talk to a QMP monitor (one-shot or interactive)
  demo [options]              live-migrate a running 1 GiB VM between two local processes
  inspect [options] FILE      list the sections and records of a migration stream (- reads stdin)
  migrate SRC DST [options]   migrate between two monitors (Ferry or QEMU), with a progress bar and the result
  report INPUT.json [-o OUT]  draw a traced migration as one self-contained HTML page
  help                        this text

ferry vm options:
  -m SIZE  -smp N  -name NAME  -S  -machine none[,memory-backend=ID]  -mem-prealloc
  -qmp unix:PATH,server=on,wait=off | tcp:HOST:PORT,server=on,wait=off   (repeatable)
  -incoming URI|defer   (tcp:HOST:PORT, unix:PATH, exec:CMD, fd:NAME)
  -object memory-backend-ram,id=ID,size=SIZE[,prealloc=on|off]
  -object tls-creds-x509,id=ID,dir=DIR,endpoint=server|client[,verify-peer=on|off]
  -object tls-creds-psk,id=ID,dir=DIR,endpoint=server|client[,username=NAME]
  -object tls-creds-anon,id=ID,endpoint=server|client
  -workload idle | sweep[,start=SIZE][,end=SIZE] | stress[,rate=BYTES][,wss=SIZE][,write=BYTES][,seed=N][,read=on]
  -fill zero | random[,seed=N] | text[,seed=N]
  -serial none | stdio | file:PATH
  -metrics tcp:HOST:PORT   serve the migration statistics to Prometheus at http://HOST:PORT/metrics (port 0: any)
  -drive file=PATH[,format=raw|qcow2][,if=ide|virtio|none][,index=N][,id=ID][,readonly=on][,cache=MODE]   (repeatable)
        if=ide (default): ide<bus>-hd<unit>, index 0-3; if=virtio: virtio<N>; if=none: none<N>; id=ID names it instead.
        cache=writeback (default) | none | writethrough | directsync | unsafe: I/O always goes through the host
        page cache; writethrough and directsync flush after every write, unsafe never flushes.
  -disk-workload drive=NAME[,rate=BYTES][,wss=SIZE][,start=SIZE][,write=BYTES][,seed=N][,steps=N][,read=on]
        guest disk writes to the drive NAME (as query-block shows it) while the guest runs: rate bytes per
        second (default 1M, 0 = unlimited), write bytes per step (multiple of 512, default 4K) at random
        sectors of [start, start+wss), content fixed by seed and step; read=on reads one sector per step
        into the checksum (x-query-disk-workload)
`;

async function run(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv;
  switch (cmd) {
    case 'vm':
      return (await import('./vm.js')).main(rest);
    case 'qmp':
      return (await import('./qmp.js')).main(rest);
    case 'demo':
      return (await import('./demo.js')).main(rest);
    case 'inspect':
      return (await import('./inspect.js')).main(rest);
    case 'migrate':
      return (await import('./migrate.js')).main(rest);
    case 'report':
      return (await import('./report.js')).main(rest);
    case '--version':
    case '-V': {
      const pkg = createRequire(import.meta.url)('../../../package.json') as { version: string };
      process.stdout.write(`ferry ${pkg.version}\n`);
      return 0;
    }
    case undefined:
    case 'help':
    case '--help':
    case '-h':
      process.stdout.write(USAGE);
      return cmd === undefined ? 1 : 0;
    default:
      process.stderr.write(`ferry: unknown command '${cmd}'\n${USAGE}`);
      return 1;
  }
}

run(process.argv.slice(2)).then(
  (code) => {
    if (code >= 0) process.exitCode = code;
  },
  (e: unknown) => {
    process.stderr.write(`ferry: ${e instanceof Error ? e.stack ?? e.message : String(e)}\n`);
    process.exitCode = 1;
  },
);
