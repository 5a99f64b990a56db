"""The pass manager: checks after each pass, rollback past the drift bound, the report."""

import json

import numpy as np
import onnx
import pytest

import onnxshrink
from helpers import mlp_model, run
from onnxshrink import OnnxShrinkError, Pass, register_pass
from onnxshrink.pass_base import PassOutput

X = [{"x": np.random.default_rng(i).standard_normal((2, 8)).astype(np.float32)} for i in range(4)]


@register_pass("test-scale-weights")
class ScaleWeights(Pass):
    """Multiplies every weight by 1.5: changes the outputs on purpose."""

    summary = "test pass"

    def run(self, model, context):
        for tensor in model.graph.initializer:
            array = onnx.numpy_helper.to_array(tensor) * 1.5
            tensor.CopyFrom(onnx.numpy_helper.from_array(array.astype(np.float32), tensor.name))
        return PassOutput(model)


@register_pass("test-break-graph")
class BreakGraph(Pass):
    """Points a node at a tensor that does not exist: an invalid model."""

    summary = "test pass"

    def run(self, model, context):
        model.graph.node[0].input[0] = "no_such_tensor"
        return PassOutput(model)


def test_a_pass_past_the_drift_bound_is_rolled_back_and_reported():
    result = onnxshrink.compress(mlp_model(), "cleanup,test-scale-weights,fp16", calibration=X,
                                 max_drift="max-rel<=1e-3")
    statuses = [p.status for p in result.report.passes]
    assert statuses == ["applied", "rolled back", "applied"]
    rolled = result.report.passes[1]
    assert "max-rel" in rolled.message and "max-rel<=0.001" in rolled.message and "test-scale-weights" in rolled.message
    assert rolled.fidelity["max_rel"] > 1e-3
    assert np.allclose(run(result.model, X[0])[0], run(mlp_model(), X[0])[0], rtol=1e-2, atol=1e-2)  # fp16 only
    assert "rolled back" in result.report.table()


def test_without_a_bound_the_change_is_kept_but_measured():
    result = onnxshrink.compress(mlp_model(), "test-scale-weights", calibration=X)
    record = result.report.passes[0]
    assert record.status == "applied" and record.fidelity["max_rel"] > 0.1


def test_an_invalid_model_from_a_pass_is_never_kept():
    result = onnxshrink.compress(mlp_model(), "test-break-graph", calibration=X)
    record = result.report.passes[0]
    assert record.status == "invalid" and "ONNX checker" in record.message
    onnx.checker.check_model(result.model, full_check=True)


def test_report_has_figures_per_pass_and_serializes():
    result = onnxshrink.compress(mlp_model(), "cleanup,dedup,fp16", calibration=X, max_drift="cosine>=0.999")
    data = json.loads(json.dumps(result.report.as_dict()))
    assert [p["pass"] for p in data["passes"]] == ["cleanup", "dedup", "fp16"]
    for p in data["passes"]:
        for key in ("params", "bytes", "nodes"):
            assert p["before"][key] >= 0 and p["after"][key] >= 0
        assert p["wall_s"] >= 0 and p["peak_rss_mb"] > 0 and "cosine" in p["fidelity"]
    assert data["output"]["bytes"] < data["input"]["bytes"]


def test_compress_accepts_a_path_and_leaves_the_file_alone(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(mlp_model(), path)
    before = path.read_bytes()
    result = onnxshrink.compress(str(path), "cleanup,fp16")
    assert path.read_bytes() == before
    out = tmp_path / "out.onnx"
    onnxshrink.save(result.model, out)
    onnx.checker.check_model(onnxshrink.load(out), full_check=True)


@pytest.mark.parametrize("source, message", [
    ([{"x": np.ones((2, 8), np.float64)}], "input 'x' is float64, the model takes float32"),
    ([{"x": np.ones((2, 9), np.float32)}], "input 'x' has shape 2x9, the model takes \\?x8"),
    ([{"images": np.ones((2, 8), np.float32)}], "'images' is not a model input"),
    ([], "holds no samples"),
])
def test_bad_calibration_data_is_a_clear_error(source, message):
    with pytest.raises(OnnxShrinkError, match=message):
        onnxshrink.compress(mlp_model(), "cleanup", calibration=source)


def test_exclude_names_that_match_nothing_are_reported():
    """A typo, or a list in parentheses (read as one name), would otherwise exclude nothing silently."""
    model = mlp_model()
    result = onnxshrink.compress(model, "prune(sparsity=0.5,exclude=(MatMul,fc2))", calibration=X)
    messages = [n.message for n in result.report.passes[0].notes]
    assert any("exclude: '(MatMul,fc2)' matches no node name or op type" in m and "[a,b]" in m for m in messages)
    result = onnxshrink.compress(model, "prune(sparsity=0.5,exclude=[Gemm,gemm2])", calibration=X)
    assert not any("matches no node" in n.message for n in result.report.passes[0].notes)
