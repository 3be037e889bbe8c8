"""`python -m simulations.bench_distill`: an alias of `python -m simulations.benchmarks.bench_distill`."""

from simulations.benchmarks.bench_distill import main

if __name__ == "__main__":
    raise SystemExit(main())
