"""The grid runner: every benchmark grid (configs/grids/*.yaml) as cells on one pool.

  cells.py       one cell type, the resume rule, the worker's function, one results collection
  pool.py        one pool interface: this process, local processes, or Ray (a local one or a cluster)
  edge.py        the received models, one cache of finished federations
  protocol.py    protocol grids (`kind: protocol`, the evidence presets) and their cells
  stages.py      a protocol grid's stages: edge, calibrate, balance, curve, table (report.py: report)
  sweep.py       sweep grids (pipc x ipc x method x seed)
  command.py     the command line shared by `feddistill sweep` and `python -m simulations.evidence`
"""
