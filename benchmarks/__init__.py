"""Benchmarks of keras-factorized. Run `python -m benchmarks --help`."""
