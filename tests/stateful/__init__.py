"""The hypothesis stateful test of the whole runtime (harness in tests/support/stateful/), its checks and mutants."""
