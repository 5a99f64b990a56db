"""quantize-weights: every form and width against numpy's dequantized weights, the skips and
refusals, GPTQ against rtn, and the real MiniLM and digits models.

Margins: a quantized model must reproduce x @ dequantized(W) to 1e-5 of the output's largest
magnitude (MatMulNBits at accuracy_level=0, graph optimizations off so that onnxruntime does not
fuse DequantizeLinear into its int8-activation kernel). MiniLM, 4-bit block 32, 48 calibration
sentences, measured sentence_embedding cosine on 16 held-out sentences: rtn 0.9751, GPTQ with the
defaults (act_order, damping 0.1) 0.9896, GPTQ as the paper has it (index order, damping 0.01)
0.9870; on the calibration sentences 0.973, 0.997 and 0.997. MatMul weights: 0.156 of float32.
The held-out bounds sit about 0.0015 under the measured figures: damping 0.01 with act order
(0.9867) or the paper's settings fail them; act order alone is worth less than that margin on
MiniLM (0.9888 without it) and is pinned instead by the unit tests against a plain GPTQ.
"""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import inputs
import onnxshrink
from onnxshrink import OnnxShrinkError, UsageError, ops
from onnxshrink.pass_base import PassContext
from onnxshrink.passes.quantize_weights import gptq, hessian_factor, nbits_runs, rtn
from onnxshrink.runtime import make_session

K, N, N2 = 80, 48, 24  # K is no multiple of the block: the last block is padded
needs_lib = pytest.mark.skipif(not ops.has_library(), reason="built with ONNXSHRINK_NO_KERNELS=1")


