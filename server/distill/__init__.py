"""Server-side dataset distillation: DM, Deep KKT (DSV) and DM + DKKT, with the DM evaluation protocol.

Pure PyTorch; nothing here imports flwr. Entry point: `server.distill.run.run_distillation`.
"""
