"""`python -m simulations.reliability_report`: an alias of `python -m simulations.reports.reliability_report`."""

from simulations.reports.reliability_report import main

if __name__ == "__main__":
    raise SystemExit(main())
