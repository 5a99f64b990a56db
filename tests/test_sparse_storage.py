"""store-sparse: pruned weights stored as nonzero values + a bitmask, rebuilt bit-exactly by stock
ops that onnxruntime folds at load."""

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxshrink
import onnxshrink.passes.sparse_storage  # noqa: F401  registers store-sparse
from onnxshrink.passes.sparse_storage import find_packed, pack_sparse, unpack_sparse
from helpers import run

DECODE_OPS = {"BitShift", "CumSum", "Mod"}


def sparse(shape, zeros, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    array = rng.standard_normal(shape).astype(dtype)
    array.reshape(-1)[rng.permutation(array.size)[:int(zeros * array.size)]] = 0
    return array


def make_model(nodes, inputs, outputs, initializers, opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def odd_tensors_model():
    """Each weight straight to an output: ORT's outputs are the decoded tensors themselves."""
    odd = sparse((37, 29), 0.8)  # 1073 elements: not a whole number of mask bytes
    odd.reshape(-1)[[3, 5]] = [-0.0, np.nan]  # both are values, not zeros, and must survive bit-exactly
    weights = {"odd": odd, "half": sparse((64, 32), 0.75, np.float16), "wide": sparse((2048,), 0.9, np.float64),
               "brain": sparse((32, 64), 0.6, ml_dtypes.bfloat16), "empty": np.zeros((32, 32), np.float32)}
    nodes = [helper.make_node("Cast", [name], [f"{name}_out"], to=TensorProto.FLOAT) for name in weights]
    outputs = [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, list(w.shape))
               for name, w in weights.items()]
    return make_model(nodes, [], outputs, [numpy_helper.from_array(w, name) for name, w in weights.items()], opset=13)


def test_round_trip_is_bit_exact_in_onnxruntime_and_back():
    model = odd_tensors_model()
    packed = onnxshrink.load(model)
    notes = pack_sparse(packed, min_elements=1024, min_zeros=0.5)
    assert sorted(n.where for n in notes if "stored sparse" in n.message) == ["brain", "empty", "half", "odd", "wide"]
    onnx.checker.check_model(packed, full_check=True)
    assert not {t.name for t in packed.graph.initializer} & {"odd", "half", "wide", "brain", "empty"}
    assert packed.ByteSize() < 0.5 * model.ByteSize()
    for expected, got in zip(run(model, {}), run(packed, {})):
        assert expected.tobytes() == got.tobytes()  # NaN and -0.0 included

    assert unpack_sparse(packed) == 5
    assert not DECODE_OPS & {n.op_type for n in packed.graph.node}
    original = {t.name: t.SerializeToString() for t in model.graph.initializer}
    assert {t.name: t.SerializeToString() for t in packed.graph.initializer} == original


def test_packing_twice_packs_nothing_new():
    model = odd_tensors_model()
    pack_sparse(model, min_elements=1024, min_zeros=0.5)
    once = onnxshrink.load(model)
    assert pack_sparse(model, min_elements=1, min_zeros=0.0) == []  # not even the stored values
    assert model == once and len(find_packed(model.graph)) == 5


def mlp(w1, w2, opset=17):
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", w1.shape[0]])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", w2.shape[1]])],
                      [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")], opset)


def feeds(count, width=64, seed=1):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((2, width)).astype(np.float32)} for _ in range(count)]


def test_dense_weights_are_not_packed():
    model = mlp(sparse((64, 64), 0.02), sparse((64, 32), 0.3, seed=1))
    result = onnxshrink.compress(model, "store-sparse", calibration=feeds(2))
    assert result.report.passes[0].status == "unchanged" and result.model == model
    assert result.report.passes[0].notes == []
    # asked to pack anything, it still refuses what would grow: 2% zeros save less than the mask costs
    result = onnxshrink.compress(model, "store-sparse(min_zeros=0)", calibration=feeds(2))
    notes = {n.where: n.message for n in result.report.passes[0].notes}
    assert "would not shrink" in notes["w1"] and "stored sparse" in notes["w2"]


def negative_zeros(model):
    w1 = numpy_helper.to_array(model.graph.initializer[0]).copy()
    w1[w1 == 0] = -0.0
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w1, "w1"))


def graph_input(model):
    model.graph.input.append(helper.make_tensor_value_info("w1", TensorProto.FLOAT, [64, 64]))


@pytest.mark.parametrize("opset, change, reason", [
    (9, None, "need opset 11"),
    (17, graph_input, "graph input"),
    (17, negative_zeros, "-0.0"),
])
def test_weights_that_cannot_be_packed_stay_dense_with_a_note(opset, change, reason):
    model = mlp(sparse((64, 64), 0.9), sparse((64, 32), 0.9, seed=1), opset)
    if change:
        change(model)
    result = onnxshrink.compress(model, "store-sparse", calibration=feeds(2))
    notes = {n.where: n.message for n in result.report.passes[0].notes}
    assert reason in notes["w1"] and notes["w1"].startswith("left dense")
    assert "w1" in {t.name for t in result.model.graph.initializer}
    if opset < 11:
        assert result.model == model and "left dense" in notes["w2"]
    else:
        assert "stored sparse" in notes["w2"]


