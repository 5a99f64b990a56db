"""sensitivity: per-layer drift vs sparsity, the sparsity allocation for prune(scope=auto), the CLI."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxshrink
from onnxshrink.errors import OnnxShrinkError, UsageError
from onnxshrink.fidelity import output_metrics, summarize
from onnxshrink.passes.sensitivity import (LayerDrift, SensitivityTable, allocate_sparsity, apply_sparsities,
                                           auto_sparsities, layer_sensitivity, sweep_around)
from helpers import run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ONNXSHRINK = str(Path(sys.executable).parent / "onnxshrink")  # the installed console script, as in test_cli.py


def cli(*args):
    proc = subprocess.run([ONNXSHRINK, *map(str, args)], capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def digits(digits_mlp_path):
    """The model, calibration rows and a held-out split, as tests/test_prune.py splits them."""
    import zoo

    x, labels = zoo.digits_test()
    return onnx.load(digits_mlp_path), [{"input": x[:300]}], {"input": x[300:]}, labels[300:]


@pytest.fixture(scope="module")
def digits_table(digits):
    model, calibration, _, _ = digits
    return layer_sensitivity(model, calibration, threads=1)


def accuracy(model, test, truth) -> float:
    return float(np.mean(run(model, test)[0].argmax(1) == truth))


def overall_sparsity(model) -> float:
    matrices = [numpy_helper.to_array(t) for t in model.graph.initializer if len(t.dims) == 2]
    return float(np.mean(np.concatenate([m.ravel() for m in matrices]) == 0))


# ---------------------------------------------------------------- measuring
def test_drift_grows_with_sparsity_for_every_layer(digits_table):
    table = digits_table
    assert [(r.node, r.weight, r.params) for r in table.layers] == [
        ("fc1", "fc1.weight", 256 * 64), ("fc2", "fc2.weight", 128 * 256), ("fc3", "fc3.weight", 10 * 128)]
    assert table.sparsities == (0.3, 0.5, 0.7, 0.8, 0.9) and table.samples == 1
    for row in table.layers:
        assert row.drift[0] > 0 and all(a < b for a, b in zip(row.drift, row.drift[1:])), row
    # the small classifier head is the most sensitive layer at every sparsity (measured 9x fc2 at 50%)
    assert all(table.layers[2].drift[i] > max(table.layers[0].drift[i], table.layers[1].drift[i]) for i in range(5))


def test_running_only_downstream_measures_what_a_rebuilt_model_gives(digits, digits_table):
    """The shortcut (a layer's downstream part alone, its weight fed in) must agree with pruning
    the model and running it afresh, and an unpruned layer must not drift."""
    model, calibration, _, _ = digits
    assert all(d < 1e-9 for r in layer_sensitivity(model, calibration, (0.0,), threads=1).layers for d in r.drift)
    reference = [run(model, calibration[0])]
    for row in digits_table.layers:
        pruned = apply_sparsities(model, {row.weight: 0.7})
        cosine = summarize(output_metrics(["logits"], reference, [run(pruned, calibration[0])]))["cosine"]
        assert abs((1 - cosine) - row.drift[2]) <= 1e-6 + 1e-4 * row.drift[2], (row.node, 1 - cosine, row.drift[2])


def test_obs_drifts_less_than_magnitude(digits, digits_table):
    model, calibration, _, _ = digits
    obs = layer_sensitivity(model, calibration, (0.5, 0.9), method="obs", threads=1)
    for o, m in zip(obs.layers, digits_table.layers):
        assert o.drift[0] < m.drift[1] and o.drift[1] < m.drift[4], (o, m)


def test_n_m_measures_its_one_sparsity(digits):
    model, calibration, _, _ = digits
    table = layer_sensitivity(model, calibration, pattern="2:4", threads=1)
    assert table.sparsities == (0.5,) and len(table.layers) == 3


def test_exclude_and_min_elements_pick_the_layers_as_prune_does(digits):
    model, calibration, _, _ = digits
    table = layer_sensitivity(model, calibration, (0.5,), exclude=("fc2",), min_elements=2000, threads=1)
    assert [r.node for r in table.layers] == ["fc1"] and any("fc2" in n and "excluded" in n for n in table.notes)


@pytest.mark.parametrize("sparsities", [(), (0.5, 1.0), (-0.1,), ("lots",)])
def test_bad_sparsities_are_usage_errors(digits, sparsities):
    model, calibration, _, _ = digits
    with pytest.raises(UsageError):
        layer_sensitivity(model, calibration, sparsities)


# ---------------------------------------------------------------- allocating
def two_layer_table(drift_a, drift_b, params=(1000, 1000)):
    rows = [LayerDrift("a", "a", "MatMul", params[0], drift_a), LayerDrift("b", "b", "MatMul", params[1], drift_b)]
    return SensitivityTable((0.5, 0.9), rows)


def test_allocation_spends_sparsity_where_it_costs_least():
    # b is 10x as sensitive: a goes to the sweep's top (0.9) first, b takes the rest of 0.7 overall
    chosen = allocate_sparsity(two_layer_table((0.01, 0.05), (0.1, 0.5)), 0.7)
    assert chosen["a"] == pytest.approx(0.9) and chosen["b"] == pytest.approx(0.5)
    # weighted by parameters: a large, cheap layer absorbs nearly all of it
    chosen = allocate_sparsity(two_layer_table((0.01, 0.05), (0.1, 0.5), params=(9000, 1000)), 0.85)
    assert chosen["a"] == pytest.approx(0.9) and chosen["b"] == pytest.approx(0.4)
    assert allocate_sparsity(two_layer_table((0.01, 0.05), (0.1, 0.5)), 0.0) == {"a": 0.0, "b": 0.0}


def test_allocation_refuses_a_target_the_sweep_cannot_reach():
    with pytest.raises(OnnxShrinkError, match="above the largest swept"):
        allocate_sparsity(two_layer_table((0.01, 0.05), (0.1, 0.5)), 0.95)
    with pytest.raises(UsageError):
        allocate_sparsity(two_layer_table((0.01, 0.05), (0.1, 0.5)), 1.0)


@pytest.mark.parametrize("target", [0.5, 0.8, 0.9])
def test_allocation_on_the_digits_mlp_meets_the_target(digits, target):
    model, calibration, _, _ = digits
    table = layer_sensitivity(model, calibration, sweep_around(target), threads=1)
    chosen = allocate_sparsity(table, target)
    params = {r.weight: r.params for r in table.layers}
    overall = sum(chosen[w] * n for w, n in params.items()) / sum(params.values())
    assert abs(overall - target) <= 0.005, overall
    assert all(0 <= s <= table.sparsities[-1] for s in chosen.values())
    # most / least sensitive at the target itself
    at_target = {r.weight: r.drift[table.sparsities.index(round(target, 6))] for r in table.layers}
    most, least = max(at_target, key=at_target.get), min(at_target, key=at_target.get)
    assert chosen[most] < chosen[least], (chosen, at_target)
    pruned = apply_sparsities(model, chosen)
    assert abs(overall_sparsity(pruned) - target) <= 0.005


def test_prune_scope_auto_keeps_more_accuracy_than_uniform_at_90_percent(digits):
    model, calibration, test, truth = digits
    auto = onnxshrink.compress(model, "prune(sparsity=0.9,scope=auto)", calibration=calibration, samples=1).model
    uniform = onnxshrink.compress(model, "prune(sparsity=0.9)", calibration=calibration, samples=1).model
    assert overall_sparsity(auto) >= 0.895 and overall_sparsity(uniform) >= 0.895
    # measured (240 held-out digits, baseline 0.992): auto 0.825 (fc1 0.87, fc2 0.93, fc3 0.60),
    # uniform per layer 0.588, scope=global 0.788
    assert accuracy(auto, test, truth) >= accuracy(uniform, test, truth) + 0.1


def test_prune_scope_auto_refuses_fixed_patterns():
    with pytest.raises(UsageError, match="scope=auto needs pattern=unstructured"):
        onnxshrink.parse_pipeline("prune(pattern=2:4,scope=auto)")


def test_auto_refuses_patterns_that_fix_the_sparsity(digits):
    model, calibration, _, _ = digits
    with pytest.raises(UsageError, match="pattern=unstructured"):
        auto_sparsities(model, calibration, 0.5, pattern="2:4")


# ---------------------------------------------------------------- output
def need_matplotlib():
    if importlib.util.find_spec("matplotlib") is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("matplotlib is missing: pip install '.[test]'", pytrace=False)
        pytest.skip("matplotlib is missing")


def test_markdown_and_json(digits_table):
    lines = digits_table.markdown().splitlines()
    assert lines[0] == "| layer | op | params | 30% | 50% | 70% | 80% | 90% |"
    assert lines[2].startswith("| fc1 | Gemm | 16,384 | ") and len(lines) == 5
    data = json.loads(digits_table.to_json())
    assert data["sparsities"] == [0.3, 0.5, 0.7, 0.8, 0.9] and data["layers"][2]["weight"] == "fc3.weight"
    assert data["layers"][0]["drift"] == list(digits_table.layers[0].drift)


def test_png_without_matplotlib_is_a_one_line_error(digits_table, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(OnnxShrinkError, match=r"pip install 'onnxshrink\[plot\]'"):
        digits_table.to_png(tmp_path / "s.png")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def digits_files(digits_mlp_path, tmp_path):
    import zoo

    calib = tmp_path / "calib.npz"
    np.savez(calib, input=zoo.digits_test()[0][:300])  # one batch: split into samples of one digit
    return digits_mlp_path, calib


def test_cli_prints_the_table_and_writes_json(digits_files, tmp_path):
    model, calib = digits_files
    report = tmp_path / "s.json"
    code, stdout, stderr = cli("sensitivity", model, "--calib", calib, "--sparsities", "0.5,0.9", "--samples", "4",
                               "--json", report)
    assert code == 0, stderr
    assert "| layer | op | params | 50% | 90% |" in stdout and "| fc3 | Gemm | 1,280 |" in stdout
    data = json.loads(report.read_text())
    assert data["samples"] == 4 and [r["node"] for r in data["layers"]] == ["fc1", "fc2", "fc3"]
    assert all(r["drift"][0] < r["drift"][1] for r in data["layers"])


def test_cli_writes_a_png_atomically(digits_files, tmp_path):
    need_matplotlib()
    model, calib = digits_files
    png = tmp_path / "s.png"
    code, stdout, stderr = cli("sensitivity", model, "--calib", calib, "--samples", "2", "--png", png)
    assert code == 0, stderr
    assert "| fc1 | Gemm |" in stdout and f"wrote {png}" in stdout
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npz", "s.png"]  # no temporary file left


@pytest.mark.parametrize("args, code, fragment", [
    (["--sparsities", "0.5,abc"], 2, "not a comma-separated list"),
    (["--sparsities", "0.5,1.0"], 2, "must lie in [0, 1)"),
    (["--sparsities", "-0.2"], 2, "must lie in [0, 1)"),
    (["--sparsities", ""], 2, "not a comma-separated list"),
    (["--samples", "0"], 2, "at least 1"),
    (["--pattern", "2:4", "--sparsities", "0.5"], 2, "fixes the sparsity"),
    (["--method", "random"], 2, "invalid choice"),
    (["--no-calib"], 2, "--calib"),
    (["--model", "missing.onnx"], 1, "no such file"),
    (["--calib", "missing.npz"], 1, "no such calibration file"),
])
def test_bad_arguments_fail_in_one_line_and_write_nothing(digits_files, tmp_path, args, code, fragment):
    model, calib = digits_files
    png, report = tmp_path / "s.png", tmp_path / "s.json"
    outputs = ["--json", report] + (["--png", png] if importlib.util.find_spec("matplotlib") else [])
    argv = ["sensitivity", model, "--calib", calib, *outputs]
    if args[0] == "--no-calib":
        argv = ["sensitivity", model, *outputs]
    elif args[0] in ("--model", "--calib"):
        argv[argv.index(model if args[0] == "--model" else calib)] = tmp_path / args[1]
    else:
        argv += args
    got, _, stderr = cli(*argv)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert got == code and len(lines) == 1 and lines[0].startswith("onnxshrink: error:"), stderr
    assert fragment in lines[0], lines[0]
    assert not png.exists() and not report.exists()
