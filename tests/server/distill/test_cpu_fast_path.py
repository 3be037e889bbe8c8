"""The CPU fast path (cache-sized chunks, common.models.cpu_chunk) against the plain whole-batch pass: DM loss and its
image gradient, the DKKT stationarity term and its gradients, and the evaluation protocol's nets and accuracies."""

import pytest
import torch

import common.models as models
from common.config import EvaluationConfig, ModelConfig
from common.models import build_model, cpu_chunk
from server.distill.dkkt import freeze_model, stationarity_loss
from server.distill.dm import dm_loss
from server.distill.dsa import DEFAULT_STRATEGY, parse_strategy, sample_dsa
from server.distill.evaluate import NetProtocol, train_and_test, train_net

CLASSES, N_REAL, N_SYN = 3, 30, 9  # more images than a chunk: the chunked path is taken
WIDTH = 16


@pytest.fixture
def chunked(monkeypatch):
    """Runs fn once with small chunks (7 images: uneven splits) and once whole; returns both results."""

    def run(fn):
        monkeypatch.setattr(models, "CPU_CHUNK", 7)
        fast = fn()
        monkeypatch.setattr(models, "CPU_CHUNK", 10**9)
        return fast, fn()

    return run


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_chunks_only_where_a_chunk_pass_equals_a_whole_pass():
    x = images(4, 0)
    assert cpu_chunk(build_model(CLASSES, 3, 16, WIDTH), x) == models.CPU_CHUNK
    assert cpu_chunk(build_model(CLASSES, 3, 16, WIDTH, norm="batchnorm").train(), x) is None  # batch statistics
    assert cpu_chunk(build_model(CLASSES, 3, 16, WIDTH, norm="batchnorm").eval(), x) == models.CPU_CHUNK


def test_dm_loss_and_its_image_gradient(chunked):
    torch.manual_seed(0)
    net = build_model(CLASSES, 3, 16, WIDTH).requires_grad_(False)
    real_x, real_g = images(N_REAL, 1), torch.arange(CLASSES).repeat_interleave(N_REAL // CLASSES)
    syn_g = torch.arange(CLASSES).repeat_interleave(N_SYN // CLASSES)
    draw = sample_dsa(parse_strategy(DEFAULT_STRATEGY), CLASSES, torch.Generator().manual_seed(2), torch.device("cpu"))

    def loss_and_grad():
        syn = images(N_SYN, 3).requires_grad_(True)
        loss = dm_loss(net, real_x, real_g, syn, syn_g, CLASSES, draw)
        return loss.detach(), torch.autograd.grad(loss, syn)[0]

    (fast, fast_grad), (plain, plain_grad) = chunked(loss_and_grad)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast_grad, plain_grad, rtol=1e-4, atol=1e-7)


def test_stationarity_value_and_gradients(chunked):
    torch.manual_seed(0)
    model = freeze_model(build_model(CLASSES, 3, 16, WIDTH), "cpu")
    y = torch.arange(CLASSES).repeat_interleave(N_REAL // CLASSES)

    def value_and_grads():
        x, lam = images(N_REAL, 4).requires_grad_(True), torch.rand(N_REAL, generator=torch.Generator().manual_seed(5))
        lam.requires_grad_(True)
        loss = stationarity_loss(model, x, y, lam)
        return (loss.detach(), *torch.autograd.grad(loss, [x, lam]))

    fast, plain = chunked(value_and_grads)
    for a, b in zip(fast, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_evaluation_nets_and_accuracies_on_fixed_seeds(chunked):
    syn_x, syn_y = images(N_REAL, 6), torch.arange(CLASSES).repeat_interleave(N_REAL // CLASSES)
    test_x, test_y = images(45, 7), torch.arange(CLASSES).repeat(15)
    cfg, model_cfg = EvaluationConfig(epochs=6, batch_size=16, lr=0.01, dsa=True), ModelConfig(width=WIDTH)

    def weights():
        net = train_net(syn_x, syn_y, NetProtocol(cfg, model_cfg, CLASSES), 11)
        return torch.cat([p.detach().flatten() for p in net.parameters()])

    fast, plain = chunked(weights)
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-6)
    accuracies = chunked(lambda: [train_and_test(syn_x, syn_y, test_x, test_y, NetProtocol(cfg, model_cfg, CLASSES), s)
                                  for s in (0, 1, 2)])
    assert accuracies[0] == accuracies[1]


@pytest.mark.parametrize(("precision", "expected"), [("fp32", "cpu"), ("bf16", "bf16")])
def test_the_stationarity_term_takes_bf16_chunks_under_bf16_autocast(monkeypatch, precision, expected):
    """Under bf16 autocast the DKKT term's passes take dkkt.BF16_CHUNK images (measured faster there), in fp32
    CPU_CHUNK; the value is the whole-batch one to float rounding either way."""
    import server.distill.dkkt as dkkt
    from common.runtime import autocast

    monkeypatch.setattr(models, "CPU_CHUNK", 7)
    monkeypatch.setattr(dkkt, "BF16_CHUNK", 11)
    sizes: list[int] = []
    chunk_grads = dkkt._chunk_grads
    monkeypatch.setattr(dkkt, "_chunk_grads", lambda model, p, b, xs, *rest: sizes.append(xs.shape[0])
                        or chunk_grads(model, p, b, xs, *rest))
    model = freeze_model(build_model(CLASSES, 3, 16, WIDTH), "cpu")
    x, y = images(N_REAL, 4), torch.arange(CLASSES).repeat_interleave(N_REAL // CLASSES)
    lam = torch.rand(N_REAL, generator=torch.Generator().manual_seed(5))
    with autocast(torch.device("cpu"), precision):
        chunked = stationarity_loss(model, x, y, lam)
    assert sizes == ({"cpu": [7, 7, 7, 7, 2], "bf16": [11, 11, 8]}[expected])
    monkeypatch.setattr(models, "CPU_CHUNK", 10**9)
    monkeypatch.setattr(dkkt, "BF16_CHUNK", 10**9)
    with autocast(torch.device("cpu"), precision):
        whole = stationarity_loss(model, x, y, lam)
    torch.testing.assert_close(chunked, whole, rtol=1e-2 if precision == "bf16" else 1e-5, atol=1e-6)
