"""Each pass on small graphs built here: what it changes, what it must leave alone."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxshrink
from helpers import if_model, mlp_model, run
from onnxshrink import OnnxShrinkError

X = {"x": np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)}


def apply(pipeline, model, feed=X):
    result = onnxshrink.compress(model, pipeline, calibration=[feed])
    (record,) = result.report.passes
    assert record.status in ("applied", "unchanged"), record.message
    onnx.checker.check_model(result.model, full_check=True)
    return result.model, record


def test_cleanup_removes_dead_nodes_identities_and_unused_weights():
    model = mlp_model()
    cleaned, record = apply("cleanup", model)
    ops = [n.op_type for n in cleaned.graph.node]
    assert ops == ["Gemm", "Relu", "Gemm"]
    assert {t.name for t in cleaned.graph.initializer} == {"w1", "w2"}
    assert np.array_equal(run(model, X)[0], run(cleaned, X)[0])
    assert record.after.params < record.before.params


def test_cleanup_folds_constant_chains_but_not_decompression():
    half = numpy_helper.from_array(np.linspace(-1, 1, 256, dtype=np.float16).reshape(16, 16), "w_half")
    shape = numpy_helper.from_array(np.array([16, 16], np.int64), "shape")
    nodes = [helper.make_node("Cast", ["w_half"], ["w"], to=TensorProto.FLOAT),  # keep: widening
             helper.make_node("Reshape", ["w", "shape"], ["w2"]),
             helper.make_node("Constant", [], ["two"], value=numpy_helper.from_array(np.array(2, np.float32))),
             helper.make_node("Constant", [], ["three"], value=numpy_helper.from_array(np.array(3, np.float32))),
             helper.make_node("Mul", ["two", "three"], ["six"]),  # fold
             helper.make_node("MatMul", ["x", "w2"], ["h"]),
             helper.make_node("Mul", ["h", "six"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])], [half, shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    cleaned, _ = apply("cleanup", model, {"x": np.ones((1, 16), np.float32)})
    ops = [n.op_type for n in cleaned.graph.node]
    assert "Cast" in ops and ops.count("Mul") == 1 and "Constant" not in ops
    assert cleaned.ByteSize() <= model.ByteSize()
    assert any(t.data_type == TensorProto.FLOAT16 for t in cleaned.graph.initializer)
    feed = {"x": np.ones((1, 16), np.float32)}
    assert np.allclose(run(model, feed)[0], run(cleaned, feed)[0], rtol=1e-6)


def test_cleanup_keeps_identity_between_input_and_output():
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = onnxshrink.compress(model, "cleanup", calibration=[{"x": np.ones(2, np.float32)}])
    assert [n.op_type for n in result.model.graph.node] == ["Identity"]


def test_dedup_stores_identical_weights_once():
    model = mlp_model()
    deduped, record = apply("dedup", model)
    assert "w2_copy" not in {t.name for t in deduped.graph.initializer}
    assert record.notes[0].where == "w2_copy" and "w2" in record.notes[0].message
    assert np.array_equal(run(model, X)[0], run(deduped, X)[0])


def test_fp16_halves_weights_and_keeps_float32_io():
    model = mlp_model()
    half, record = apply("fp16", onnxshrink.compress(model, "cleanup").model)
    assert all(t.data_type == TensorProto.FLOAT16 for t in half.graph.initializer)
    assert half.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert half.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    weight_bytes = sum(onnx.numpy_helper.to_array(t).nbytes for t in half.graph.initializer)
    assert weight_bytes == 2 * (8 * 16 + 16 * 4)
    assert record.fidelity["cosine"] > 0.9999


def test_fp16_without_io_casts_takes_float16_inputs():
    model = onnxshrink.compress(mlp_model(), "cleanup").model
    result = onnxshrink.compress(model, "fp16(keep_io_types=false)", calibration=[X])
    assert result.report.passes[0].status == "applied", result.report.passes[0].message
    converted = result.model
    assert converted.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    out = run(converted, {"x": X["x"].astype(np.float16)})[0]
    assert out.dtype == np.float16
    assert np.allclose(out, run(model, X)[0], atol=0.05, rtol=0.02)


def test_fp16_stores_weights_read_by_subgraphs_behind_a_cast():
    model = if_model()
    feed = {"x": np.ones((2, 8), np.float32)}
    result = onnxshrink.compress(model, "fp16", calibration=[feed, {"x": -feed["x"]}])
    (record,) = result.report.passes
    assert record.status == "applied", record.message
    weights = {t.name: t.data_type for t in result.model.graph.initializer}
    # the branch still reads float32 'w': a Cast in the outer graph makes it from the float16 twin
    assert weights["w_fp16"] == TensorProto.FLOAT16 and weights["w_out"] == TensorProto.FLOAT16 and "w" not in weights
    assert any(n.op_type == "Cast" and list(n.output) == ["w"] for n in result.model.graph.node)
    assert np.allclose(run(result.model, feed)[0], run(model, feed)[0])


def test_fp16_refuses_a_model_already_in_float16():
    model = onnxshrink.compress(mlp_model(), "cleanup,fp16(keep_io_types=false)").model
    with pytest.raises(OnnxShrinkError, match="float16 already"):
        onnxshrink.compress(model, "fp16")


def test_compress_never_modifies_its_input_model():
    model = mlp_model()
    before = model.SerializeToString()
    onnxshrink.compress(model, "cleanup,dedup,fp16")
    assert model.SerializeToString() == before
