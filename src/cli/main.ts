#!/usr/bin/env node
/** `ferry` — the command-line entry point. */
import { createRequire } from 'node:module';

const USAGE = `usage: ferry <command> [options]

commands:
  vm [qemu-style options]     start a virtual machine driven over QMP
  qmp SOCKET [cmd [k=v ...]]  talk to a QMP monitor (one-shot or interactive)
  demo [options]              live-migrate a running 1 GiB VM between two local processes
  inspect [options] FILE      list the sections and records of a migration stream (- reads stdin)
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
