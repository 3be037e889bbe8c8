"""Benchmarks and measurements: each a `python -m simulations.benchmarks.<name>` script writing under docs/results/."""
