import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ChannelError, parseMigrationUri, formatMigrationUri, type MigrationUri } from '../../src/migration/channel/index.js';

type Side = 'outgoing' | 'incoming';
const valid: Array<[string, Side, MigrationUri]> = [
  ['tcp:127.0.0.1:4444', 'outgoing', { kind: 'tcp', host: '127.0.0.1', port: 4444 }],
  ['tcp:localhost:1', 'outgoing', { kind: 'tcp', host: 'localhost', port: 1 }],
  ['tcp:dest.example.com:65535', 'outgoing', { kind: 'tcp', host: 'dest.example.com', port: 65535 }],
  ['tcp:[::1]:4444', 'outgoing', { kind: 'tcp', host: '::1', port: 4444 }],
  ['tcp:[fe80::1%eth0]:4444', 'outgoing', { kind: 'tcp', host: 'fe80::1%eth0', port: 4444 }],
  ['tcp:[::]:4444', 'incoming', { kind: 'tcp', host: '::', port: 4444 }],
  ['tcp:0:4444', 'incoming', { kind: 'tcp', host: '', port: 4444 }],
  ['tcp::4444', 'incoming', { kind: 'tcp', host: '', port: 4444 }],
  ['tcp:127.0.0.1:0', 'incoming', { kind: 'tcp', host: '127.0.0.1', port: 0 }],
  ['tcp:0:4444,ipv4', 'incoming', { kind: 'tcp', host: '', port: 4444, family: 4 }],
  ['tcp:host:4444,ipv6=on', 'outgoing', { kind: 'tcp', host: 'host', port: 4444, family: 6 }],
  ['unix:/tmp/mig.sock', 'outgoing', { kind: 'unix', path: '/tmp/mig.sock' }],
  ['unix:relative/x:y', 'incoming', { kind: 'unix', path: 'relative/x:y' }],
  ['exec:cat > /tmp/f', 'outgoing', { kind: 'exec', command: 'cat > /tmp/f' }],
  ['exec:gzip -c -d /tmp/a:b.gz', 'incoming', { kind: 'exec', command: 'gzip -c -d /tmp/a:b.gz' }],
  ['exec:', 'outgoing', { kind: 'exec', command: '' }],
  ['fd:migfd', 'outgoing', { kind: 'fd', name: 'migfd' }],
  ['fd:7', 'incoming', { kind: 'fd', name: '7' }],
];

for (const [uri, side, want] of valid) {
  test(`parse ${side} ${uri}`, () => {
    assert.deepEqual(parseMigrationUri(uri, side), want);
  });
}

const invalid: Array<[string, Side, string]> = [
  ['bogus:foo', 'outgoing', "Parameter 'uri' expects a valid migration protocol"],
  ['bogus:foo', 'incoming', 'unknown migration protocol: bogus:foo'],
  ['', 'outgoing', "Parameter 'uri' expects a valid migration protocol"],
  ['', 'incoming', 'unknown migration protocol: '],
  ['tcp', 'incoming', 'unknown migration protocol: tcp'],
  ['TCP:1.2.3.4:5', 'outgoing', "Parameter 'uri' expects a valid migration protocol"],
  ['file:/tmp/x', 'incoming', 'unknown migration protocol: file:/tmp/x'],
  ['rdma:1.2.3.4:5', 'outgoing', 'RDMA support is not available in this build'],
  ['rdma:1.2.3.4:5', 'incoming', 'RDMA support is not available in this build'],
  ['tcp:1.2.3.4', 'outgoing', "error parsing address '1.2.3.4'"],
  ['tcp:1.2.3.4:', 'outgoing', "error parsing address '1.2.3.4:': port not specified"],
  ['tcp:1.2.3.4:http', 'outgoing', "error parsing address '1.2.3.4:http': invalid port 'http'"],
  ['tcp:1.2.3.4:65536', 'incoming', "error parsing address '1.2.3.4:65536': invalid port '65536'"],
  ['tcp:1.2.3.4:0', 'outgoing', "error parsing address '1.2.3.4:0': invalid port '0'"],
  ['tcp:::1:4444', 'outgoing', "error parsing address '::1:4444': invalid port ':1:4444'"],
  ['tcp:fe80::1:4444', 'outgoing', "error parsing address 'fe80::1:4444': invalid port ':1:4444'"],
  ['tcp:[::1:4444', 'outgoing', "error parsing IPv6 address '[::1:4444'"],
  ['tcp:[::1]4444', 'outgoing', "error parsing IPv6 address '[::1]4444'"],
  ['tcp:[1.2.3.4]:4444', 'outgoing', "error parsing IPv6 address '[1.2.3.4]:4444'"],
  ['tcp:[]:4444', 'incoming', "error parsing IPv6 address '[]:4444'"],
  ['tcp::4444', 'outgoing', 'host and/or port not specified'],
  ['tcp:h:4444,bogus', 'outgoing', "error parsing address 'h:4444,bogus': unknown option 'bogus'"],
  ['unix:', 'outgoing', 'UNIX socket path must not be empty'],
  [`unix:/${'x'.repeat(107)}`, 'incoming', `UNIX socket path '/${'x'.repeat(107)}' is too long`],
  ['fd:', 'outgoing', "File descriptor named '' has not been found"],
];

for (const [uri, side, message] of invalid) {
  test(`reject ${side} ${uri.length > 40 ? uri.slice(0, 40) + '…' : uri}`, () => {
    assert.throws(() => parseMigrationUri(uri, side), (err: unknown) => {
      assert.ok(err instanceof ChannelError, 'ChannelError');
      assert.equal(err.message, message);
      return true;
    });
  });
}

test('formatMigrationUri round trip', () => {
  for (const u of ['tcp:[::1]:4444', 'tcp:10.0.0.1:5', 'unix:/a/b', 'exec:cat > x', 'fd:m']) {
    assert.equal(formatMigrationUri(parseMigrationUri(u, 'outgoing')), u);
  }
});
