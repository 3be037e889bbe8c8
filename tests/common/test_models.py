"""ConvNet-3 shapes and size, and the one model<->ArrayRecord converter."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord

from common.config import ConfigError
from common.models import AvgPool2x2, build_model, count_parameters
from common.records import load_record_into, model_to_record, record_to_state_dict
from common.runtime import pick_device, seed_everything


def test_convnet3_shapes_and_parameter_count():
    model = build_model()
    x = torch.randn(4, 3, 32, 32)
    assert model(x).shape == (4, 10)
    assert model.embed(x).shape == (4, 2048)
    assert count_parameters(model) == 320_010  # 3 conv(128) + 3 GroupNorm(128,128) + Linear(2048, 10)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == 3 and all(n.num_groups == n.num_channels == 128 for n in norms)


@pytest.mark.parametrize(("width", "depth", "norm", "feat"), [(32, 2, "batchnorm", 32 * 8 * 8), (16, 4, "none", 16 * 2 * 2)])
def test_width_depth_norm_are_configurable(width, depth, norm, feat):
    model = build_model(width=width, depth=depth, norm=norm)
    assert model.embed(torch.randn(2, 3, 32, 32)).shape == (2, feat)


@pytest.mark.parametrize(("size", "side"), [(28, 3), (20, 2)])
def test_pooling_floors_odd_sizes_as_the_dm_reference(size, side):
    model = build_model(num_classes=3, channels=1, image_size=size, width=8, depth=3)  # 28 -> 14 -> 7 -> 3
    assert model.feature_dim == 8 * side * side
    assert model(torch.randn(2, 1, size, size)).shape == (2, 3)


@pytest.mark.parametrize("shape", [(3, 4, 32, 32), (2, 5, 7, 7), (1, 2, 3, 5)])
def test_the_cpu_pooling_is_avgpool2d_to_rounding_with_its_first_and_second_derivatives(shape):
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    ours, native = AvgPool2x2()(x), torch.nn.AvgPool2d(2, 2)(x)
    assert ours.shape == native.shape and torch.allclose(ours, native, rtol=0, atol=1e-12)
    weights = torch.randn_like(native)
    grad_ours, = torch.autograd.grad((ours * weights).sum(), x, create_graph=True)
    grad_native, = torch.autograd.grad((native * weights).sum(), x, create_graph=True)
    assert torch.allclose(grad_ours, grad_native, rtol=0, atol=1e-12)
    assert torch.autograd.gradgradcheck(AvgPool2x2(), (x,))  # DKKT differentiates the model's gradient
    cl = x.detach().contiguous(memory_format=torch.channels_last)  # not the strided path: the native kernel
    assert torch.allclose(AvgPool2x2()(cl), torch.nn.AvgPool2d(2, 2)(cl), rtol=0, atol=1e-12)


@pytest.mark.reliability
def test_an_image_too_small_for_the_depth_is_a_config_error(reliability):
    with pytest.raises(ConfigError, match=r"model.depth=3 .* 4 px images need model.depth <= 2") as err:
        build_model(image_size=4, depth=3)
    reliability("Config", "model.depth=3 for 4x4 images", f"one-line error: {err.value}")


def test_arrayrecord_round_trip_is_exact():
    seed_everything(0)
    model = build_model(width=16)
    record = model_to_record(model)
    assert isinstance(record, ArrayRecord)
    restored = load_record_into(build_model(width=16), record)
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), restored.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(v1, v2)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), restored(x))


def test_arrayrecord_mismatches_are_named():
    record = model_to_record(build_model(width=16))
    with pytest.raises(ValueError, match=r"features.0.weight: shape \(16, 3, 3, 3\) != expected \(8, 3, 3, 3\)"):
        record_to_state_dict(record, build_model(width=8))
    arrays = dict(build_model(width=16).state_dict())
    arrays["smuggled"] = torch.zeros(3, 32, 32)
    arrays["classifier.bias"] = arrays["classifier.bias"].double()
    with pytest.raises(ValueError, match=r"unexpected keys \['smuggled'\].*classifier.bias: dtype torch.float64"):
        record_to_state_dict(ArrayRecord(arrays), build_model(width=16))


def test_seeding_makes_models_identical_and_device_is_cpu_here():
    seed_everything(5)
    a = build_model(width=8)
    seed_everything(5)
    b = build_model(width=8)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device=cuda: this machine has no CUDA device"):
            pick_device("cuda")
