"""`python -m simulations.audit SETS... --out DIR`: an alias of `feddistill audit` (simulations/commands/audit.py)."""

import sys

from simulations.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["audit", *sys.argv[1:]]))
