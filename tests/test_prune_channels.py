"""prune_channels (structured channel pruning): each flow rule on a small graph, exactness where
the pruned channels are zero, frozen channels, and the reference models."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxshrink.errors import UsageError
from onnxshrink.graph import constants_to_initializers, model_stats
from onnxshrink.passes.prune_channels import (ChannelFlow, choose_removed, kept_channels, prune_channels,
                                              unread_outputs, zero_unread_outputs)
from helpers import run

RNG = np.random.default_rng(0)


def weights(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def make_model(nodes, arrays, inputs, outputs, opset=17):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
                              [numpy_helper.from_array(a, n) for n, a in arrays.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def conv(name, x, y, w, b=None, **attrs):
    return helper.make_node("Conv", [x, w] + ([b] if b else []), [y], name=name, **attrs)


def initializers(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def node(model, name):
    return next(n for n in model.graph.node if n.name == name)


def feed(shape=(1, 3, 8, 8), name="x"):
    return {name: RNG.standard_normal(shape).astype(np.float32)}


def assert_valid_and_equal(original, pruned, inputs, rtol=1e-4):
    onnx.checker.check_model(pruned, full_check=True)
    for expected, got in zip(run(original, inputs), run(pruned, inputs)):
        np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


def c2f_like(zeroed: bool):
    """conv1 -> SiLU -> Split[8,8]; second half -> conv2 -> Relu -> residual Add; Concat(s0, s1, add) ->
    MaxPool -> conv3 -> BN -> Relu -> depthwise -> Add(c) -> Mul(c) -> conv5 -> y. With `zeroed`, a
    quarter of every channel block computes exactly zero, so removing it must not change y."""
    w1, b1, w2, b2 = weights(16, 3, 3, 3), weights(16), weights(8, 8, 3, 3), weights(8)
    w3, b3, w4, b4 = weights(16, 24, 1, 1), weights(16), weights(16, 1, 3, 3), weights(16)
    gamma, beta = np.abs(weights(16)) + 0.5, weights(16)
    mean, var = weights(16), np.abs(weights(16)) + 0.5
    add, mul, w5 = weights(1, 16, 1, 1), weights(16, 1, 1), weights(4, 16, 3, 3)
    if zeroed:
        for array in (w1, b1):
            array[[1, 5, 9, 13]] = 0  # 1, 5 in the first Split piece; 9, 13 in the second, tied to conv2's 1, 5
        for array in (w2, b2):
            array[[1, 5]] = 0
        for array in (w3, b3, w4, b4, beta, mean):
            array[[0, 6, 7, 12]] = 0  # BN(0) = 0, then Relu, depthwise and Add keep it 0
        add[0, [0, 6, 7, 12]] = 0
    arrays = dict(w1=w1, b1=b1, w2=w2, b2=b2, w3=w3, b3=b3, w4=w4, b4=b4, gamma=gamma, beta=beta, mean=mean,
                  var=var, add=add, mul=mul, w5=w5, sizes=np.array([8, 8], np.int64))
    nodes = [conv("conv1", "x", "c1", "w1", "b1", pads=[1] * 4),
             helper.make_node("Sigmoid", ["c1"], ["sig"]), helper.make_node("Mul", ["c1", "sig"], ["silu"]),
             helper.make_node("Split", ["silu", "sizes"], ["s0", "s1"], name="split", axis=1),
             conv("conv2", "s1", "c2", "w2", "b2", pads=[1] * 4), helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Add", ["s1", "r2"], ["res"], name="residual"),
             helper.make_node("Concat", ["s0", "s1", "res"], ["cat"], axis=1),
             helper.make_node("MaxPool", ["cat"], ["pool"], kernel_shape=[2, 2], strides=[2, 2]),
             conv("conv3", "pool", "c3", "w3", "b3"),
             helper.make_node("BatchNormalization", ["c3", "gamma", "beta", "mean", "var"], ["bn"], name="bn"),
             helper.make_node("Relu", ["bn"], ["r3"]),
             conv("depthwise", "r3", "c4", "w4", "b4", group=16, pads=[1] * 4),
             helper.make_node("Add", ["c4", "add"], ["a4"]), helper.make_node("Mul", ["a4", "mul"], ["m4"]),
             conv("conv5", "m4", "y", "w5", pads=[1] * 4)]
    return make_model(nodes, arrays, [("x", [1, 3, 8, 8])], [("y", [1, 4, 4, 4])])


def test_zeroed_channels_are_pruned_without_changing_outputs():
    model = c2f_like(zeroed=True)
    pruned, notes = prune_channels(model, 0.25)
    assert_valid_and_equal(model, pruned, feed(), rtol=1e-5)
    after = initializers(pruned)
    assert after["w1"].shape == (12, 3, 3, 3) and after["w2"].shape == (6, 6, 3, 3)
    assert after["w3"].shape == (12, 18, 1, 1)  # Concat offsets: 6 + 6 + 6 inputs
    assert after["w4"].shape == (12, 1, 3, 3) and after["w5"].shape == (4, 12, 3, 3)
    assert any(n.where == "conv1" and "16 -> 12" in n.message for n in notes)
    assert "parameters" in notes[-1].message


def test_split_sizes_depthwise_group_and_batchnorm_follow_the_cut():
    pruned, _ = prune_channels(c2f_like(zeroed=True), 0.25)
    after = initializers(pruned)
    assert after[node(pruned, "split").input[1]].tolist() == [6, 6]
    assert next(a.i for a in node(pruned, "depthwise").attribute if a.name == "group") == 12
    assert all(after[name].shape == (12,) for name in node(pruned, "bn").input[1:])
    assert after[node(pruned, "depthwise").input[2]].shape == (12,)


@pytest.mark.parametrize("opset, form", [(11, "attribute"), (13, "input"), (18, "num_outputs")])
def test_split_sizes_are_written_in_the_form_the_opset_wants(opset, form):
    w1, w2 = weights(8, 3, 1, 1), weights(4, 4, 1, 1)
    w1[[0, 5]] = 0  # one of four channels gone in each piece
    split_attrs = {"attribute": dict(split=[4, 4]), "input": {}, "num_outputs": dict(num_outputs=2)}[form]
    split_inputs = ["c1", "sizes"] if form == "input" else ["c1"]
    nodes = [conv("conv1", "x", "c1", "w1"),
             helper.make_node("Split", split_inputs, ["s0", "s1"], name="split", axis=1, **split_attrs),
             helper.make_node("Relu", ["s0"], ["r0"]), conv("conv2", "r0", "y0", "w2"), conv("conv3", "s1", "y1", "w2")]
    arrays = dict(w1=w1, w2=w2, **({"sizes": np.array([4, 4], np.int64)} if form == "input" else {}))
    model = make_model(nodes, arrays, [("x", [1, 3, 4, 4])], [("y0", [1, 4, 4, 4]), ("y1", [1, 4, 4, 4])], opset)
    pruned, _ = prune_channels(model, 0.25)
    assert_valid_and_equal(model, pruned, feed((1, 3, 4, 4)), rtol=1e-5)
    split = node(pruned, "split")
    sizes = initializers(pruned)[split.input[1]].tolist() if len(split.input) > 1 else \
        next(a.ints for a in split.attribute if a.name == "split")
    assert list(sizes) == [3, 3]


def test_residual_add_ties_channels_chosen_by_the_summed_score():
    unit = np.full((4, 3, 1, 1), 1 / 3, np.float32) ** 0.5  # each output channel's weights have norm 1
    norms_a, norms_b = np.array([1, 5, 9, 9], np.float32), np.array([9, 2, 9, 9], np.float32)
    wa, wb = unit * norms_a[:, None, None, None], unit * norms_b[:, None, None, None]
    nodes = [conv("a", "x", "ya", "wa"), conv("b", "x", "yb", "wb"), helper.make_node("Add", ["ya", "yb"], ["s"]),
             conv("c", "s", "y", "wc")]
    model = make_model(nodes, dict(wa=wa, wb=wb, wc=weights(2, 4, 1, 1)), [("x", [1, 3, 4, 4])], [("y", [1, 2, 4, 4])])
    pruned, _ = prune_channels(model, 0.25)
    after = initializers(pruned)
    # sums are 10, 7, 18, 18: channel 1 goes from both, though a alone would have lost channel 0
    np.testing.assert_array_equal(after["wa"], wa[[0, 2, 3]])
    np.testing.assert_array_equal(after["wb"], wb[[0, 2, 3]])
    onnx.checker.check_model(pruned, full_check=True)


def test_concat_offsets_cut_the_consumer_at_the_right_inputs():
    wa, wb, wc = weights(8, 3, 1, 1), weights(4, 3, 1, 1), weights(2, 12, 1, 1)
    wa[[2, 5]] = 0
    wb[1] = 0
    nodes = [conv("a", "x", "ya", "wa"), conv("b", "x", "yb", "wb"),
             helper.make_node("Concat", ["ya", "yb"], ["cat"], axis=-3), conv("c", "cat", "y", "wc")]
    model = make_model(nodes, dict(wa=wa, wb=wb, wc=wc), [("x", [1, 3, 4, 4])], [("y", [1, 2, 4, 4])])
    pruned, _ = prune_channels(model, 0.25)
    np.testing.assert_array_equal(initializers(pruned)["wc"], wc[:, [0, 1, 3, 4, 6, 7, 8, 10, 11]])
    assert_valid_and_equal(model, pruned, feed((1, 3, 4, 4)), rtol=1e-5)


def test_batchnorm_scale_criterion_removes_the_channels_with_small_gamma():
    w1 = np.ones((4, 3, 1, 1), np.float32)  # equal weight norms: only gamma tells the channels apart
    gamma = np.array([0.01, 1, 2, 0.02], np.float32)
    nodes = [conv("conv1", "x", "c1", "w1"),
             helper.make_node("BatchNormalization", ["c1", "gamma", "beta", "mean", "var"], ["bn"], name="bn"),
             helper.make_node("Relu", ["bn"], ["r"]), conv("conv2", "r", "y", "w2")]
    arrays = dict(w1=w1, gamma=gamma, beta=np.zeros(4, np.float32), mean=np.zeros(4, np.float32),
                  var=np.ones(4, np.float32), w2=weights(2, 4, 1, 1))
    model = make_model(nodes, arrays, [("x", [1, 3, 4, 4])], [("y", [1, 2, 4, 4])])
    pruned, _ = prune_channels(model, 0.5, criterion="bn-scale")
    assert initializers(pruned)[node(pruned, "bn").input[1]].tolist() == pytest.approx([1, 2])
    # gamma ~ 0 makes those channels ~ 0 after BN: the output barely moves
    assert_valid_and_equal(model, pruned, feed((1, 3, 4, 4)), rtol=0.05)


def relu_chain(tail):
    """conv0 -> Relu -> conv1 -> `tail` nodes (reading c1)."""
    nodes = [conv("conv0", "x", "c0", "w0"), helper.make_node("Relu", ["c0"], ["r0"]), conv("conv1", "r0", "c1", "w1")]
    return nodes + tail, dict(w0=weights(8, 3, 1, 1), w1=weights(8, 8, 1, 1), shape=np.array([1, -1], np.int64))


def test_channels_reaching_a_graph_output_are_frozen():
    nodes, arrays = relu_chain([helper.make_node("Relu", ["c1"], ["y"])])
    model = make_model(nodes, arrays, [("x", [1, 3, 4, 4])], [("y", [1, 8, 4, 4])])
    pruned, notes = prune_channels(model, 0.5)
    after = initializers(pruned)
    assert after["w0"].shape == (4, 3, 1, 1) and after["w1"].shape == (8, 4, 1, 1)
    assert any(n.where == "y" and "graph output" in n.message for n in notes)
    onnx.checker.check_model(pruned, full_check=True)
    assert run(pruned, feed((1, 3, 4, 4)))[0].shape == (1, 8, 4, 4)


@pytest.mark.parametrize("tail, shape", [
    (helper.make_node("Reshape", ["c1", "shape"], ["y"], name="tail"), [1, 128]),
    (helper.make_node("Transpose", ["c1"], ["y"], name="tail", perm=[0, 2, 3, 1]), [1, 4, 4, 8]),
    (helper.make_node("Softmax", ["c1"], ["y"], name="tail", axis=1), [1, 8, 4, 4]),
    (helper.make_node("Flatten", ["c1"], ["y"], name="tail"), [1, 128]),
    (helper.make_node("Resize", ["c1", "", "", "sizes"], ["y"], name="tail"), [1, 8, 8, 8]),
], ids=["Reshape", "Transpose", "Softmax", "Flatten", "Resize-to-sizes"])
def test_an_op_the_flow_cannot_follow_freezes_what_it_reads_but_not_the_layer_inputs(tail, shape):
    nodes, arrays = relu_chain([tail])
    arrays["sizes"] = np.array([1, 8, 8, 8], np.int64)
    model = make_model(nodes, arrays, [("x", [1, 3, 4, 4])], [("y", shape)])
    pruned, notes = prune_channels(model, 0.5)
    assert initializers(pruned)["w1"].shape == (8, 4, 1, 1)
    assert any(n.where == "tail" and "c1 kept whole" in n.message for n in notes)
    onnx.checker.check_model(pruned, full_check=True)
    sample = feed((1, 3, 4, 4))
    assert run(pruned, sample)[0].shape == run(model, sample)[0].shape


@pytest.mark.parametrize("exclude", [("conv0",), ("Conv",)])
def test_excluded_layers_are_left_as_they_are(exclude):
    nodes, arrays = relu_chain([conv("conv2", "c1", "y", "w2")])
    arrays["w2"] = weights(2, 8, 1, 1)
    model = make_model(nodes, arrays, [("x", [1, 3, 4, 4])], [("y", [1, 2, 4, 4])])
    pruned, notes = prune_channels(model, 0.5, exclude=exclude)
    after = initializers(pruned)
    assert after["w0"].shape == (8, 3, 1, 1) and any("excluded" in n.message for n in notes)
    assert after["w1"].shape == ((8, 8, 1, 1) if exclude == ("Conv",) else (4, 8, 1, 1))


def test_shared_and_constant_node_weights_are_cut_per_reader():
    w = weights(8, 3, 1, 1)
    w[[1, 2]] = 0
    nodes = [helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w)),
             conv("frozen", "x", "y0", "w"), conv("pruned", "x", "c", "w"),
             helper.make_node("Relu", ["c"], ["r"]), conv("last", "r", "y1", "w2")]
    model = make_model(nodes, dict(w2=weights(2, 8, 1, 1)), [("x", [1, 3, 4, 4])],
                       [("y0", [1, 8, 4, 4]), ("y1", [1, 2, 4, 4])])
    pruned, _ = prune_channels(model, 0.25)
    after = initializers(pruned)
    assert after[node(pruned, "frozen").input[1]].shape == (8, 3, 1, 1)
    assert after[node(pruned, "pruned").input[1]].shape == (6, 3, 1, 1)
    assert_valid_and_equal(model, pruned, feed((1, 3, 4, 4)), rtol=1e-5)


def test_channels_captured_by_a_subgraph_are_frozen():
    branch = lambda name: helper.make_graph([helper.make_node("Relu", ["c"], [name])], name, [],  # noqa: E731
                                            [helper.make_tensor_value_info(name, TensorProto.FLOAT, None)])
    nodes = [conv("conv", "x", "c", "w"), helper.make_node("If", ["flag"], ["y"], name="if",
                                                            then_branch=branch("t"), else_branch=branch("e"))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4]),
                                           helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(weights(8, 3, 1, 1), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    pruned, notes = prune_channels(model, 0.5)
    assert initializers(pruned)["w"].shape == (8, 3, 1, 1)
    assert any(n.where == "if" and "subgraph" in n.message for n in notes)


def test_mlp_of_matmul_and_gemm_prunes_exactly_where_channels_are_zero():
    w1, b1, w2, b2, w3 = weights(8, 16), weights(16), weights(12, 16), weights(12), weights(12, 5)
    for array, dead in ((w1.T, [0, 3, 9, 15]), (b1, [0, 3, 9, 15]), (w2, [2, 4, 7]), (b2, [2, 4, 7])):
        array[dead] = 0
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"], name="fc1"), helper.make_node("Add", ["m1", "b1"], ["a1"]),
             helper.make_node("Relu", ["a1"], ["r1"]),
             helper.make_node("Gemm", ["r1", "w2", "b2"], ["g2"], name="fc2", transB=1),
             helper.make_node("Relu", ["g2"], ["r2"]), helper.make_node("MatMul", ["r2", "w3"], ["y"], name="fc3")]
    model = make_model(nodes, dict(w1=w1, b1=b1, w2=w2, b2=b2, w3=w3), [("x", ["n", 8])], [("y", ["n", 5])])
    pruned, _ = prune_channels(model, 0.25)
    after = initializers(pruned)
    assert after["w1"].shape == (8, 12) and after["w2"].shape == (9, 12) and after["w3"].shape == (9, 5)
    assert_valid_and_equal(model, pruned, feed((3, 8)), rtol=1e-5)


def test_round_to_rounds_kept_channels_up_to_a_multiple():
    nodes, arrays = relu_chain([conv("conv2", "c1", "y", "w2")])
    arrays.update(w0=weights(16, 3, 1, 1), w1=weights(16, 16, 1, 1), w2=weights(2, 16, 1, 1))
    model = make_model(nodes, arrays, [("x", [1, 3, 4, 4])], [("y", [1, 2, 4, 4])])
    assert initializers(prune_channels(model, 0.3)[0])["w0"].shape[0] == 11
    assert initializers(prune_channels(model, 0.3, round_to=4)[0])["w0"].shape[0] == 12


@pytest.mark.parametrize("arguments", [dict(sparsity=-0.1), dict(sparsity=1.0), dict(sparsity=0.3, criterion="l3"),
                                       dict(sparsity=0.3, round_to=0)])
def test_bad_arguments_raise_a_usage_error(arguments):
    with pytest.raises(UsageError, match="prune_channels"):
        prune_channels(c2f_like(zeroed=False), **arguments)


def chosen_channels(model, sparsity):
    """layer name -> the output channels prune_channels keeps, from the flow itself."""
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    constants_to_initializers(reference.graph)
    flow = ChannelFlow(reference, set())
    flow.follow()
    kept = flow.kept_mask(choose_removed(flow, sparsity, "l2", 1))
    return {layer.name: np.flatnonzero(kept(layer.ids)) for layer in flow.layers}


def test_kept_channels_recovers_what_pruning_kept_from_the_weights():
    model = c2f_like(zeroed=False)
    pruned, _ = prune_channels(model, 0.25)
    found, notes = kept_channels(model, pruned)
    expected = chosen_channels(model, 0.25)
    assert not notes and found.keys() == expected.keys()
    for name, channels in expected.items():
        np.testing.assert_array_equal(found[name].outputs, channels, err_msg=name)
    assert found["depthwise"].inputs is None and len(found["conv3"].inputs) == 18  # Concat of 6 + 6 + 6
    np.testing.assert_array_equal(found["conv2"].inputs, expected["conv1"][expected["conv1"] >= 8] - 8)  # Split's 2nd piece


def test_kept_channels_matches_through_later_zeros_but_not_through_other_changes():
    model = c2f_like(zeroed=False)
    pruned, _ = prune_channels(model, 0.25)
    tensors = {t.name: t for t in pruned.graph.initializer}
    w2 = numpy_helper.to_array(tensors["w2"]).copy()
    w2[np.abs(w2) < np.median(np.abs(w2))] = 0  # unstructured pruning after the channels went
    tensors["w2"].CopyFrom(numpy_helper.from_array(w2, "w2"))
    found, notes = kept_channels(model, pruned)
    np.testing.assert_array_equal(found["conv2"].outputs, chosen_channels(model, 0.25)["conv2"])
    tensors["w3"].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensors["w3"]) * 1.5, "w3"))  # refit, say
    found, notes = kept_channels(model, pruned)
    assert "conv3" not in found and any(n.where == "conv3" and "not a channel slice" in n.message for n in notes)
    assert "depthwise" not in found  # its channels come from conv3


def cut_inputs_only(model, sparsity):
    """The model with the input weights that prune_channels removes at `sparsity` zeroed instead.
    Channels only mix in layers, so this computes exactly what the pruned model does."""
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    constants_to_initializers(reference.graph)
    flow = ChannelFlow(reference, set())
    flow.follow()
    kept = flow.kept_mask(choose_removed(flow, sparsity, "l2", 1))
    tensors = {t.name: t for t in reference.graph.initializer}
    for layer in flow.layers:
        in_axis, source = flow.layer_axes(layer.node)[0], flow.channels.get(layer.node.input[0])
        if in_axis is not None and source is not None:
            name = layer.node.input[1]
            weight = numpy_helper.to_array(tensors[name]).copy()
            np.moveaxis(weight, in_axis, 0)[~kept(source.ids)] = 0
            tensors[name].CopyFrom(numpy_helper.from_array(weight, name))
    return reference


def assert_pruned_exactly(model, pruned, samples):
    reference = cut_inputs_only(model, 0.3)
    for sample in samples:
        expected, got = run(reference, sample)[0], run(pruned, sample)[0]
        assert got.shape == expected.shape == run(model, sample)[0].shape
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())


@pytest.mark.realmodel
def test_yolov8n_at_30_percent_halves_the_parameters_and_prunes_exactly(yolov8n_path):
    import inputs

    model = onnx.load(yolov8n_path)
    pruned, notes = prune_channels(model, 0.3)
    onnx.checker.check_model(pruned, full_check=True)
    assert model_stats(pruned).params <= 0.55 * model_stats(model).params  # measured 0.49
    assert [o.name for o in pruned.graph.output] == [o.name for o in model.graph.output]
    assert sum("kept whole" in n.message for n in notes) >= 3  # the head's Reshapes and Shapes
    assert_pruned_exactly(model, pruned, inputs.yolov8n_inputs(2))


@pytest.mark.realmodel
def test_ppocr_det_prunes_to_a_valid_model_exactly(ppocr_det_path):
    import inputs

    model = onnx.load(ppocr_det_path)
    pruned, _ = prune_channels(model, 0.3)
    onnx.checker.check_model(pruned, full_check=True)
    assert model_stats(pruned).params <= 0.6 * model_stats(model).params  # measured 0.50
    assert_pruned_exactly(model, pruned, inputs.ppocr_det_inputs(2))  # through squeeze-excite, Resize, ConvTranspose


@pytest.mark.realmodel
def test_digits_mlp_prunes_its_hidden_layers_and_stays_accurate(digits_mlp_path):
    import zoo

    model = onnx.load(digits_mlp_path)
    pruned, notes = prune_channels(model, 0.3)
    onnx.checker.check_model(pruned, full_check=True)
    assert [n.message.split(" (")[0] for n in notes if n.message.startswith("output channels")] == \
        ["output channels 256 -> 179", "output channels 128 -> 90", "output channels 10 -> 10"]
    x, labels = zoo.digits_test()
    accuracy = float((run(pruned, {"input": x})[0].argmax(axis=1) == labels).mean())
    assert accuracy >= 0.95  # measured 0.98, as the original


# ---------------------------------------------------------------- channels nothing reads (after unstructured pruning)
def test_unread_channels_are_zeroed_back_through_the_flow_without_changing_outputs():
    model = c2f_like(zeroed=False)
    arrays = initializers(model)
    w5, w3 = arrays["w5"].copy(), arrays["w3"].copy()
    w5[:, [0, 6]] = 0  # the last Conv ignores channels 0 and 6: through Mul, Add, depthwise, Relu, BN to conv3
    w3[:, 0:8] = 0  # conv3 ignores the Concat's first part, Split piece s0: conv1's channels 0..7
    for name, array in (("w5", w5), ("w3", w3)):
        next(t for t in model.graph.initializer if t.name == name).CopyFrom(numpy_helper.from_array(array, name))
    before = onnx.ModelProto()
    before.CopyFrom(model)
    masks = unread_outputs(model)
    assert np.flatnonzero(masks["w3"][0]).tolist() == [0, 6] and np.flatnonzero(masks["w4"][0]).tolist() == [0, 6]
    assert np.flatnonzero(masks["w1"][0]).tolist() == list(range(8))
    assert not masks["w2"][0].any() and not masks["w5"][0].any()  # conv2's channels feed the residual, read
    notes = zero_unread_outputs(model)
    assert_valid_and_equal(before, model, feed(), rtol=1e-5)
    after = initializers(model)
    assert not after["w3"][[0, 6]].any() and not after["w4"][[0, 6]].any() and not after["w1"][:8].any()
    np.testing.assert_array_equal(after["w1"][8:], arrays["w1"][8:])
    np.testing.assert_array_equal(after["b1"][8:], arrays["b1"][8:])
    assert arrays["b1"][:8].all() and not after["b1"][:8].any()  # the biases of unread channels go too
    assert {n.where for n in notes} == {"conv1", "conv3", "depthwise"}


def test_channels_read_by_a_graph_output_or_a_weight_are_not_unread():
    nodes, arrays = relu_chain([helper.make_node("Relu", ["c1"], ["y"]), conv("conv2", "c1", "z", "w2")])
    arrays["w2"] = weights(2, 8, 1, 1)
    arrays["w2"][:, :4] = 0  # conv2 ignores c1's first four channels, but they are a graph output too
    arrays["w1"][:, 5:7] = 0  # nobody reads conv0's channel 5 ...
    arrays["w1"][3, 6] = 0.5  # ... while one weight is enough to keep channel 6
    model = make_model(nodes, arrays, [("x", [1, 3, 4, 4])], [("y", [1, 8, 4, 4]), ("z", [1, 2, 4, 4])])
    masks = unread_outputs(model)
    assert not masks["w1"][0].any()
    assert np.flatnonzero(masks["w0"][0]).tolist() == [5]


def test_unread_outputs_leave_excluded_layers_alone():
    nodes, arrays = relu_chain([conv("conv2", "c1", "y", "w2")])
    arrays["w2"] = weights(2, 8, 1, 1)
    arrays["w2"][:, 3] = 0
    model = make_model(nodes, arrays, [("x", [1, 3, 4, 4])], [("y", [1, 2, 4, 4])])
    assert np.flatnonzero(unread_outputs(model)["w1"][0]).tolist() == [3]
    assert "w1" not in unread_outputs(model, exclude=("conv1",))
