"""Benchmarks that back the efficiency claims of the library (run with ``python -m``)."""