def if_model():
    """An If whose then-branch reads the packed outer weight and whose else-branch holds its own."""
    then_graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["t"])], "then", [],
                                   [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    else_graph = helper.make_graph([helper.make_node("MatMul", ["x", "w_inner"], ["e"])], "else", [],
                                   [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)],
                                   [numpy_helper.from_array(sparse((64, 64), 0.9, seed=3), "w_inner")])
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["cond"]),
             helper.make_node("If", ["cond"], ["branch"], then_branch=then_graph, else_branch=else_graph),
             helper.make_node("MatMul", ["branch", "w_out"], ["y"])]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])],
                      [numpy_helper.from_array(sparse((64, 64), 0.9, seed=2), "w"),
                       numpy_helper.from_array(np.array(0, np.float32), "zero"),
                       numpy_helper.from_array(sparse((64, 64), 0.7, seed=4), "w_out")], opset=13)


def test_model_with_if_stays_valid_and_subgraph_weights_stay_dense():
    model = if_model()
    both_branches = [{"x": np.abs(f["x"])} for f in feeds(2)] + [{"x": -np.abs(f["x"])} for f in feeds(2, seed=2)]
    result = onnxshrink.compress(model, "store-sparse", calibration=both_branches)
    notes = {n.where: n.message for n in result.report.passes[0].notes}
    assert "stored sparse" in notes["w"] and "stored sparse" in notes["w_out"]
    assert notes["w_inner"] == "left dense: inside a subgraph"
    onnx.checker.check_model(result.model, full_check=True)
    for feed in both_branches:
        assert np.array_equal(run(model, feed)[0], run(result.model, feed)[0])


def prune_smallest(model, op_types, fraction, min_elements=0):
    """Zero the `fraction` smallest-magnitude weights of each constant weight input of `op_types`."""
    names = {n.input[1] for n in model.graph.node if n.op_type in op_types}
    pruned = 0
    for tensor in model.graph.initializer:
        if tensor.name in names and np.prod(tensor.dims) >= min_elements:
            array = numpy_helper.to_array(tensor).copy()
            array.reshape(-1)[np.argsort(np.abs(array), axis=None)[:int(fraction * array.size)]] = 0
            tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
            pruned += tensor.ByteSize()
    return pruned


def folded_by_onnxruntime(model, path) -> bool:
    """Constant folding (optimization level basic and up) left none of the decode ops."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(path)
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return not DECODE_OPS & {n.op_type for n in onnx.load(str(path)).graph.node}


@pytest.mark.realmodel
def test_digits_mlp_at_90_percent_is_a_quarter_of_the_file(digits_mlp_path, tmp_path):
    import inputs

    model = onnx.load(str(digits_mlp_path))
    prune_smallest(model, {"Gemm"}, 0.9)
    data = inputs.digits_inputs(8)
    result = onnxshrink.compress(model, "store-sparse", calibration=data)
    packed = result.model
    assert result.report.passes[0].status == "applied" and len(find_packed(packed.graph)) == 3
    onnx.checker.check_model(packed, full_check=True)
    assert packed.ByteSize() <= 0.25 * model.ByteSize()  # 0.525 bytes a weight + decode nodes: 0.16x measured
    assert folded_by_onnxruntime(packed, tmp_path / "optimized.onnx")
    for feed in data:
        assert np.array_equal(run(model, feed)[0], run(packed, feed)[0])


@pytest.mark.realmodel
def test_minilm_at_50_percent_packs_and_keeps_outputs(minilm_path, tmp_path):
    import inputs

    model = onnx.load(str(minilm_path))
    weight_bytes = prune_smallest(model, {"MatMul"}, 0.5, min_elements=4096)
    data = inputs.minilm_inputs(2)
    result = onnxshrink.compress(model, "store-sparse", calibration=data)
    packed = result.model
    assert len(find_packed(packed.graph)) == 36  # 6 layers x (q, k, v, attention out, 2 feed-forward)
    onnx.checker.check_model(packed, full_check=True)
    # float32 at 50% zeros: 0.5 * 4 + 1/8 bytes a weight, 0.53x; the file saves >= 45% of the pruned weights' bytes
    assert packed.ByteSize() <= model.ByteSize() - 0.45 * weight_bytes
    assert folded_by_onnxruntime(packed, tmp_path / "optimized.onnx")
    for feed in data:
        for expected, got in zip(run(model, feed), run(packed, feed)):
            assert np.array_equal(expected, got)
