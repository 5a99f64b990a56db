"""equalize (cross-layer equalization): same outputs, evened weight ranges, and what per-tensor
quantization gains from it."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxshrink
from onnxshrink.passes.equalize import find_pairs
from helpers import run


def cosine(a, b):
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def uneven_convs():
    """Conv (channel ranges spread over 1000x) -> Relu -> MaxPool -> depthwise Conv -> LeakyRelu -> Conv."""
    rng = np.random.default_rng(1)
    spread = np.logspace(-1.5, 1.5, 32).astype(np.float32)
    w1 = rng.standard_normal((32, 3, 3, 3)).astype(np.float32) * spread[:, None, None, None]
    w2 = rng.standard_normal((32, 1, 3, 3)).astype(np.float32) / spread[:, None, None, None]
    w3 = rng.standard_normal((16, 32, 3, 3)).astype(np.float32)
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(spread * 0.1, "b1"),
             numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(np.full(32, 0.05, np.float32), "b2"),
             numpy_helper.from_array(w3, "w3")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], name="depthwise", group=32, pads=[1, 1, 1, 1]),
             helper.make_node("LeakyRelu", ["c2"], ["r2"], alpha=0.1),
             helper.make_node("Conv", ["r2", "w3"], ["y"], name="conv3", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "uneven", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def feeds(count, seed=0):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(count)]


def spread(weight: np.ndarray) -> float:
    ranges = np.abs(weight).reshape(weight.shape[0], -1).max(axis=1)
    return float(ranges.max() / ranges.min())


def test_equalized_convs_compute_the_same_with_even_ranges():
    model = uneven_convs()
    result = onnxshrink.compress(model, "equalize", calibration=feeds(2), samples=2)
    record = result.report.passes[0]
    assert record.status == "applied" and len([n for n in record.notes if "equalized" in n.message]) == 2
    for feed in feeds(3, seed=5):
        expected = run(model, feed)[0]  # values reach ~200: float rounding is ~1e-5 of that
        np.testing.assert_allclose(run(result.model, feed)[0], expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    assert spread(before["w1"]) > 500 and spread(after["w1"]) < 20


def test_equalization_rescues_per_tensor_weights():
    model = uneven_convs()
    plain = onnxshrink.compress(model, "quantize-int8(per_channel=false,speed_check=false)", calibration=feeds(16)).model
    equalized = onnxshrink.compress(model, "quantize-int8(per_channel=false,equalize=true,speed_check=false)",
                                    calibration=feeds(16)).model
    test = feeds(4, seed=7)
    plain_cos = np.mean([cosine(run(model, f)[0], run(plain, f)[0]) for f in test])
    equalized_cos = np.mean([cosine(run(model, f)[0], run(equalized, f)[0]) for f in test])
    assert equalized_cos > plain_cos + 0.01 and equalized_cos > 0.99, (plain_cos, equalized_cos)


def linear_chain(shared_weight=False, output_between=False):
    """MatMul + Add(bias) -> Relu -> Gemm(transB) -> Relu -> MatMul, the way PyTorch exports Linear layers."""
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(rng.standard_normal((6, 5)).astype(np.float32) * np.logspace(-1, 1, 5, dtype=np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.standard_normal((4, 5)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b2"),
             numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "w3")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"]), helper.make_node("Add", ["m1", "b1"], ["a1"]),
             helper.make_node("Relu", ["a1"], ["r1"]),
             helper.make_node("Gemm", ["r1", "w2", "b2"], ["g2"], transB=1), helper.make_node("Relu", ["g2"], ["r2"]),
             helper.make_node("MatMul", ["r2", "w3"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if shared_weight:  # w2 also read elsewhere: rescaling it would change that reader
        nodes.append(helper.make_node("Identity", ["w2"], ["w2_copy"]))
        outputs.append(helper.make_tensor_value_info("w2_copy", TensorProto.FLOAT, None))
    if output_between:  # r1 is a graph output: its values must not change
        outputs.append(helper.make_tensor_value_info("r1", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_linear_layers_are_equalized_through_the_bias_add():
    model = linear_chain()
    pairs, _ = find_pairs(model)
    assert [(p.first.node.op_type, p.first.bias, p.second.node.op_type) for p in pairs] == \
        [("MatMul", "b1", "Gemm"), ("Gemm", "b2", "MatMul")]
    result = onnxshrink.compress(model, "equalize", calibration=[{"x": np.ones((2, 6), np.float32)}])
    x = {"x": np.random.default_rng(3).standard_normal((2, 6)).astype(np.float32)}
    np.testing.assert_allclose(run(result.model, x)[0], run(model, x)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("blocker", ["shared_weight", "output_between"])
def test_pairs_whose_rescaling_would_show_are_left_alone(blocker):
    pairs, _ = find_pairs(linear_chain(**{blocker: True}))
    assert [(p.first.node.op_type, p.second.node.op_type) for p in pairs] == [("Gemm", "MatMul")] \
        if blocker == "output_between" else not pairs


@pytest.mark.parametrize("fixture", ["digits_mlp_path", "ppocr_det_path"])
def test_real_models_keep_their_outputs(fixture, request):
    import inputs

    path = request.getfixturevalue(fixture)
    data = inputs.digits_inputs(4) if fixture == "digits_mlp_path" else inputs.ppocr_det_inputs(2)
    result = onnxshrink.compress(path, "equalize", calibration=data, samples=len(data), max_drift="max_rel<=1e-4")
    record = result.report.passes[0]
    assert record.status == "applied", record.message
    assert sum("equalized" in n.message for n in record.notes) >= (2 if fixture == "digits_mlp_path" else 10)
    onnx.checker.check_model(result.model, full_check=True)
