"""Benchmarks for gpugroup (not part of the installed package; see benchmarks/README.md)."""
