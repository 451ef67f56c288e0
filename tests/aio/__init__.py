"""Tests of natpool.aio: the asyncio driver and the reference TCP signalling, on loopback only."""