def two_layer_model(seed=0, opset=17):
    """x[2, b, K] -> MatMul W1[K, N] -> Relu -> Gemm(transB=1) W2[N2, N] + c -> y (a rank-3 MatMul input, a Gemm bias)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((K, N)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((N2, N)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.standard_normal(N2).astype(np.float32), "c"),
             numpy_helper.from_array(np.array([-1, N], np.int64), "flat")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm"),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Reshape", ["r", "flat"], ["r2"]),
             helper.make_node("Gemm", ["r2", "w2", "c"], ["y"], name="gemm", transB=1)]
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, "b", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", N2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def weights(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def quantize(model, spec, feeds):
    result = onnxshrink.compress(model, spec, calibration=feeds, samples=min(len(feeds), 8))
    (record,) = result.report.passes
    assert record.status == "applied", record.message
    onnx.checker.check_model(result.model, full_check=True)
    return result.model, record


def run_exact(model, feed):
    return make_session(model, optimization="none").run(None, feed)[0]


X = {"x": np.random.default_rng(1).standard_normal((2, 3, K)).astype(np.float32)}
FORMS = [(form, bits) for form in ("nbits", "dql", "library") for bits in (2, 3, 4, 8)
         if not (form == "nbits" and not nbits_runs(bits, 32))]


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("form,bits", FORMS)
def test_form_computes_the_dequantized_weights(form, bits, symmetric):
    if form == "library" and not ops.has_library():
        pytest.skip("built with ONNXSHRINK_NO_KERNELS=1")
    model = two_layer_model()
    spec = (f"quantize-weights(bits={bits},form={form},symmetric={str(symmetric).lower()},"
            "min_elements=0,accuracy_level=0)")
    quantized, record = quantize(model, spec, [X])
    w = weights(model)
    w1 = rtn(w["w1"].astype(np.float64), bits, 32, symmetric).dequantize()
    w2 = rtn(w["w2"].T.astype(np.float64), bits, 32, symmetric).dequantize()
    hidden = np.maximum(X["x"].astype(np.float64) @ w1, 0).reshape(-1, N)
    want = hidden @ w2 + w["c"]
    got = run_exact(quantized, X)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    assert not {"w1", "w2"} & set(weights(quantized))  # the float weights are gone
    assert [n.message.split(":")[0] for n in record.notes] == [f"{bits}-bit rtn, block 32, {form}"] * 2
    # The rounding itself: relative weight error of a Gaussian matrix at this width.
    error = np.linalg.norm(w1 - w["w1"]) / np.linalg.norm(w["w1"])
    assert error < {2: 0.45, 3: 0.22, 4: 0.11, 8: 0.008}[bits]


@pytest.mark.parametrize("form,per_weight", [("nbits", 0.5 + 4 / 32), ("dql", 0.5 + 4 / 32), ("library", 3 / 8 + 4 / 32)])
def test_weights_are_stored_packed(form, per_weight):
    if form == "library" and not ops.has_library():
        pytest.skip("built with ONNXSHRINK_NO_KERNELS=1")
    bits = 3 if form == "library" else 4
    rng = np.random.default_rng(2)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 128])],
                              [numpy_helper.from_array(rng.standard_normal((256, 128)).astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    quantized, record = quantize(model, f"quantize-weights(bits={bits},form={form})",
                                 [{"x": rng.standard_normal((4, 256)).astype(np.float32)}])
    stored = sum(len(t.raw_data) or numpy_helper.to_array(t).nbytes for t in quantized.graph.initializer)
    assert stored == 256 * 128 * per_weight
    assert record.notes[0].message.endswith(f"{256 * 128 * 4} -> {stored} B")
    assert quantized.ByteSize() < model.ByteSize() * (per_weight / 4 + 0.02)


def test_auto_picks_nbits_then_library_then_dql():
    model = two_layer_model()
    picks = {}
    for bits in (3, 4, 6):
        quantized, record = quantize(model, f"quantize-weights(bits={bits},min_elements=0)", [X])
        picks[bits] = record.notes[0].message.split(", ")[-1].split(":")[0]
    assert picks[4] == "nbits" and picks[6] == "dql"
    assert picks[3] == ("library" if ops.has_library() else "dql")


def test_dql_upgrades_the_opset_and_ir():
    quantized, _ = quantize(two_layer_model(opset=17), "quantize-weights(form=dql,min_elements=0)", [X])
    assert quantized.opset_import[0].version == 21 and quantized.ir_version >= 10
    dql = [n for n in quantized.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dql) == 2 and {t.data_type for t in quantized.graph.initializer} >= {TensorProto.INT4}


def test_dql_conversion_failure_is_one_line(monkeypatch):
    import onnx.version_converter

    def fail(model, version):
        raise RuntimeError("No Adapter For Foo\nmore detail")

    monkeypatch.setattr(onnx.version_converter, "convert_version", fail)
    with pytest.raises(OnnxShrinkError, match=r"^quantize-weights form=dql needs opset 21; converting this "
                                              r"opset-17 model failed: No Adapter For Foo$"):
        onnxshrink.compress(two_layer_model(), "quantize-weights(form=dql,min_elements=0)", calibration=[X])
    # auto only falls back to dql where nbits cannot serve: those weights stay float, the rest go on
    result = onnxshrink.compress(two_layer_model(), "quantize-weights(bits=6,min_elements=0)", calibration=[X])
    assert all("converting this opset-17 model failed" in n.message for n in result.report.passes[0].notes)


@pytest.mark.parametrize("values,needle", [
    ({"bits": 1}, "bits"), ({"bits": 9}, "bits"), ({"block": 48}, "block"), ({"method": "awq"}, "method"),
    ({"form": "int4"}, "form"), ({"accuracy_level": 5}, "accuracy_level"), ({"min_elements": -1}, "min_elements"),
    ({"damping": 0}, "damping"), ({"act_order": "maybe"}, "act_order"),
    ({"group": 32}, "unknown option 'group'"),
])
def test_option_errors(values, needle):
    with pytest.raises(UsageError, match=needle):
        onnxshrink.get_pass("quantize-weights")(**values)


def test_nbits_refuses_widths_the_runtime_lacks():
    missing = [b for b in range(2, 9) if not nbits_runs(b, 32)]
    assert missing, "this onnxruntime's MatMulNBits takes every width 2..8: widen the test"
    # onnxruntime 1.32's CPU kernel takes 2, 4 and 8 bits
    with pytest.raises(UsageError, match=rf"takes bits .*not {missing[0]}; use form=library or form=dql"):
        onnxshrink.compress(two_layer_model(), f"quantize-weights(bits={missing[0]},form=nbits)", calibration=[X])


def skip_model():
    """Weights that must stay float, next to one shared by two MatMuls."""
    rng = np.random.default_rng(3)
    big = lambda name, shape: numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)  # noqa: E731
    inner = helper.make_graph([helper.make_node("MatMul", ["x", "w_sub"], ["t"], name="sub_mm")], "then", [],
                              [helper.make_tensor_value_info("t", TensorProto.FLOAT, [64, 64])])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, [64, 64])])
    nodes = [
        helper.make_node("MatMul", ["x", "w_shared"], ["a"], name="shared1"),
        helper.make_node("MatMul", ["x", "w_shared"], ["b"], name="shared2"),
        helper.make_node("MatMul", ["x", "w_tiny"], ["c"], name="tiny"),
        helper.make_node("MatMul", ["x", "w_also_added"], ["d"], name="also_added"),
        helper.make_node("Add", ["d", "w_also_added"], ["d2"]),
        helper.make_node("Gemm", ["x", "w_alpha"], ["f"], name="alpha", alpha=2.0),
        helper.make_node("Transpose", ["b"], ["b_t"]),
        helper.make_node("MatMul", ["a", "b_t"], ["g"], name="activations"),
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["h"], then_branch=inner, else_branch=other),
    ]
    outputs = ["a", "b", "c", "d2", "f", "g", "h"]
    graph = helper.make_graph(nodes, "skips", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 64])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, [64, 4 if o == "c" else 64]) for o in outputs],
                              [big("w_shared", (64, 64)), big("w_tiny", (64, 4)), big("w_also_added", (64, 64)),
                               big("w_alpha", (64, 64)), big("w_sub", (64, 64)),
                               numpy_helper.from_array(np.array(0, np.float32), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def test_skips_are_noted_and_the_rest_quantized():
    model = skip_model()
    feed = {"x": np.random.default_rng(4).standard_normal((64, 64)).astype(np.float32)}
    result = onnxshrink.compress(model, "quantize-weights(form=nbits,min_elements=1024)", calibration=[feed])
    (record,) = result.report.passes
    assert record.status == "applied", record.message
    notes = {n.where: n.message for n in record.notes}
    assert notes["shared1"].endswith("(shared by 2 nodes)") and "nbits" in notes["shared1"]
    assert notes["tiny"] == "kept float: 256 elements < min_elements 1024"
    assert notes["also_added"].startswith("kept float: weight 'w_also_added' is also read by Add")
    assert notes["alpha"].startswith("kept float: MatMulNBits cannot express Gemm alpha")
    assert notes["activations"] == "kept float: B is computed, not a constant weight"
    assert notes["sub_mm"] == "kept float: in a subgraph (If/Loop/Scan body)"
    ops_after = [n.op_type for n in result.model.graph.node]
    assert ops_after.count("MatMulNBits") == 2
    assert {"w_tiny", "w_also_added", "w_alpha", "w_sub"} <= set(weights(result.model))
    assert "w_shared" not in weights(result.model)
    # in auto, the Gemm nbits cannot express goes through DequantizeLinear instead
    auto = onnxshrink.compress(model, "quantize-weights(min_elements=1024)", calibration=[feed])
    assert "dql" in {n.where: n.message for n in auto.report.passes[0].notes}["alpha"]
    assert auto.report.passes[0].fidelity["cosine"] > 0.99


def test_include_and_exclude_select_nodes():
    model = two_layer_model()
    _, record = quantize(model, "quantize-weights(min_elements=0,include=[Gemm])", [X])
    assert [n.where for n in record.notes] == ["gemm"]
    _, record = quantize(model, "quantize-weights(min_elements=0,exclude=[gemm])", [X])
    assert [n.where for n in record.notes] == ["mm"]


def test_refuses_quantized_and_float16_weights():
    model = two_layer_model()
    quantized, _ = quantize(model, "quantize-weights(min_elements=0)", [X])
    with pytest.raises(OnnxShrinkError, match="weights are quantized already .*run it on the float model"):
        onnxshrink.compress(quantized, "quantize-weights(min_elements=0)", calibration=[X])
    half = onnxshrink.compress(model, "fp16", calibration=[X]).model
    with pytest.raises(OnnxShrinkError, match="weights are float16; run quantize-weights before fp16"):
        onnxshrink.compress(half, "quantize-weights(min_elements=0)", calibration=[X])


def test_gptq_without_data_is_refused():
    step = onnxshrink.get_pass("quantize-weights")(method="gptq", min_elements=0)
    with pytest.raises(OnnxShrinkError, match="method=gptq needs calibration data"):
        step.apply(two_layer_model(), PassContext())
    assert step.needs_data and not onnxshrink.get_pass("quantize-weights")().needs_data


def correlated_inputs(count, seed):
    """Inputs on a 6-dimensional subspace of R^64 plus a little noise: what makes GPTQ pay off."""
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(0).standard_normal((6, 64))
    return [{"x": (rng.standard_normal((16, 6)) @ basis + 0.05 * rng.standard_normal((16, 64))).astype(np.float32)}
            for _ in range(count)]


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_beats_rtn_on_correlated_inputs(act_order):
    rng = np.random.default_rng(5)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, 32])],
                              [numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    calibration, held_out = correlated_inputs(32, 6), correlated_inputs(16, 7)
    errors = {}
    for method in ("rtn", "gptq"):
        spec = f"quantize-weights(bits=3,form=dql,method={method},min_elements=0,act_order={str(act_order).lower()})"
        quantized, _ = quantize(model, spec, calibration)
        errors[method] = np.mean([np.mean((run_exact(quantized, f) - run_exact(model, f)) ** 2) for f in held_out])
    assert errors["gptq"] <= 0.25 * errors["rtn"], errors  # measured: 0.05 (act_order), 0.09


def test_gptq_zeroes_dead_inputs_and_matches_rtn_without_correlation():
    rng = np.random.default_rng(8)
    w = rng.standard_normal((64, 16))
    h = np.eye(64)
    h[5, 5] = 0.0  # an input that never fires
    q = gptq(w, hessian_factor(h), 4, 32, True)
    assert np.all(q.dequantize()[5] == 0)
    # With H diagonal there is nothing to compensate: GPTQ is plain rounding (up to the dead row).
    plain = rtn(np.where(np.arange(64)[:, None] == 5, 0.0, w), 4, 32, True)
    assert np.array_equal(q.codes, plain.codes) and np.array_equal(q.scales, plain.scales)


@pytest.mark.parametrize("symmetric", [True, False])
def test_act_order_keeps_blocks_contiguous(symmetric):
    """A diagonal H of varied sizes reorders the rows but has nothing to compensate: the codes
    must come back to their own rows and blocks, i.e. equal rtn's (static scales are rtn's)."""
    rng = np.random.default_rng(9)
    w = rng.standard_normal((K, 16))
    factor = hessian_factor(np.diag(rng.uniform(0.1, 10, K)))
    assert not np.array_equal(factor.order, np.arange(K))
    q, plain = gptq(w, factor, 3, 32, symmetric), rtn(w, 3, 32, symmetric)
    assert np.array_equal(q.codes, plain.codes) and np.array_equal(q.scales, plain.scales)
    if not symmetric:
        assert np.array_equal(q.zero_points, plain.zero_points)


def reference_gptq(w, hessian, bits, block, damping):
    """GPTQ as plainly as it can be written: every update applied at once, in act order, scales
    from W; the damping added as hessian_factor adds it."""
    k = len(w)
    h = np.array(hessian, np.float64)
    order = np.argsort(-np.diag(h), kind="stable")
    h = h[np.ix_(order, order)] + damping * np.mean(np.diag(h)) * np.eye(k)
    upper = np.linalg.cholesky(np.linalg.inv(h)).T  # upper U with U^T U = H^-1
    scales = rtn(w, bits, block, True).scales
    half = 1 << (bits - 1)
    work = np.array(w, np.float64)[order]
    codes = np.empty(w.shape, np.uint8)
    for i in range(k):
        s = scales[order[i] // block]
        codes[order[i]] = np.clip(np.rint(work[i] / s.astype(np.float64)) + half, 0, 2 * half - 1)
        error = (work[i] - (codes[order[i]].astype(np.float32) - half) * s) / upper[i, i]
        work[i + 1:] -= np.outer(upper[i, i + 1:], error)
    return codes


def test_lazy_act_order_gptq_matches_the_plain_algorithm():
    """K = 200 crosses a LAZY_ROWS batch and ends in a partial block, so every lazy level and the
    permutation back are exercised."""
    rng = np.random.default_rng(10)
    k = 200
    x = rng.standard_normal((400, 12)) @ rng.standard_normal((12, k)) + 0.3 * rng.standard_normal((400, k))
    x[:, 17] *= 6  # an input the order puts first
    h = x.T @ x
    w = rng.standard_normal((k, 24))
    q = gptq(w, hessian_factor(h), 4, 32, True)
    assert np.array_equal(q.codes, reference_gptq(w, h, 4, 32, 0.1))
    assert np.array_equal(q.scales, rtn(w, 4, 32, True).scales)


# ---------------------------------------------------------------- real models

MINILM_CALIBRATION, MINILM_HELD_OUT = 48, 16


@pytest.fixture(scope="module")
def minilm_results(minilm_path):
    feeds = inputs.minilm_inputs(MINILM_CALIBRATION + MINILM_HELD_OUT)
    calibration, held_out = feeds[:MINILM_CALIBRATION], feeds[MINILM_CALIBRATION:]
    original = onnx.load(str(minilm_path))
    reference = make_session(original)
    expected = np.concatenate([reference.run(["sentence_embedding"], f)[0] for f in held_out])
    results = {}
    for method, extra in (("rtn", ""), ("gptq", ""), ("gptq_paper", ",act_order=false,damping=0.01")):
        result = onnxshrink.compress(minilm_path, f"quantize-weights(bits=4,method={method[:4]}{extra})",
                                     calibration=calibration, samples=16)
        (record,) = result.report.passes
        assert record.status == "applied", record.message
        session = make_session(result.model)
        got = np.concatenate([session.run(["sentence_embedding"], f)[0] for f in held_out])
        cosines = np.sum(got * expected, 1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
        results[method] = (result.model, record, float(cosines.mean()))
    return original, results


def matmul_weight_bytes(model):
    init = {t.name: t for t in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in init:
            total += numpy_helper.to_array(init[node.input[1]]).nbytes
        elif node.op_type == "MatMulNBits":
            total += sum(numpy_helper.to_array(init[name]).nbytes for name in node.input[1:4] if name)
    return total


@pytest.mark.realmodel
def test_minilm_4bit_rtn_and_gptq(minilm_results):
    original, results = minilm_results
    rtn_model, rtn_record, rtn_cosine = results["rtn"]
    gptq_model, gptq_record, gptq_cosine = results["gptq"]
    for model in (rtn_model, gptq_model):
        assert [n.op_type for n in model.graph.node].count("MatMulNBits") == 36
        assert matmul_weight_bytes(model) <= 0.16 * matmul_weight_bytes(original)
        onnx.checker.check_model(model, full_check=True)
    # on the calibration sentences (the report's figure), GPTQ's fit
    assert gptq_record.per_output["sentence_embedding"]["cosine"] >= 0.99
    # on held-out sentences (measured: rtn 0.9751, gptq 0.9896, index order and damping 0.01 0.9870)
    assert rtn_cosine >= 0.965 and gptq_cosine >= 0.988
    assert gptq_cosine >= rtn_cosine + 0.01
    assert gptq_cosine >= results["gptq_paper"][2] + 0.0015
    assert gptq_record.per_output["sentence_embedding"]["cosine"] > rtn_record.per_output["sentence_embedding"]["cosine"]


@pytest.mark.realmodel
def test_digits_mlp_keeps_its_accuracy(digits_mlp_path):
    import zoo

    X_test, y_test = zoo.digits_test()
    original = onnx.load(str(digits_mlp_path))
    accuracy = lambda m: float(np.mean(make_session(m).run(None, {"input": X_test})[0].argmax(1) == y_test))  # noqa: E731
    base = accuracy(original)
    feeds = inputs.digits_inputs(64, batch_size=8)
    default = onnxshrink.compress(digits_mlp_path, "quantize-weights", calibration=feeds).report.passes[0]
    assert {n.where: n.message for n in default.notes}["fc3"] == "kept float: 1280 elements < min_elements 4096"
    for spec, margin in (("quantize-weights(min_elements=0)", 0.01), ("quantize-weights(min_elements=0,bits=2,method=gptq)", 0.02)):
        result = onnxshrink.compress(digits_mlp_path, spec, calibration=feeds)
        assert [n.op_type for n in result.model.graph.node].count("MatMulNBits") == 3  # fc3 (128x10) too
        assert accuracy(result.model) >= base - margin, spec  # measured: 4-bit +0.004, 2-bit gptq +0.007
