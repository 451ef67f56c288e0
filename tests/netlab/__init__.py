"""Tests of natpool.netlab: natpool behind two real Linux kernel NATs (root, netns, nftables, conntrack)."""
