# Real network faults (test/reliability/netfault.test.ts): `ip` and `tc`
# (iproute2) for the namespaces, the veth and the qdiscs, `nft` (nftables)
# for random packet loss, `ping` to check netem's delay where the kernel has
# netem. The test probes each facility at run time and skips what the
# kernel lacks, with the reason.
apt_install iproute2 nftables iputils-ping
