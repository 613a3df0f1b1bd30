"""Benchmarks of prompter-worker against the local servers: `python -m bench --help`."""
