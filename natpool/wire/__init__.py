"""Byte-level codecs: keepalive frames (UDP) and handover signals (signalling channel)."""
