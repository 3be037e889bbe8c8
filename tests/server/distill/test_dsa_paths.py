import pytest
import torch

from server.distill.dsa import FAMILIES, apply_dsa, sample_dsa


@pytest.mark.parametrize("strategy", ["color_crop_cutout_flip_scale_rotate", "scale_rotate", "rotate", "flip_crop"])
@pytest.mark.parametrize("one_family", [False, True])
def test_subset_path_equals_where_path_for_the_same_draw(strategy, one_family):
    """The fast path (each family only on its own samples) and the general path (all families, then select)."""
    x = torch.randn(20, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    groups = torch.arange(4).repeat_interleave(5)
    for seed in range(6):
        params = sample_dsa(strategy, 4, torch.Generator().manual_seed(seed), one_family=one_family)
        where = apply_dsa(x, params, groups, path="where")
        subset = apply_dsa(x, params, groups, path="subset")
        assert torch.allclose(where, subset, atol=1e-12)
        (g_where,) = torch.autograd.grad(where.square().sum(), x)
        (g_subset,) = torch.autograd.grad(subset.square().sum(), x)
        assert torch.allclose(g_where, g_subset, atol=1e-12)


def test_auto_path_on_cpu_is_the_subset_path_and_default_groups_work():
    x = torch.randn(7, 3, 8, 8)
    params = sample_dsa(FAMILIES, 7, torch.Generator().manual_seed(0))
    assert torch.equal(apply_dsa(x, params), apply_dsa(x, params, path="subset"))
    assert torch.allclose(apply_dsa(x, params), apply_dsa(x, params, path="where"), atol=1e-6)
    with pytest.raises(ValueError, match="path"):
        apply_dsa(x, params, path="fast")
