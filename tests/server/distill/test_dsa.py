import pytest
import torch

from server.distill.dsa import FAMILIES, DSAParams, apply_dsa, parse_strategy, sample_dsa


def forced(family: str, num_groups: int, seed: int = 0, **values: float) -> DSAParams:
    """A draw whose family is `family` for every group, other parameters random unless given."""
    p = sample_dsa(FAMILIES, num_groups, torch.Generator().manual_seed(seed))
    overrides = {k: torch.full((num_groups,), v) for k, v in values.items()}
    fields = {k: getattr(p, k) for k in p.__dataclass_fields__ if k not in ("families", "family")}
    fields.update(overrides)
    return DSAParams(FAMILIES, torch.full((num_groups,), FAMILIES.index(family)), **fields)


def test_parse_strategy():
    assert parse_strategy("color_crop_cutout_flip_scale_rotate") == FAMILIES
    assert parse_strategy("none") == ()
    with pytest.raises(ValueError, match="unknown transform"):
        parse_strategy("color_blur")


def test_same_draw_same_transform_whatever_the_batch():
    """Siamese: a real batch and a synthetic batch sharing a group get the identical transform."""
    torch.manual_seed(0)
    real = torch.randn(6, 3, 16, 16)
    syn = torch.cat([real[4:5], real[1:2]])  # copies of real images 4 (group 2) and 1 (group 0)
    real_groups = torch.tensor([0, 0, 1, 1, 2, 2])
    syn_groups = torch.tensor([2, 0])
    for seed in range(12):  # covers every family several times
        params = sample_dsa(FAMILIES, 3, torch.Generator().manual_seed(seed))
        out_real = apply_dsa(real, params, real_groups)
        out_syn = apply_dsa(syn, params, syn_groups)
        assert torch.equal(out_syn[0], out_real[4]) and torch.equal(out_syn[1], out_real[1])
        alone = apply_dsa(real[2:4], params.select(1), torch.zeros(2, dtype=torch.long))
        assert torch.allclose(alone, out_real[2:4], atol=1e-6)


@pytest.mark.parametrize("family", ["crop", "cutout", "flip", "scale", "rotate"])
def test_geometric_transform_is_the_same_map_for_different_inputs(family):
    """For the geometric families the map is linear and shared: T(a) + T(b) == T(a + b) within a group."""
    a, b = torch.randn(2, 1, 3, 16, 16, dtype=torch.float64)
    params = forced(family, 1, seed=3, flip=0.1)
    groups = torch.zeros(1, dtype=torch.long)
    t = lambda x: apply_dsa(x, params, groups)  # noqa: E731
    assert torch.allclose(t(a) + t(b), t(a + b), atol=1e-10)
    assert not torch.allclose(t(a), a)  # it did transform


def test_family_semantics():
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(apply_dsa(x, forced("flip", 2, flip=0.1)), x.flip(3))
    assert torch.equal(apply_dsa(x, forced("flip", 2, flip=0.9)), x)
    # crop with u = 1 - eps -> shift +2 rows / cols on 16 px (ratio 0.125), zero-filled
    shifted = apply_dsa(x, forced("crop", 2, crop_h=0.999, crop_w=0.5))
    assert torch.equal(shifted[:, :, :-2], x[:, :, 2:])
    assert torch.equal(shifted[:, :, -2:], torch.zeros_like(x[:, :, -2:]))
    cut = apply_dsa(x, forced("cutout", 2, cutout_h=0.5, cutout_w=0.5))  # 8x8 square at the centre
    assert (cut == 0).all(dim=1).sum(dim=(1, 2)).tolist() == [64, 64]
    same = apply_dsa(x, forced("color", 2, brightness=0.5, saturation=0.5, contrast=0.5))  # identity colour
    assert torch.allclose(same, x, atol=1e-5)
    assert torch.allclose(apply_dsa(x, forced("scale", 2, scale_h=1 / 2.2, scale_w=1 / 2.2)), x, atol=1e-3)


def test_per_group_family_and_one_family():
    p = sample_dsa(FAMILIES, 200, torch.Generator().manual_seed(0))
    assert len(p.family.unique()) == len(FAMILIES)  # each group draws its own family
    q = sample_dsa(FAMILIES, 200, torch.Generator().manual_seed(0), one_family=True)
    assert len(q.family.unique()) == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_flow_to_the_input(family):
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    params = forced(family, 3, seed=1, flip=0.1)
    assert torch.autograd.gradcheck(lambda t: apply_dsa(t, params), (x,), fast_mode=True)
