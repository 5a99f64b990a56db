"""stream_extremes: in-graph min/max/channel sums agree with numpy on the tensors themselves."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxshrink.activations import (conv_input_grams, conv_patch_rows, depthwise_patch_rows, main_graph_tensors,
                                   stream_extremes, stream_tensors)


def masked_model(opset):
    """x[2,3,4] -> Mul by w -> Add mask (-inf in one column) -> Relu; a Shape feeds an int output."""
    mask = np.zeros((1, 1, 4), np.float32)
    mask[..., 1] = -np.inf
    inits = [numpy_helper.from_array(np.array([1.0, -2.0, 0.5], np.float32).reshape(1, 3, 1), "w"),
             numpy_helper.from_array(mask, "mask")]
    nodes = [helper.make_node("Mul", ["x", "w"], ["scaled"]),
             helper.make_node("Add", ["scaled", "mask"], ["masked"]),
             helper.make_node("Relu", ["masked"], ["y"]),
             helper.make_node("Shape", ["x"], ["shape"])]
    graph = helper.make_graph(nodes, "masked", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4]),
                               helper.make_tensor_value_info("shape", TensorProto.INT64, [3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("opset", [11, 13, 18])  # ReduceSum's axes are an attribute before 13, ReduceMin's before 18
def test_extremes_match_numpy_and_drop_non_finite(opset):
    model = masked_model(opset)
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((2, 3, 4)).astype(np.float32)} for _ in range(3)]
    names = ["x", "scaled", "masked", "y", "shape"]
    axes = {"x": 1, "scaled": 1, "y": -1}
    streamed = list(stream_extremes(model, names, axes, feeds))
    for feed, summaries, tensors in zip(feeds, streamed, stream_tensors(model, names, feeds)):
        for name in ("x", "scaled", "masked", "y"):
            value = tensors[name]
            finite = value[np.isfinite(value)]
            got = summaries[name]
            assert got.dtype == np.float32
            assert (got.low, got.high) == pytest.approx((finite.min(), finite.max()), rel=1e-6)
        for name, axis in axes.items():
            value = tensors[name].astype(np.float64)
            moved = np.moveaxis(value, axis, -1).reshape(-1, value.shape[axis])
            np.testing.assert_allclose(summaries[name].channel_sum, moved.sum(axis=0), rtol=1e-5, atol=1e-6)
            assert summaries[name].channel_count == moved.shape[0]
        assert summaries["shape"].dtype == np.int64 and summaries["shape"].channel_sum is None
        assert np.isneginf(tensors["masked"]).any()  # the -inf column really reached the tensor


def test_extremes_on_a_real_model(yolov8n_path):
    import inputs

    model = onnx.load(yolov8n_path)
    names = sorted(main_graph_tensors(model))[:60]
    convs = [n.input[0] for n in model.graph.node if n.op_type == "Conv"][:10]
    feeds = inputs.yolov8n_inputs(2)
    for summaries, tensors in zip(stream_extremes(model, names + convs, {c: 1 for c in convs}, feeds),
                                  stream_tensors(model, names + convs, feeds)):
        for name, value in tensors.items():
            if value.dtype == np.float32 and value.size:
                assert (summaries[name].low, summaries[name].high) == pytest.approx((value.min(), value.max()), rel=1e-6)
        for name in convs:
            mean = tensors[name].astype(np.float64).mean(axis=(0, 2, 3))
            np.testing.assert_allclose(summaries[name].channel_sum / summaries[name].channel_count, mean,
                                       rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("attrs", [{}, {"strides": [2, 2], "pads": [1, 1, 1, 1]},
                                   {"strides": [1, 2], "pads": [0, 2, 1, 0], "dilations": [2, 1]}])
def test_conv_patch_rows_times_the_weight_are_the_conv(attrs):
    import onnxruntime as ort

    rng = np.random.default_rng(4)
    weight = rng.standard_normal((5, 3, 3, 2)).astype(np.float32)
    x = rng.standard_normal((2, 3, 9, 8)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    rows = conv_patch_rows(x, node, (3, 2))
    got = (rows @ weight.reshape(5, -1).T).reshape(2, -1, 5).transpose(0, 2, 1).reshape(y.shape)
    np.testing.assert_allclose(got, y, atol=1e-4)


def test_conv_patch_rows_refuse_grouped_and_auto_pad_convs():
    x = np.zeros((1, 4, 6, 6), np.float32)
    assert conv_patch_rows(x, helper.make_node("Conv", ["x", "w"], ["y"], group=2), (3, 3)) is None
    assert conv_patch_rows(x, helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_UPPER"), (3, 3)) is None


def test_depthwise_patch_rows_times_each_filter_are_the_conv():
    import onnxruntime as ort

    rng = np.random.default_rng(5)
    weight = rng.standard_normal((8, 1, 3, 3)).astype(np.float32)  # 4 channels, 2 outputs each
    x = rng.standard_normal((2, 4, 7, 6)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=4, pads=[1, 1, 1, 1], strides=[2, 1])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    rows = depthwise_patch_rows(x, node, (3, 3))  # [channels, batch * positions, taps]
    assert rows.shape == (4, 2 * y.shape[2] * y.shape[3], 9)
    for o in range(8):
        got = (rows[o // 2] @ weight[o].reshape(-1)).reshape(2, y.shape[2], y.shape[3])
        np.testing.assert_allclose(got, y[:, o], atol=1e-4)
    grams = conv_input_grams(model, [node], [{"x": x}], max_samples=1)
    np.testing.assert_allclose(grams["w"], np.einsum("cpk,cpl->ckl", rows.astype(np.float64), rows), rtol=1e-6)
