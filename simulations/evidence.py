"""`python -m simulations.evidence`: the evidence protocol's command, an alias of `feddistill sweep` for the protocol
grids under configs/grids/ (simulations/grid/command.py: the flags; simulations/grid/stages.py: the stages)."""

from simulations.grid.command import main

if __name__ == "__main__":
    raise SystemExit(main())
