"""The evaluation modes against the eager fp32 protocol. `evaluation.compile`: the same trained weights to float
rounding and the same test accuracies on fixed seeds, through the CPU chunks and DSA; a clear error where inductor
has no C++ compiler. `evaluation.precision=bf16`: another protocol that acts (other weights) and still trains."""

import shutil

import pytest
import torch

from common import models
from common.config import ConfigError, EvaluationConfig, ModelConfig
from server.distill.evaluate import NetProtocol, evaluate_synthetic, init_net, train_net
from simulations.commands.synthetic_pack import EvaluationMode

CLASSES, WIDTH = 3, 16
needs_compiler = pytest.mark.skipif(not shutil.which("g++") and not shutil.which("clang++"),
                                    reason="torch.compile on the CPU needs a C++ compiler")


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


SYN_X, SYN_Y = images(30, 6), torch.arange(CLASSES).repeat_interleave(10)
TEST_X, TEST_Y = images(60, 7), torch.arange(CLASSES).repeat(20)
MODEL = ModelConfig(width=WIDTH)


def protocol(compile: bool, precision: str = "fp32") -> EvaluationConfig:
    return EvaluationConfig(epochs=6, batch_size=16, lr=0.01, dsa=True, compile=compile, precision=precision)


def weights(cfg: EvaluationConfig) -> torch.Tensor:
    net = train_net(SYN_X, SYN_Y, NetProtocol(cfg, MODEL, CLASSES), 11)
    return torch.cat([p.detach().flatten() for p in net.parameters()])


def initial_weights() -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in init_net(11, SYN_X.shape, MODEL, CLASSES).parameters()])


@needs_compiler
def test_compiled_training_gives_the_eager_weights(monkeypatch):
    monkeypatch.setattr(models, "CPU_CHUNK", 7)  # uneven chunks: several compiled shapes

    eager, fast = weights(protocol(False)), weights(protocol(True))
    assert not torch.equal(eager, initial_weights())  # it trained
    torch.testing.assert_close(fast, eager, rtol=1e-4, atol=1e-6)


@needs_compiler
def test_compiled_evaluation_gives_the_eager_accuracies_on_fixed_seeds():
    seeds = [0, 1, 2]
    eager = evaluate_synthetic(SYN_X, SYN_Y, TEST_X, TEST_Y, NetProtocol(protocol(False), MODEL, CLASSES), seeds)
    fast = evaluate_synthetic(SYN_X, SYN_Y, TEST_X, TEST_Y, NetProtocol(protocol(True), MODEL, CLASSES), seeds)
    assert len(set(eager)) > 1  # the seeds give different nets: the comparison is not between constants
    assert fast == eager


def test_compile_without_a_cpp_compiler_is_a_config_error(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match=r"evaluation.compile=true: .*C\+\+ compiler"):
        train_net(SYN_X, SYN_Y, NetProtocol(protocol(True), MODEL, CLASSES), 0)


def test_bf16_acts_and_still_trains():
    fp32, bf16 = weights(protocol(False)), weights(protocol(False, "bf16"))
    step_fp32, step_bf16 = fp32 - initial_weights(), bf16 - initial_weights()
    assert not torch.equal(bf16, fp32)  # autocast changed the arithmetic
    cosine = torch.nn.functional.cosine_similarity(step_fp32, step_bf16, dim=0)
    assert cosine > 0.99, f"bf16 training moved the weights elsewhere (cosine {cosine:.4f} with the fp32 update)"


def test_bf16_evaluation_accuracies_stay_near_fp32():
    seeds = [0, 1, 2]
    fp32 = evaluate_synthetic(SYN_X, SYN_Y, TEST_X, TEST_Y, NetProtocol(protocol(False), MODEL, CLASSES), seeds)
    bf16 = evaluate_synthetic(SYN_X, SYN_Y, TEST_X, TEST_Y, NetProtocol(protocol(False, "bf16"), MODEL, CLASSES), seeds)
    assert all(abs(a - b) <= 3 / len(TEST_Y) for a, b in zip(bf16, fp32, strict=True)), (bf16, fp32)


def test_evaluation_modes_parse_and_name():
    assert EvaluationMode.parse("compile+bf16") == EvaluationMode(True, "bf16")
    assert [EvaluationMode.parse(m).name for m in ("fp32", "compile", "bf16", "bf16+compile")] == [
        "fp32", "compile", "bf16", "compile+bf16"]
    assert EvaluationMode.parse("bf16").updates == {"compile": False, "precision": "bf16"}
    for bad in ("fp16", "fp32+bf16", ""):
        with pytest.raises(ConfigError, match="evaluation mode"):
            EvaluationMode.parse(bad)


def test_precision_is_checked_by_the_config():
    with pytest.raises(ValueError, match="precision"):
        EvaluationConfig(precision="fp16")
