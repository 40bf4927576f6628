"""Benchmark data sets built from the shared real data (``../shared/data``)."""
