"""simulations/benchmarks/set_geometry.py: the measures of a synthetic set, on sets whose answers are known."""

from __future__ import annotations

import pytest
import torch

from common.models import build_model
from server.distill.dm import randomize_
from simulations.benchmarks.set_geometry import geometry, random_features, seed_folder, table


def _context(public_x, public_y, val_x, nets=3):
    torch.manual_seed(0)
    nets = [randomize_(build_model(3, 3, 8, 16, 2)).eval() for _ in range(nets)]
    return nets, random_features(nets, public_x), random_features(nets, val_x)


def test_the_public_pool_itself_matches_dm_exactly_and_a_prototype_set_classifies_its_own_images():
    torch.manual_seed(1)
    public_x, public_y = torch.randn(12, 3, 8, 8), torch.arange(3).repeat_interleave(4)
    model = build_model(3, 3, 8, 16, 2).eval()
    nets, pub, val = _context(public_x, public_y, public_x)
    whole = geometry(public_x, public_y, (public_x, public_y), (public_x, public_y), model, nets, pub, val, 3)
    assert whole["dm_gap"] == pytest.approx(0.0, abs=1e-9)
    assert whole["spread"] == pytest.approx(1.0)
    logits = model(public_x)
    assert whole["model_accuracy"] == pytest.approx(float((logits.argmax(1) == public_y).float().mean()))

    # One image per class, and the validation images are those images: each is its own nearest prototype.
    one = public_x[::4]
    labels = torch.arange(3)
    nets, pub, val = _context(public_x, public_y, one)
    single = geometry(one, labels, (public_x, public_y), (one, labels), model, nets, pub, val, 3)
    assert single["prototype_accuracy"] == 1.0 and single["spread"] == 0.0
    assert single["dm_gap"] > 0
    # The margin: the label's logit minus the largest other, averaged.
    logits = model(one).detach()
    others = logits.clone()
    others[torch.arange(3), labels] = float("-inf")
    assert single["model_margin"] == pytest.approx(float((logits[torch.arange(3), labels] - others.max(1).values).mean()),
                                                   rel=1e-5)


def test_the_table_has_a_row_per_ipc_pipc_method_with_seeds_pooled():
    rows = [{"ipc": 1, "pipc": 50, "method": m, "dm_gap": g, "model_accuracy": 1.0, "model_margin": 2.0,
             "prototype_accuracy": 0.2, "spread": 0.0} for m, g in (("dm", 1.0), ("dm", 3.0), ("dm+dkkt", 2.0))]
    text = table(rows)
    assert "| 1 | 50 | dm | 2 | 2.000 ± 1.414 |" in text
    assert "| 1 | 50 | dm+dkkt | 1 | 2.000 ± 0.000 |" in text
    assert "trained_accuracy" not in text  # a column only when every row has it


def test_a_folder_without_a_set_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match="no synthetic.pt"):
        seed_folder(tmp_path)
