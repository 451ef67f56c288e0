"""Tests of natpool.wire: the keepalive frame and handover signal codecs."""
