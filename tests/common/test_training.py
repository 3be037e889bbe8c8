"""Flower-free local training: augmentation, settings validation, and that training learns."""

from __future__ import annotations

import pytest
import torch

from common.data import make_tiny_dataset, to_normalized_tensor
from common.models import build_model
from common.runtime import seed_everything
from common.training import TrainSettings, augment_flip_crop, evaluate, settings_from_config, train_local


def tiny_tensors(per_class: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    data = make_tiny_dataset(per_class, seed=0)
    return to_normalized_tensor(data.train.images, data.normalization), torch.as_tensor(data.train.labels)


def test_local_training_reduces_the_loss_on_tiny_data():
    seed_everything(0)
    x, y = tiny_tensors()
    model = build_model(width=16)
    loss_before, _ = evaluate(model, x, y)
    settings = TrainSettings(epochs=8, batch_size=32, optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=0.0)
    result = train_local(model, x, y, settings, seed=0)
    loss_after, accuracy_after = evaluate(model, x, y)
    assert result.num_examples == len(y)
    assert result.loss < result.first_epoch_loss
    assert loss_after < 0.7 * loss_before
    assert accuracy_after > 0.5  # 10 classes: chance is 0.1
    assert result.seconds > 0


def test_adam_also_trains():
    seed_everything(1)
    x, y = tiny_tensors()
    model = build_model(width=16)
    loss_before, _ = evaluate(model, x, y)
    train_local(model, x, y, TrainSettings(epochs=4, batch_size=32, optimizer="adam", lr=1e-3, weight_decay=0.0))
    assert evaluate(model, x, y)[0] < loss_before


def test_training_is_reproducible_for_a_seed():
    x, y = tiny_tensors(5)
    states = []
    for _ in range(2):
        torch.manual_seed(3)
        model = build_model(width=8)
        train_local(model, x, y, TrainSettings(epochs=1, batch_size=16), seed=7)
        states.append(model.state_dict())
    for name in states[0]:
        assert torch.equal(states[0][name], states[1][name])


def test_flip_crop_keeps_shape_and_moves_pixels():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    out = augment_flip_crop(x, g, padding=2)
    assert out.shape == x.shape
    assert not torch.equal(out, x)
    # No padding and every flip off would be the identity: a crop window is a shifted copy of the image.
    same = augment_flip_crop(x, torch.Generator().manual_seed(0), padding=0)
    for i in range(2):
        assert torch.equal(same[i], x[i]) or torch.equal(same[i], x[i].flip(2))


@pytest.mark.parametrize(
    "key, value",
    [
        ("optimizer", "rmsprop"),
        ("batch-size", 0),
        ("local-epochs", 0),
        ("lr", -0.1),
        ("momentum", 1.5),
        ("weight-decay", float("nan")),
        ("batch-size", 2.5),
    ],
)
def test_settings_reject_a_value_they_cannot_honour_naming_the_key(key, value):
    config = {"local-epochs": 1, "batch-size": 8, "optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "weight-decay": 0.0}
    config[key] = value
    with pytest.raises(ValueError, match=key):
        settings_from_config(config)


def test_settings_name_a_missing_key():
    with pytest.raises(ValueError, match="local-epochs"):
        settings_from_config({"batch-size": 8, "optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "weight-decay": 0.0})


def test_evaluate_on_nothing_is_nan():
    loss, acc = evaluate(build_model(width=4), torch.empty(0, 3, 32, 32), torch.empty(0, dtype=torch.long))
    assert loss != loss and acc != acc
