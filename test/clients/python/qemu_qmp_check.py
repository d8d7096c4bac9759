#!/usr/bin/env python3
"""
Drive a QMP server with QEMU's own Python library, unchanged: the asyncio
client `qemu.qmp.QMPClient` and the synchronous `qemu.qmp.legacy.
QEMUMonitorProtocol` (what QEMU's iotests and scripts use).

usage: qemu_qmp_check.py unix:PATH | tcp:HOST:PORT
Prints one JSON object with what each client saw; exits non-zero on failure.
The library comes from PYTHONPATH (QEMU's python/ directory).
"""
import asyncio
import json
import sys

from qemu.qmp import EventListener, ExecuteError, QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol


def parse_target(spec):
    if spec.startswith('unix:'):
        return spec[5:]
    if spec.startswith('tcp:'):
        host, port = spec[4:].rsplit(':', 1)
        return (host, int(port))
    raise SystemExit(f'bad target {spec}')


async def async_client(addr):
    out = {}
    qmp = QMPClient('ferry-check')
    await qmp.connect(addr)  # reads the greeting and negotiates
    # the library validated the greeting into its Greeting model
    out['greeting_version'] = dict(qmp.greeting._raw['QMP']['version']['qemu'])
    out['greeting_capabilities'] = list(qmp.greeting.QMP.capabilities)
    out['status0'] = (await qmp.execute('query-status'))['status']
    out['version'] = await qmp.execute('query-version')
    caps = await qmp.execute('query-migrate-capabilities')
    out['capabilities'] = {c['capability']: c['state'] for c in caps}

    seen = []
    listener = EventListener(('STOP', 'RESUME'))
    with qmp.listen(listener):
        await qmp.execute('stop')
        out['status_stopped'] = (await qmp.execute('query-status'))['status']
        await qmp.execute('cont')
        async def collect():
            async for event in listener:
                seen.append(event)
                if event['event'] == 'RESUME':
                    return
        await asyncio.wait_for(collect(), 5)
    out['events'] = [e['event'] for e in seen]
    out['event_timestamps_ok'] = all(
        isinstance(e['timestamp']['seconds'], int) and 0 <= e['timestamp']['microseconds'] <= 999999
        for e in seen)
    out['status_resumed'] = (await qmp.execute('query-status'))['status']

    try:
        await qmp.execute('no-such-command')
        out['unknown'] = None
    except ExecuteError as err:
        out['unknown'] = {'class': err.error_class, 'desc': str(err)}
    try:
        await qmp.execute('migrate-set-capabilities',
                          {'capabilities': [{'capability': 'nosuch', 'state': True}]})
        out['bad_arg'] = None
    except ExecuteError as err:
        out['bad_arg'] = {'class': err.error_class, 'desc': str(err)}
    # raw message API with an explicit id
    msg = qmp.make_execute_msg('query-status')
    reply = await qmp.execute_msg(msg)
    out['execute_msg'] = reply['status']
    await qmp.disconnect()
    return out


def legacy_client(addr):
    out = {}
    mon = QEMUMonitorProtocol(addr)
    greeting = mon.connect(negotiate=True)
    out['greeting_version'] = greeting['QMP']['version']['qemu']
    out['status0'] = mon.cmd('query-status')['return']['status']
    mon.cmd('stop')
    ev = mon.pull_event(wait=5.0)
    out['event1'] = ev['event'] if ev else None
    out['status_stopped'] = mon.command('query-status')['status']
    mon.cmd('cont')
    ev = mon.pull_event(wait=5.0)
    out['event2'] = ev['event'] if ev else None
    r = mon.cmd('no-such-command')
    out['unknown'] = r.get('error')
    out['caps_count'] = len(mon.command('query-migrate-capabilities'))
    mon.close()
    return out


def main():
    addr = parse_target(sys.argv[1])
    # the legacy client uses the thread's default event loop: run it first,
    # asyncio.run() leaves no current loop behind
    legacy = legacy_client(addr)
    result = {'legacy': legacy, 'async': asyncio.run(async_client(addr))}
    print(json.dumps(result))


if __name__ == '__main__':
    main()
