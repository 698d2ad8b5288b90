"""Benchmarks: scripts that measure the engine against its peers (run them with `python -m bench.<name>`)."""
