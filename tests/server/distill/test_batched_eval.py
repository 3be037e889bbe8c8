import pytest
import torch

from common.config import EvaluationConfig, ModelConfig
from server.distill.evaluate import NetProtocol, evaluate_synthetic, train_and_test, train_net, train_nets_batched

C, SIZE = 3, 8


def data(n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(C * n_per_class, 3, SIZE, SIZE, generator=g), torch.arange(C).repeat_interleave(n_per_class)


@pytest.mark.parametrize("norm", ["instancenorm", "batchnorm"])
def test_batched_training_gives_the_weights_of_sequential_runs_with_the_same_seeds(norm):
    """Own init, own shuffling, own DSA draws per net, lr decay at the half, a partial last batch."""
    x, y = data(4, seed=1)
    cfg = EvaluationConfig(epochs=4, batch_size=5, dsa=True)
    model = ModelConfig(width=8, norm=norm)
    seeds = [3, 4, 11]
    stacked = train_nets_batched(x, y, NetProtocol(cfg, model, C), seeds)
    for i, seed in enumerate(seeds):
        net = train_net(x, y, NetProtocol(cfg, model, C), seed)
        for name, p in net.named_parameters():
            assert torch.allclose(stacked.params[name][i], p, atol=1e-4), name
        for name, b in net.named_buffers():
            assert torch.allclose(stacked.buffers[name][i].float(), b.float(), atol=1e-4), name
    # the nets did not all train alike (seeds matter)
    assert not torch.allclose(stacked.params["classifier.weight"][0], stacked.params["classifier.weight"][1])


def test_evaluate_synthetic_batched_equals_sequential_accuracies():
    x, y = data(3, seed=1)
    test_x, test_y = data(20, seed=2)
    cfg = EvaluationConfig(epochs=3, batch_size=4, dsa=True)
    model = ModelConfig(width=8)
    seeds = [0, 1, 2, 5]
    batched = evaluate_synthetic(x, y, test_x, test_y, NetProtocol(cfg, model, C), seeds, max_parallel=3)  # groups 3 + 1
    sequential = [train_and_test(x, y, test_x, test_y, NetProtocol(cfg, model, C), s) for s in seeds]
    assert batched == pytest.approx(sequential, abs=1e-9)
