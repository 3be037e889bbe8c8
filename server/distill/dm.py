"""Distribution Matching (DM, Zhao & Bilen 2023) loss, batched over classes.

L_DM = sum_c || mean_{x in B_c} psi(A_c(x)) - mean_{s in S_c} psi(A_c(s)) ||^2   (RESEARCH.md section 2.1)

psi is a freshly initialised, frozen ConvNet trunk per iteration; A_c is one DSA draw per class shared by
the real and the synthetic images of class c. All classes go through one forward for the real batch
(no_grad: real embeddings are constants, as in the reference) and one for the synthetic batch, which is
also what the reference does for its BatchNorm variant; the class means are segment means. On the CPU each
forward runs over cache-sized chunks of images (`common.models.cpu_chunk`; the same values to float rounding).
Under bf16 autocast (`distill.precision`, decided in `methods.distill`) the embeddings are bf16, the means in the
images' dtype (fp32).
"""

from __future__ import annotations

import torch
from torch import nn

from common.models import ConvNet, cpu_chunk, in_chunks
from server.distill.dsa import DSAParams, apply_dsa


class PublicPool:
    """The public images sorted by class, sampling up to `batch_real` images per class without a Python loop."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, num_classes: int, batch_real: int) -> None:
        counts = torch.bincount(y, minlength=num_classes)
        if counts.numel() > num_classes:
            raise ValueError(f"public labels go up to {int(y.max())} but num_classes={num_classes}")
        empty = [c for c in range(num_classes) if counts[c] == 0]
        if empty:
            raise ValueError(f"DM needs public images of every class; classes {empty} have none (split.pipc)")
        order = torch.argsort(y, stable=True)
        self.x, self.y = x[order], y[order]
        starts = torch.cumsum(counts, 0) - counts
        per_class = counts.clamp(max=batch_real)
        # Positions (in class-sorted order) of the first min(batch_real, n_c) images of every class.
        self.take = torch.cat([starts[c] + torch.arange(int(n), device=y.device) for c, n in enumerate(per_class)])
        self.groups = self.y[self.take]

    def sample(self, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A fresh random real batch (images, class of each image), class-major."""
        shuffle = torch.randperm(self.y.numel(), generator=generator, device=self.y.device)
        perm = shuffle[torch.argsort(self.y[shuffle], stable=True)]  # class-sorted, random within a class
        idx = perm[self.take]
        return self.x[idx], self.groups


def randomize_(net: nn.Module) -> nn.Module:
    """Re-draws every layer's parameters in place with its default init (same law as a fresh network)."""
    for module in net.modules():
        if module is not net and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return net


def segment_mean(values: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Mean of the rows of `values` per group: (N, D), (N,) -> (num_groups, D); empty groups give 0."""
    sums = values.new_zeros(num_groups, values.shape[1]).index_add(0, groups, values)
    counts = torch.bincount(groups, minlength=num_groups).clamp(min=1).to(values.dtype)
    return sums / counts.unsqueeze(1)


def dm_loss(
    embedder: ConvNet,
    real_x: torch.Tensor,
    real_groups: torch.Tensor,
    syn_x: torch.Tensor,
    syn_groups: torch.Tensor,
    num_classes: int,
    params: DSAParams | None,
) -> torch.Tensor:
    """Batched DM loss; `params` holds one DSA draw per class (None: no augmentation)."""
    chunk = cpu_chunk(embedder, real_x)
    with torch.no_grad():
        real = in_chunks(embedder.embed, apply_dsa(real_x, params, real_groups), chunk)
    # The means in the images' dtype (under bf16 autocast the embeddings are bf16; a no-op otherwise).
    real_mean = segment_mean(real.to(syn_x.dtype), real_groups, num_classes)
    syn_embedded = in_chunks(embedder.embed, apply_dsa(syn_x, params, syn_groups), chunk).to(syn_x.dtype)
    syn_mean = segment_mean(syn_embedded, syn_groups, num_classes)
    return ((real_mean - syn_mean) ** 2).sum()


def reference_dm_loss(
    embedder: ConvNet,
    real_x: torch.Tensor,
    real_groups: torch.Tensor,
    syn_x: torch.Tensor,
    syn_groups: torch.Tensor,
    num_classes: int,
    params: DSAParams | None,
) -> torch.Tensor:
    """The same loss computed like the DM reference: a Python loop over classes, one forward each."""
    loss = syn_x.new_zeros(())
    for c in range(num_classes):
        draw = params.select(c) if params is not None else None
        real_c, syn_c = real_x[real_groups == c], syn_x[syn_groups == c]
        zeros_real = torch.zeros(real_c.shape[0], dtype=torch.long, device=real_c.device)
        zeros_syn = torch.zeros(syn_c.shape[0], dtype=torch.long, device=syn_c.device)
        out_real = embedder.embed(apply_dsa(real_c, draw, zeros_real)).detach()
        out_syn = embedder.embed(apply_dsa(syn_c, draw, zeros_syn))
        loss = loss + ((out_real.mean(0) - out_syn.mean(0)) ** 2).sum()
    return loss
