"""`python -m simulations.poisoning`: an alias of `python -m simulations.benchmarks.poisoning`."""

from simulations.benchmarks.poisoning import main

if __name__ == "__main__":
    raise SystemExit(main())
