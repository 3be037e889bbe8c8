"""The step's two terms as objects: DM's gradient is the gradient of L_DM, DKKT's is weighted and logged at the norm it
has, and a DkktTerm's saved state gives the same next step as the term it was saved from."""

from __future__ import annotations

import pytest
import torch

from common.config import DistillConfig, ModelConfig
from common.models import build_model
from server.distill.dkkt import freeze_model
from server.distill.dsa import parse_strategy
from server.distill.terms import DkktTerm, DmTerm

C, SIZE, IPC = 3, 16, 2


@pytest.fixture(scope="module")
def setting() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, DistillConfig]:
    torch.manual_seed(0)
    frozen = freeze_model(build_model(C, 3, SIZE, 8, 3), "cpu")
    syn = torch.randn(C * IPC, 3, SIZE, SIZE, requires_grad=True)
    cfg = DistillConfig(method="dm+dkkt", ipc=IPC, batch_real=4, lambda_fit_steps=5, dkkt_candidates=4)
    return frozen, syn, torch.arange(C).repeat_interleave(IPC), cfg


def dkkt_term(frozen: torch.nn.Module, syn: torch.Tensor, syn_y: torch.Tensor, cfg: DistillConfig) -> DkktTerm:
    term = DkktTerm(frozen, cfg, torch.full((syn.shape[0],), cfg.lambda_init), syn.numel(),
                    parse_strategy(cfg.dsa_strategy), torch.device("cpu"))
    term.refit(syn, syn_y)
    return term


def test_dm_term_gives_its_loss_and_the_gradient_of_it(setting):
    _, syn, syn_y, cfg = setting
    public_x, public_y = torch.randn(C * 4, 3, SIZE, SIZE), torch.arange(C).repeat(4)
    dm = DmTerm(public_x, public_y, C, cfg, ModelConfig(width=8), parse_strategy(cfg.dsa_strategy), torch.device("cpu"))
    terms, grad = dm.gradient(syn, syn_y, torch.Generator().manual_seed(0))
    assert terms["dm"] > 0 and grad.shape == syn.shape
    assert terms["grad_dm"] == pytest.approx(grad.norm().item()) and grad.norm() > 0


def test_dkkt_term_returns_its_weighted_gradient_and_moves_the_multipliers(setting):
    frozen, syn, syn_y, cfg = setting
    term = dkkt_term(frozen, syn, syn_y, cfg)
    before = term.lambdas.clone()
    terms, grad = term.gradient(syn, syn_y, torch.Generator().manual_seed(0), dm_norm=torch.tensor(2.0))
    assert terms["dkkt_weight"] > 0 and grad.norm() > 0
    assert grad.norm().item() == pytest.approx(terms["grad_dkkt"].item(), rel=1e-5)
    term.step()
    assert not torch.equal(term.lambdas, before) and (term.lambdas >= 0).all()


def test_a_dkkt_term_loaded_from_its_state_takes_the_same_next_step(setting):
    frozen, syn, syn_y, cfg = setting
    first = dkkt_term(frozen, syn, syn_y, cfg)
    for seed in range(3):  # Adam moments and the weight's running norms away from their start
        first.gradient(syn, syn_y, torch.Generator().manual_seed(seed), dm_norm=torch.tensor(1.0 + seed))
        first.step()
    state = first.state()
    second = DkktTerm(frozen, cfg, torch.zeros(syn.shape[0]), syn.numel(), parse_strategy(cfg.dsa_strategy),
                      torch.device("cpu"))
    second.load(state["lambdas"], state["opt_lambda"], state["balance"])
    steps = []
    for term in (first, second):
        terms, grad = term.gradient(syn, syn_y, torch.Generator().manual_seed(9), dm_norm=torch.tensor(1.5))
        term.step()
        steps.append((terms["dkkt_weight"], grad, term.lambdas.clone()))
    assert all(torch.equal(a, b) for a, b in zip(*steps, strict=True))
