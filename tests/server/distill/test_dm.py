import pytest
import torch

from common.config import DistillConfig, ModelConfig
from common.models import build_model
from server.distill.dm import PublicPool, dm_loss, randomize_, reference_dm_loss
from server.distill.dsa import FAMILIES, sample_dsa
from server.distill.methods import distill

C, SIZE, WIDTH = 3, 16, 8


def public(per_class: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(C).repeat(per_class)  # interleaved on purpose: the pool must sort by class
    patterns = torch.randn(C, 3, SIZE, SIZE, generator=g)  # one image pattern per class, plus noise
    return patterns[y] + 0.3 * torch.randn(len(y), 3, SIZE, SIZE, generator=g), y


def embedder(seed: int = 0, dtype: torch.dtype = torch.float32):
    torch.manual_seed(seed)
    return build_model(C, 3, SIZE, WIDTH, 3).to(dtype).train().requires_grad_(False)


def test_pool_samples_per_class_without_replacement():
    x, y = public(per_class=7)
    pool = PublicPool(x, y, C, batch_real=5)
    rx, groups = pool.sample(torch.Generator().manual_seed(1))
    assert groups.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    for c in range(C):
        rows = rx[groups == c]
        matches = (rows.unsqueeze(1) == x[y == c].unsqueeze(0)).flatten(2).all(2)
        assert (matches.sum(1) == 1).all() and len(set(matches.float().argmax(1).tolist())) == 5
    with pytest.raises(ValueError, match="classes \\[2\\] have none"):
        PublicPool(x[y != 2], y[y != 2], C, batch_real=5)


def test_dm_loss_is_zero_when_the_synthetic_set_is_the_real_batch():
    x, y = public(per_class=4)
    x = x.double()
    pool = PublicPool(x, y, C, batch_real=4)  # batch_real = pipc = ipc
    syn = pool.x.clone()  # class-major copy of the whole public set
    real_x, real_groups = pool.sample(torch.Generator().manual_seed(0))
    for seed in range(6):
        params = sample_dsa(FAMILIES, C, torch.Generator().manual_seed(seed))
        loss = dm_loss(embedder(seed, torch.float64), real_x, real_groups, syn, pool.y, C, params)
        assert loss.item() < 1e-20
    other = dm_loss(embedder(0, torch.float64), real_x, real_groups, syn + 0.5, pool.y, C, params)
    assert other.item() > 1e-6


def test_batched_dm_equals_the_reference_loop():
    x, y = public(per_class=6)
    pool = PublicPool(x, y, C, batch_real=4)
    real_x, real_groups = pool.sample(torch.Generator().manual_seed(0))
    syn = torch.randn(C * 2, 3, SIZE, SIZE, requires_grad=True)
    syn_y = torch.arange(C).repeat_interleave(2)
    net = embedder()
    for seed in range(4):
        params = sample_dsa(FAMILIES, C, torch.Generator().manual_seed(seed))
        batched = dm_loss(net, real_x, real_groups, syn, syn_y, C, params)
        looped = reference_dm_loss(net, real_x, real_groups, syn, syn_y, C, params)
        assert torch.allclose(batched, looped, rtol=1e-5)
        g1, g2 = torch.autograd.grad(batched, syn)[0], torch.autograd.grad(looped, syn)[0]
        assert torch.allclose(g1, g2, rtol=1e-4, atol=1e-7)


def test_randomize_redraws_parameters():
    net = embedder()
    before = [p.clone() for p in net.parameters()]
    randomize_(net)
    convs = [(a, b) for a, b in zip(before, net.parameters(), strict=True) if a.dim() == 4]
    assert all(not torch.equal(a, b) for a, b in convs)
    assert not any(p.requires_grad for p in net.parameters())


def test_dm_loss_decreases_under_optimisation():
    """Distilling with DM from noise lowers the DM loss, measured with fixed embedders and no augmentation."""
    x, y = public(per_class=8)
    cfg = DistillConfig(method="dm", ipc=2, init="noise", iterations=30, lr_img=10.0, batch_real=8)
    model_cfg = ModelConfig(width=WIDTH)
    real_x, real_groups = PublicPool(x, y, C, batch_real=8).sample()
    start = distill(None, x, y, cfg.model_copy(update={"iterations": 0}), model_cfg, C, seed=0, device="cpu")
    end = distill(None, x, y, cfg, model_cfg, C, seed=0, device="cpu")
    assert torch.equal(start.labels, end.labels)

    def expected_loss(images: torch.Tensor) -> float:
        return sum(dm_loss(embedder(s), real_x, real_groups, images, start.labels, C, None).item() for s in range(5))

    assert expected_loss(end.images) < 0.8 * expected_loss(start.images)  # 0.52-0.72 over seeds 0-3
