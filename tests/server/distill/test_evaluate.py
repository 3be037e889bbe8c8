import math

import torch

from common.config import EvaluationConfig, ModelConfig
from server.distill.evaluate import NetProtocol, evaluate_synthetic, mean_std

C, SIZE = 3, 16
MODEL = ModelConfig(width=8)


def separable(n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each class is one fixed pattern plus a little noise: learnable from two images per class."""
    patterns = torch.randn(C, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    y = torch.arange(C).repeat_interleave(n_per_class)
    noise = 0.1 * torch.randn(len(y), 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
    return patterns[y] + noise, y


def test_training_on_the_synthetic_set_learns_it():
    syn_x, syn_y = separable(2, seed=1)
    test_x, test_y = separable(10, seed=2)
    cfg = EvaluationConfig(epochs=40, lr=0.05, dsa=False, num_nets=1)
    trained = evaluate_synthetic(syn_x, syn_y, test_x, test_y, NetProtocol(cfg, MODEL, C), seeds=[0, 1])
    assert all(a > 0.9 for a in trained)
    untrained = evaluate_synthetic(syn_x, syn_y, test_x, (test_y + 1) % C, NetProtocol(cfg, MODEL, C), seeds=[0])
    assert untrained[0] < 0.1  # the same nets are wrong on shuffled labels: accuracy is really measured


def test_evaluation_is_deterministic_per_seed_and_runs_with_dsa():
    syn_x, syn_y = separable(2, seed=1)
    test_x, test_y = separable(5, seed=2)
    cfg = EvaluationConfig(epochs=3, batch_size=4, dsa=True)
    reported = []
    a = evaluate_synthetic(syn_x, syn_y, test_x, test_y, NetProtocol(cfg, MODEL, C), seeds=[7, 7, 8],
                           on_done=reported.append)
    assert a[0] == a[1] and all(0.0 <= v <= 1.0 for v in a)
    assert reported == [a[:1], a[:2], a]  # one progress report per net, with the accuracies so far


def test_mean_std_is_population_std():
    mean, std = mean_std([0.2, 0.4])
    assert math.isclose(mean, 0.3) and math.isclose(std, 0.1)
    assert all(math.isnan(v) for v in mean_std([]))
