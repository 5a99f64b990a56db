"""reconstruct's network refit: the numpy program it differentiates, its gradients, where it declines,
and what it gives back on the digits MLP."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxshrink
from onnxshrink.passes import network_refit
from helpers import run

RNG = np.random.default_rng(0)


def every_op_model(batch=None):
    """x[b,6] -> Gemm(transB) -> Sigmoid, Tanh, LeakyRelu, Relu mixed by Add/Sub/Mul/Div -> Reshape/Flatten
    -> MatMul -> Softmax: each op the program differentiates, once."""
    w = lambda *shape: RNG.standard_normal(shape).astype(np.float32)
    inits = [numpy_helper.from_array(w(8, 6), "w1"), numpy_helper.from_array(w(8), "b1"),
             numpy_helper.from_array(w(8, 5), "w2"), numpy_helper.from_array(np.abs(w(8)) + 1, "d"),
             numpy_helper.from_array(np.array([0, 2, 4], np.int64), "shape")]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1, alpha=0.7),
             helper.make_node("Sigmoid", ["h"], ["s"]), helper.make_node("Tanh", ["h"], ["t"]),
             helper.make_node("LeakyRelu", ["h"], ["l"], alpha=0.2), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Add", ["s", "t"], ["a"]), helper.make_node("Sub", ["l", "r"], ["u"]),
             helper.make_node("Mul", ["a", "u"], ["m"]), helper.make_node("Div", ["m", "d"], ["q"]),
             helper.make_node("Reshape", ["q", "shape"], ["q3"]), helper.make_node("Flatten", ["q3"], ["f"]),
             helper.make_node("Identity", ["f"], ["g"]),
             helper.make_node("MatMul", ["g", "w2"], ["z"]), helper.make_node("Softmax", ["z"], ["y"], axis=-1)]
    graph = helper.make_graph(nodes, "every_op", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_the_program_computes_what_onnxruntime_computes():
    model = every_op_model()
    x = RNG.standard_normal((7, 6)).astype(np.float32)
    program = network_refit._program(model, {"x": x})
    got = program.forward({"x": x}, {})["y"]
    np.testing.assert_allclose(got, run(model, {"x": x})[0], rtol=1e-5, atol=1e-6)


def test_gradients_match_finite_differences():
    model = every_op_model()
    x = RNG.standard_normal((5, 6)).astype(np.float64)
    program = network_refit._program(model, {"x": x.astype(np.float32)})
    params = {name: program.constants.pop(name).astype(np.float64) for name in ("w1", "b1", "w2")}
    program.constants = {k: (v.astype(np.float64) if v.dtype.kind == "f" else v) for k, v in program.constants.items()}
    probe = RNG.standard_normal((5, 5))  # loss = sum(probe * y): its gradient wrt y is probe

    def loss(values):
        return float(np.sum(probe * program.forward({"x": x}, values)["y"]))

    env = program.forward({"x": x}, params)
    grads = program.backward(env, {"y": probe}, set(params))
    for name, value in params.items():
        numeric = np.zeros_like(value)
        for index in np.ndindex(value.shape):
            step = np.zeros_like(value)
            step[index] = 1e-6
            numeric[index] = (loss({**params, name: value + step}) - loss({**params, name: value - step})) / 2e-6
        np.testing.assert_allclose(grads[name], numeric, rtol=1e-5, atol=1e-8, err_msg=name)


def _refit_notes(model, spec, calibration):
    result = onnxshrink.compress(model, spec, calibration=calibration, samples=1)
    return [n.message for n in result.report.passes[-1].notes if n.where == "(graph)"]


def test_it_declines_ops_it_does_not_differentiate_and_synthesized_data():
    w = numpy_helper.from_array(RNG.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    conv = helper.make_model(helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4, 6, 6])], [w]),
        opset_imports=[helper.make_opsetid("", 13)])
    feeds = [{"x": RNG.standard_normal((4, 3, 8, 8)).astype(np.float32)}]
    notes = _refit_notes(conv, "prune(sparsity=0.5,min_elements=1),reconstruct", feeds)
    assert notes == ["network refit skipped: it does not differentiate Conv at conv; layer-wise fit kept"]

    mlp = every_op_model()
    notes = _refit_notes(mlp, "prune(sparsity=0.5,min_elements=1),reconstruct", None)  # synthesized inputs
    assert notes == ["network refit skipped: it needs real calibration data, not synthesized inputs"]


def test_a_shape_fixed_to_one_batch_size_is_caught_before_training():
    """Reshape to [1, 4]: right for the batch of 1 the model was exported with, impossible for the
    batches the refit runs; it declines instead of training on something else."""
    w = numpy_helper.from_array(RNG.standard_normal((6, 4)).astype(np.float32), "w")
    shape = numpy_helper.from_array(np.array([1, 4], np.int64), "shape")
    model = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"), helper.make_node("Reshape", ["h", "shape"], ["y"])],
        "fixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w, shape]),
        opset_imports=[helper.make_opsetid("", 13)])
    feeds = [{"x": RNG.standard_normal((1, 6)).astype(np.float32)} for _ in range(16)]
    notes = _refit_notes(model, "prune(sparsity=0.5,min_elements=1),reconstruct", feeds)
    assert len(notes) == 1 and notes[0].startswith("network refit skipped: the model does not run on a batch"), notes


@pytest.mark.parametrize("spec, floor", [
    # network=auto vs off on rows 300..539, measured with these 300 calibration rows: 0.9917 vs 0.9750
    # (fp32 0.9917); floor: 2 rows under what was measured
    ("prune(sparsity=0.9,method=obs),reconstruct", 0.983),
    # the clustered codebooks and biases only (439 values): 0.9792 vs 0.9667
    ("prune(sparsity=0.9,method=obs),cluster(bits=4),reconstruct", 0.970),
])
def test_digits_mlp_network_refit_wins_back_accuracy(digits_mlp_path, spec, floor):
    import zoo

    x, labels = zoo.digits_test()
    calibration, test, truth = [{"input": x[:300]}], {"input": x[300:]}, labels[300:]
    model = onnx.load(digits_mlp_path)
    accuracy, notes = {}, {}
    for network in ("auto", "off"):
        result = onnxshrink.compress(model, spec.replace("reconstruct", f"reconstruct(network={network})"),
                                     calibration=calibration, samples=1)
        accuracy[network] = np.mean(run(result.model, test)[0].argmax(1) == truth)
        notes[network] = [n.message for n in result.report.passes[-1].notes if n.where == "(graph)"]
    assert notes["off"] == [] and notes["auto"][0].startswith("network refit of 3 layers"), notes
    assert accuracy["auto"] >= floor and accuracy["auto"] >= accuracy["off"] + 0.008, accuracy  # 2+ rows better


def test_a_program_that_differs_from_onnxruntime_is_not_trained(monkeypatch):
    """The safety net under every op: the program is run against onnxruntime before training."""
    wrong_relu = (lambda x, node: x[0], network_refit._OPS["Relu"][1])  # Relu computed as Identity
    monkeypatch.setitem(network_refit._OPS, "Relu", wrong_relu)
    w1 = numpy_helper.from_array(RNG.standard_normal((6, 16)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(RNG.standard_normal((16, 3)).astype(np.float32), "w2")
    model = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")],
        "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])], [w1, w2]),
        opset_imports=[helper.make_opsetid("", 13)])
    feeds = [{"x": RNG.standard_normal((64, 6)).astype(np.float32)}]
    notes = _refit_notes(model, "prune(sparsity=0.5,min_elements=1),reconstruct", feeds)
    assert notes == ["network refit skipped: its numpy program does not reproduce output 'y' as onnxruntime "
                     "computes it"], notes
