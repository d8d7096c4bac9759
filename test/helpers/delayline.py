#!/usr/bin/env python3
"""A delay line between two network namespaces, for kernels without tc netem.

    delayline.py NS_A DEV_A NS_B DEV_B DELAY_MS

Creates a TUN device DEV_A inside NS_A and DEV_B inside NS_B, prints
"ready", then copies every packet one device emits into the other after
DELAY_MS milliseconds, in order, both ways. The caller gives the devices
addresses and brings them up. Exits (and the devices vanish) when its stdin
closes, so it never outlives the test that started it.
"""
import collections
import ctypes
import fcntl
import os
import select
import struct
import sys
import time

CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000

libc = ctypes.CDLL(None, use_errno=True)


def tun_in(ns: str, name: str) -> int:
    nsfd = os.open("/var/run/netns/" + ns, os.O_RDONLY)
    try:
        if libc.setns(nsfd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, "setns(%s): %s" % (ns, os.strerror(err)))
    finally:
        os.close(nsfd)
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def main() -> None:
    ns_a, dev_a, ns_b, dev_b, delay_ms = sys.argv[1:6]
    delay = float(delay_ms) / 1000.0
    fa = tun_in(ns_a, dev_a)
    fb = tun_in(ns_b, dev_b)
    peer = {fa: fb, fb: fa}
    # packets due for each device: (time due, bytes), in arrival order
    due = {fa: collections.deque(), fb: collections.deque()}
    stdin = sys.stdin.fileno()
    print("ready", flush=True)
    while True:
        now = time.monotonic()
        timeout = 0.05
        for fd, q in due.items():
            while q and q[0][0] <= now:
                try:
                    os.write(fd, q[0][1])
                except BlockingIOError:
                    break
                except OSError:
                    pass  # the device went down: the packet is lost, as on a wire
                q.popleft()
            if q:
                timeout = min(timeout, max(0.0, q[0][0] - now))
        ready, _, _ = select.select([fa, fb, stdin], [], [], timeout)
        if stdin in ready and not os.read(stdin, 4096):
            return
        for fd in (fa, fb):
            if fd not in ready:
                continue
            for _ in range(256):
                try:
                    pkt = os.read(fd, 65536)
                except BlockingIOError:
                    break
                except OSError:
                    break
                due[peer[fd]].append((time.monotonic() + delay, pkt))


if __name__ == "__main__":
    main()
