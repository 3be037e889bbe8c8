import pytest

from simulations.benchmarks import distill_modes


def run(cell: str, mode: str, accuracies: list[float], recorded: list[float]) -> dict:
    return {"cell": cell, "mode": mode, "method": "dm", "ipc": 10, "seeds": [0], "accuracies": accuracies,
            "recorded": recorded, "distill_s": 30.0, "recorded_distill_s": 60.0}


def test_table_compares_each_mode_with_the_recorded_fp32_cells():
    report = {"runs": [run("a", "bf16", [0.42, 0.44], [0.40, 0.40]), run("b", "bf16", [0.40, 0.40], [0.42, 0.42])]}
    row = distill_modes.markdown(report).splitlines()[2]
    # mean 41.50 vs fp32 41.00; cell diffs +3.00 and -2.00; fp32 cell means 40 and 42 -> std 1.41
    assert row == "| 10 | dm | bf16 | 2 | 41.50 | 41.00 | +0.50 | +3.00 -2.00 | 1.41 | 30 / 60 |"


def test_an_unknown_mode_exits_2_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        distill_modes.main([str(tmp_path), "--modes", "fp16", "--out", str(tmp_path / "r.json")])
    assert exit_info.value.code == 2
    assert "distillation mode 'fp16': one of fp32, compile, bf16, compile+bf16" in capsys.readouterr().err
