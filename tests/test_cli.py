"""The command line as a user meets it: exit codes, one-line errors, files left intact."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from helpers import mlp_model


# The installed console script, as a user runs it (`python -m onnxshrink` from the repository
# root would import the source tree, where `passes/` is not yet `onnxshrink.passes`).
ONNXSHRINK = str(Path(sys.executable).parent / "onnxshrink")


def cli(*args, cwd=None):
    proc = subprocess.run([ONNXSHRINK, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(mlp_model(), path)
    return path


def one_line_error(stderr: str, code: int, expected: int, fragment: str):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == expected, stderr
    assert len(lines) == 1 and lines[0].startswith("onnxshrink: error:"), stderr
    assert fragment in lines[0], lines[0]


def test_compress_writes_the_model_and_a_report(model_file, tmp_path):
    out, report = tmp_path / "small.onnx", tmp_path / "r.json"
    before = model_file.read_bytes()
    code, stdout, stderr = cli("compress", model_file, "-o", out, "-p", "cleanup,dedup,fp16",
                               "--max-drift", "cosine>=0.999", "--report", report)
    assert code == 0, stderr
    assert model_file.read_bytes() == before
    onnx.checker.check_model(onnx.load(out), full_check=True)
    data = json.loads(report.read_text())
    assert [p["pass"] for p in data["passes"]] == ["cleanup", "dedup", "fp16"]
    assert "fp16" in stdout and "size" in stdout


def test_compress_from_a_recipe_with_calibration_npz(model_file, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("pipeline:\n  - cleanup\n  - fp16: {compute: storage}\nmax_drift: cosine>=0.999\n")
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((5, 2, 8)).astype(np.float32))
    code, _, stderr = cli("compress", model_file, "-o", tmp_path / "o.onnx", "--recipe", recipe, "--calib", calib)
    assert code == 0, stderr


BAD_MODEL_CASES = {
    "missing": (lambda d: d / "nope.onnx", "no such file"),
    "truncated": (lambda d: _write(d / "t.onnx", mlp_model().SerializeToString()[:300]), "t.onnx"),
    "not onnx": (lambda d: _write(d / "x.onnx", b"hello, I am a text file\n" * 10), "x.onnx"),
    "empty": (lambda d: _write(d / "e.onnx", b""), "not an ONNX model"),
}


def _write(path, data):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", BAD_MODEL_CASES)
def test_bad_model_files_fail_with_one_line_and_nothing_written(tmp_path, case):
    make, fragment = BAD_MODEL_CASES[case]
    path = make(tmp_path)
    before = path.read_bytes() if path.exists() else None
    out = tmp_path / "out.onnx"
    code, _, stderr = cli("compress", path, "-o", out, "-p", "cleanup")
    one_line_error(stderr, code, 1, fragment)
    assert not out.exists()
    assert (path.read_bytes() if path.exists() else None) == before


@pytest.mark.parametrize("pipeline, fragment", [
    ("cleanp", "unknown pass 'cleanp'"),
    ("fp16(bits=3)", "unknown option 'bits'"),
    ("fp16(min_elements=lots)", "takes an integer"),
])
def test_usage_errors_exit_2_and_keep_an_old_output(model_file, tmp_path, pipeline, fragment):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"old output")
    code, _, stderr = cli("compress", model_file, "-o", out, "-p", pipeline)
    one_line_error(stderr, code, 2, fragment)
    assert out.read_bytes() == b"old output"


def test_unknown_flag_is_a_usage_error(model_file):
    code, _, stderr = cli("compress", model_file, "--frobnicate")
    assert code == 2 and len(stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("arrays, fragment", [
    ({"images": np.ones((3, 1, 8), np.float32)}, "'images' is not a model input"),
    ({"x": np.ones((3, 1, 9), np.float32)}, "input 'x' has shape 1x9"),
    ({"x": np.ones((3, 1, 8), np.float64)}, "is float64, the model takes float32"),
    ({"x": np.ones((3, 1, 1, 8), np.float32)}, "has rank 4; the input has rank 2"),
])
def test_bad_calibration_data_fails_before_any_pass(model_file, tmp_path, arrays, fragment):
    calib = tmp_path / "c.npz"
    np.savez(calib, **arrays)
    out = tmp_path / "out.onnx"
    code, _, stderr = cli("compress", model_file, "-o", out, "-p", "cleanup", "--calib", calib)
    one_line_error(stderr, code, 1, fragment)
    assert not out.exists()


def test_a_pass_that_cannot_handle_the_model_refuses_cleanly(tmp_path):
    import onnxshrink

    half = tmp_path / "half.onnx"
    onnxshrink.save(onnxshrink.compress(mlp_model(), "cleanup,fp16(keep_io_types=false)").model, half)
    before = half.read_bytes()
    code, _, stderr = cli("compress", half, "-o", tmp_path / "o.onnx", "-p", "fp16")
    one_line_error(stderr, code, 1, "float16 already")
    assert half.read_bytes() == before and not (tmp_path / "o.onnx").exists()


def test_output_equal_to_input_is_refused(model_file):
    before = model_file.read_bytes()
    code, _, stderr = cli("compress", model_file, "-o", model_file, "-p", "cleanup")
    one_line_error(stderr, code, 2, "never overwrites its input")
    assert model_file.read_bytes() == before


def test_strict_exits_1_when_a_pass_was_rolled_back(model_file, tmp_path):
    code, stdout, stderr = cli("compress", model_file, "-o", tmp_path / "o.onnx", "-p", "fp16",
                               "--max-drift", "max-abs<=1e-9", "--strict")
    assert code == 1 and "rolled back fp16: max-abs" in stdout + stderr


def test_inspect_reports_ops_params_and_sparsity(model_file):
    code, stdout, _ = cli("inspect", model_file, "--json")
    info = json.loads(stdout)
    assert code == 0 and info["ops"]["Gemm"] == 3 and info["params"] == 8 * 16 + 2 * 16 * 4 + 4
    assert info["inputs"][0]["name"] == "x" and info["opsets"]["ai.onnx"] == 17
    code, stdout, _ = cli("inspect", model_file)
    assert code == 0 and "Gemm" in stdout


def test_compare_reports_fidelity_size_and_latency(model_file, tmp_path):
    small = tmp_path / "s.onnx"
    assert cli("compress", model_file, "-o", small, "-p", "cleanup,fp16")[0] == 0
    code, stdout, stderr = cli("compare", model_file, small, "--json", "--runs", "5")
    result = json.loads(stdout)
    assert code == 0, stderr
    assert result["summary"]["cosine"] > 0.999 and result["size"]["ratio"] < 1
    assert result["latency"]["ratio"] > 0


def test_passes_lists_every_pass_with_options():
    code, stdout, _ = cli("passes", "--json")
    names = {p["name"]: p for p in json.loads(stdout)}
    assert code == 0 and {"cleanup", "dedup", "fp16"} <= set(names)
    assert any(o["name"] == "keep_io_types" for o in names["fp16"]["options"])


def test_demo_runs_on_the_embedded_model_offline():
    code, stdout, stderr = cli("demo")
    assert code == 0, stderr
    assert "digits MLP fp32" in stdout and "accuracy" in stdout and "ratio" in stdout
