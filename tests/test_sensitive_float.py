"""The activation pair that moves the outputs most is found by measurement and left float; the
drift it is judged by does not let a large channel hide a small one."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from helpers import run
from onnxshrink.pass_base import Note
from onnxshrink.passes import sensitive_float


def chain(scales: dict[str, float] | None) -> onnx.ModelProto:
    """x -> Mul 2 -> a -> Add 1 -> b -> Mul 0.5 -> c -> Tanh -> y; with `scales`, a uint8 QuantizeLinear/
    DequantizeLinear pair (zero point 128) after each of a, b and c, as quantize-int8 places them."""
    inits = [numpy_helper.from_array(np.float32(v), n) for n, v in (("two", 2), ("one", 1), ("half", 0.5))]
    steps = [("Mul", "x", "two", "a"), ("Add", "a", "one", "b"), ("Mul", "b", "half", "c")]
    nodes, current = [], "x"
    for op, _, constant, name in steps:
        nodes.append(helper.make_node(op, [current, constant], [name]))
        current = name
        if scales:
            inits += [numpy_helper.from_array(np.float32(scales[name]), f"{name}_s"),
                      numpy_helper.from_array(np.uint8(128), f"{name}_z")]
            nodes += [helper.make_node("QuantizeLinear", [name, f"{name}_s", f"{name}_z"], [f"{name}_q"]),
                      helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [f"{name}_dq"])]
            current = f"{name}_dq"
    nodes.append(helper.make_node("Tanh", [current], ["y"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_the_pair_that_costs_most_is_left_float():
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.uniform(-1, 1, (1, 4, 16)).astype(np.float32)} for _ in range(4)]
    # a and c are quantized finely; b's step (0.25) is far too coarse for its values (-1..3)
    quantized = chain({"a": 1 / 32, "b": 0.25, "c": 1 / 64})
    notes: list[Note] = []
    result = sensitive_float.keep_sensitive_float(sensitive_float.DriftMeter(chain(None), feeds), quantized, limit=1,
                                                  notes=notes)
    quantizers = [n.input[0] for n in result.graph.node if n.op_type == "QuantizeLinear"]
    assert sorted(quantizers) == ["a", "c"], quantizers
    assert any(note.where == "b" and "left float" in note.message for note in notes)
    assert "1 activation tensor(s) left float of 3" in notes[-1].message
    x = feeds[0]["x"]
    assert np.abs(run(result, {"x": x})[0] - run(chain(None), {"x": x})[0]).max() < 0.02


def test_balanced_drift_sees_a_small_channel():
    rng = np.random.default_rng(1)
    reference = [[np.stack([1000 * rng.standard_normal(50), rng.standard_normal(50)])[None]]]
    candidate = [[reference[0][0].copy()]]
    candidate[0][0][0, 1] = rng.standard_normal(50)  # the small channel is now unrelated noise
    a, b = reference[0][0].ravel(), candidate[0][0].ravel()
    assert np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) > 0.9999  # the whole output hides it
    assert sensitive_float.balanced_drift(reference, candidate) > 0.3


def convs(count: int) -> onnx.ModelProto:
    """x [1, 2, 8, 8] -> `count` 3x3 Convs, 2 -> 2 channels (padding 1), then Tanh."""
    rng = np.random.default_rng(1)
    nodes, inits, current = [], [], "x"
    for i in range(count):
        inits.append(numpy_helper.from_array(rng.standard_normal((2, 2, 3, 3)).astype(np.float32) * 0.3, f"w{i}"))
        nodes.append(helper.make_node("Conv", [current, f"w{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]))
        current = f"c{i}"
    nodes.append(helper.make_node("Tanh", [current], ["y"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_multiply_adds_from_the_feeds_shapes():
    feed = {"x": np.zeros((3, 2, 8, 8), np.float32)}  # the batch of 3 comes from the feed, not the graph
    costs = sensitive_float.multiply_adds(convs(2), feed)
    assert costs == {"conv0": 3 * 2 * 8 * 8 * 2 * 9, "conv1": 3 * 2 * 8 * 8 * 2 * 9}


def test_multiply_adds_skips_a_layer_whose_input_rank_is_unknown():
    """PP-OCR's cls model reshapes to a shape computed at run time; shape inference then leaves
    the MatMul's input without a shape, which must not read as rank 0 (it crashed the front)."""
    from onnx import TensorProto, helper

    weight = numpy_helper.from_array(np.ones((8, 4), np.float32), "w")
    nodes = [helper.make_node("Reshape", ["x", "s"], ["r"]),  # s: a shape of unknown length
             helper.make_node("MatMul", ["r", "w"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8]),
                                           helper.make_tensor_value_info("s", TensorProto.INT64, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert sensitive_float.multiply_adds(model, {"x": np.zeros((2, 8), np.float32)}) == {}


def front_case(count: int, float_from: int):
    """The float model, and a `build` whose model matches it only once the first `float_from`
    nodes are left float (before that its last Conv's weights are off by 30%), with the nodes."""
    model = convs(count)
    spoiled = onnx.ModelProto()
    spoiled.CopyFrom(model)
    last = spoiled.graph.initializer[-1]
    last.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(last) * 1.3, last.name))
    calls = []

    def build(names):
        calls.append(sorted(names))
        return model if len(names) >= float_from else spoiled

    return model, build, list(model.graph.node)[:count], calls


def test_front_keeps_the_shortest_prefix_that_takes_the_drift_away():
    feeds = [{"x": np.random.default_rng(i).standard_normal((1, 2, 8, 8)).astype(np.float32)} for i in range(2)]
    model, build, weighted, calls = front_case(20, float_from=2)
    notes: list[Note] = []
    meter = sensitive_float.DriftMeter(model, feeds)
    kept = sensitive_float.keep_front_float(meter, model, build, weighted, budget=0.25, notes=notes)
    assert kept == {"conv0", "conv1"}
    assert sorted(len(c) for c in calls) == [0, 1, 2, 4]  # within 25% of 20 equal layers: prefixes 1, 2, 4
    assert any("first 2 weighted node(s) left float" in n.message for n in notes)


def test_front_keeps_nothing_without_a_clear_gain_or_within_budget():
    feeds = [{"x": np.random.default_rng(0).standard_normal((1, 2, 8, 8)).astype(np.float32)}]
    model, build, weighted, _ = front_case(20, float_from=99)  # no prefix helps
    notes: list[Note] = []
    meter = sensitive_float.DriftMeter(model, feeds)
    assert sensitive_float.keep_front_float(meter, model, build, weighted, budget=0.25, notes=notes) == set()
    assert any("all quantized" in n.message for n in notes)
    model, build, weighted, calls = front_case(4, float_from=1)  # one layer is 25% of the compute
    meter = sensitive_float.DriftMeter(model, feeds)
    assert sensitive_float.keep_front_float(meter, model, build, weighted, budget=0.1, notes=[]) == set()
    assert calls == []  # nothing fits the budget: nothing is measured
