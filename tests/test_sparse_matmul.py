"""ai.onnxshrink::SparseMatMul against a numpy reference, in every format, dispatched and forced portable.

The reference decodes each format's arrays back to a dense W on its own (it shares no code with the
packers in passes/lower.py or with the kernels) and computes A @ W + bias in float64. The op must
match it within 1e-4 relative to the output's largest magnitude, for odd shapes, M = 1 and large M.
Bad inputs must raise an onnxruntime error naming the input, and leave the session usable.
"""

import os

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import assert_cases_pass_forced_portable, assert_cases_pass_under, cpu_flags, library_isa
from onnxshrink import ops
import onnxshrink.passes.lower as lower  # registers the pass; holds the packers

needs_lib = pytest.mark.skipif(not ops.has_library() and os.environ.get("CI", "").lower() != "true",
                               reason="built with ONNXSHRINK_NO_KERNELS=1")
RTOL = 1e-4  # the op's accuracy contract, relative to max |reference|


# ---------------------------------------------------------------- numpy reference


def dense_from_format(fmt, k, n, values, indices, offsets=None, block_k=1, block_n=1):
    """W[K, N] (float64) that the format's arrays describe."""
    w = np.zeros((k, n))
    if fmt == "csr":
        columns = np.repeat(np.arange(n), np.diff(offsets))
        np.add.at(w, (indices.astype(np.int64), columns), values)
    elif fmt == "2:4":
        groups = values.shape[1]
        for g in range(groups):
            word = indices[:, g // 4].astype(np.int64) >> (4 * (g % 4))
            for slot, pos in enumerate((word & 3, (word >> 2) & 3)):
                rows = 4 * g + pos
                inside = rows < k
                np.add.at(w, (rows[inside], np.arange(n)[inside]), values[inside, g, slot])
    elif fmt == "blocked":
        strips = -(-n // block_n)
        padded = np.zeros((-(-k // block_k) * block_k, strips * block_n))
        for s in range(strips):
            for t in range(offsets[s], offsets[s + 1]):
                k0 = int(indices[t]) * block_k
                padded[k0:k0 + block_k, s * block_n:(s + 1) * block_n] += values[t]
        w = padded[:k, :n]
    return w


def sparse_reference(a, w, bias=None):
    y = a.astype(np.float64) @ w
    return y + bias if bias is not None else y


def assert_close(y, ref, what=""):
    scale = float(np.abs(ref).max()) or 1.0
    np.testing.assert_allclose(y, ref, rtol=RTOL, atol=RTOL * scale, err_msg=what)


# ---------------------------------------------------------------- building cases


def sparse_weight(rng, k, n, sparsity, pattern="unstructured", block=(1, 8)):
    w = rng.standard_normal((k, n)).astype(np.float32)
    if pattern == "unstructured":
        w[rng.random((k, n)) < sparsity] = 0
    elif pattern == "2:4":
        groups = -(-k // 4)
        keep = np.zeros((groups * 4, n), bool)
        for g in range(groups):
            chosen = np.argsort(rng.random((4, n)), axis=0)[:rng.integers(0, 3), :]  # 0, 1 or 2 kept
            np.put_along_axis(keep[4 * g:4 * g + 4], chosen, True, axis=0)
        w *= keep[:k]
    else:  # blocked
        bk, bn = block
        kb, nb = -(-k // bk), -(-n // bn)
        keep = np.repeat(np.repeat(rng.random((kb, nb)) > sparsity, bk, axis=0), bn, axis=1)[:k, :n]
        w *= keep
    return w


def arrays_for(fmt, w, block=(1, 8)):
    """(initializer dict, input names after A, attributes) of the op for W."""
    if fmt == "csr":
        values, indices, offsets = lower.csr_arrays(w)
        return {"values": values, "indices": indices, "offsets": offsets}, ["values", "indices", "offsets"], {}
    if fmt == "2:4":
        values, meta = lower.two_four_arrays(w)
        return {"values": values, "indices": meta}, ["values", "indices", ""], {}
    values, indices, offsets = lower.blocked_arrays(w, *block)
    return ({"values": values, "indices": indices, "offsets": offsets}, ["values", "indices", "offsets"],
            {"block_k": block[0], "block_n": block[1]})


def sparse_model(k, n, fmt, inits, names, attrs, bias=None, as_inputs=()):
    """A = graph input; the sparse structure as initializers (or graph inputs for names in as_inputs)."""
    graph_inputs = [helper.make_tensor_value_info("A", TensorProto.FLOAT, None)]
    initializers = []
    for name, value in inits.items():
        if name in as_inputs:
            dtype = helper.np_dtype_to_tensor_dtype(value.dtype)
            graph_inputs.append(helper.make_tensor_value_info(name, dtype, None))
        else:
            initializers.append(numpy_helper.from_array(value, name))
    node_inputs = ["A", *names]
    if bias is not None:
        initializers.append(numpy_helper.from_array(bias, "bias"))
        node_inputs.append("bias")
    node = helper.make_node("SparseMatMul", node_inputs, ["Y"], domain=ops.DOMAIN, name="sparse", K=k, N=n,
                            format=fmt, **attrs)
    graph = helper.make_graph([node], "spmm", graph_inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ops.DOMAIN, 1)])


# (format, K, N, M or A's leading shape, sparsity, block)
CASES = [
    ("csr", 37, 29, (1,), 0.7, None),
    ("csr", 64, 48, (5,), 0.9, None),
    ("csr", 300, 257, (2, 33), 0.5, None),
    ("csr", 768, 768, (64,), 0.9, None),
    ("csr", 5, 3, (17,), 0.3, None),
    ("csr", 1000, 130, (3,), 0.95, None),
    ("2:4", 37, 29, (1,), 0.5, None),
    ("2:4", 130, 67, (7,), 0.5, None),
    ("2:4", 768, 256, (64,), 0.5, None),
    ("2:4", 66, 9, (2, 2), 0.5, None),
    ("blocked", 37, 29, (1,), 0.7, (1, 8)),
    ("blocked", 130, 67, (9,), 0.8, (4, 8)),
    ("blocked", 300, 100, (2,), 0.6, (1, 16)),
    ("blocked", 64, 70, (33,), 0.5, (3, 5)),
    ("blocked", 770, 256, (64,), 0.9, (4, 4)),
]


def _case(fmt, k, n, lead, sparsity, block, seed=0, bias=True):
    rng = np.random.default_rng(seed)
    w = sparse_weight(rng, k, n, sparsity, fmt if fmt != "csr" else "unstructured", block or (1, 8))
    inits, names, attrs = arrays_for(fmt, w, block or (1, 8))
    b = rng.standard_normal(n).astype(np.float32) if bias else None
    a = rng.standard_normal((*lead, k)).astype(np.float32)
    return sparse_model(k, n, fmt, inits, names, attrs, b), a, sparse_reference(a, w.astype(np.float64), b)


def _check_cases():
    for case in CASES:
        for threads in (1, 2):
            model, a, ref = _case(*case)
            (y,) = ops.session(model, intra_op_num_threads=threads).run(None, {"A": a})
            assert y.shape == ref.shape and y.dtype == np.float32
            assert_close(y, ref, f"{case} threads={threads}")


def _isa():
    return library_isa("OnnxShrinkSparseMatMulIsa")


# ---------------------------------------------------------------- formats (pure numpy)


@pytest.mark.parametrize("k,n,sparsity", [(37, 29, 0.7), (1, 1, 0.0), (64, 3, 1.0), (130, 67, 0.9)])
def test_csr_arrays_roundtrip(k, n, sparsity):
    w = sparse_weight(np.random.default_rng(k), k, n, sparsity)
    values, indices, offsets = lower.csr_arrays(w)
    assert values.dtype == np.float32 and indices.dtype == np.uint16 and offsets.dtype == np.int32
    assert offsets[0] == 0 and offsets[-1] == np.count_nonzero(w) == values.size
    np.testing.assert_array_equal(dense_from_format("csr", k, n, values, indices, offsets), w)


@pytest.mark.parametrize("k,n", [(37, 29), (4, 1), (66, 9), (130, 67)])
def test_two_four_arrays_roundtrip(k, n):
    w = sparse_weight(np.random.default_rng(k), k, n, 0.5, "2:4")
    assert lower.two_four_fits(w)
    values, meta = lower.two_four_arrays(w)
    groups = -(-k // 4)
    assert values.shape == (n, groups, 2) and meta.shape == (n, -(-groups // 4)) and meta.dtype == np.uint16
    np.testing.assert_array_equal(dense_from_format("2:4", k, n, values, meta), w)
    # every stored position lies inside K (the op checks the last group)
    for g in range(groups):
        word = meta[:, g // 4].astype(int) >> (4 * (g % 4))
        assert (4 * g + (word & 3) < k).all() and (4 * g + ((word >> 2) & 3) < k).all()


def test_two_four_rejects_three_nonzeros():
    w = np.zeros((8, 2), np.float32)
    w[:3, 0] = 1
    assert not lower.two_four_fits(w)
    with pytest.raises(ValueError, match="more than 2"):
        lower.two_four_arrays(w)


@pytest.mark.parametrize("block", [(1, 8), (4, 8), (3, 5), (4, 4)])
def test_blocked_arrays_roundtrip(block):
    k, n = 37, 29
    w = sparse_weight(np.random.default_rng(1), k, n, 0.7, "blocked", block)
    values, indices, offsets = lower.blocked_arrays(w, *block)
    assert values.shape[1:] == block and offsets.size == -(-n // block[1]) + 1
    np.testing.assert_array_equal(dense_from_format("blocked", k, n, values, indices, offsets, *block), w)
    assert lower.blocked_fill(w, *block) >= 1.0


# ---------------------------------------------------------------- the op


@needs_lib
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}x{c[2]}-m{'x'.join(map(str, c[3]))}" for c in CASES])
def test_op_matches_reference(case):
    model, a, ref = _case(*case)
    for threads in (1, 2):
        (y,) = ops.session(model, intra_op_num_threads=threads).run(None, {"A": a})
        assert y.shape == ref.shape and y.dtype == np.float32
        assert_close(y, ref, f"threads={threads}")


@needs_lib
def test_op_without_bias_and_empty_rows():
    model, a, ref = _case("csr", 40, 12, (0,), 0.8, None, bias=False)
    (y,) = ops.session(model).run(None, {"A": a})
    assert y.shape == (0, 12)
    w = np.zeros((40, 12), np.float32)
    w[3, 5] = 2.0  # one nonzero: most columns are empty
    inits, names, attrs = arrays_for("csr", w)
    a = np.random.default_rng(0).standard_normal((6, 40)).astype(np.float32)
    (y,) = ops.session(sparse_model(40, 12, "csr", inits, names, attrs)).run(None, {"A": a})
    assert_close(y, sparse_reference(a, w.astype(np.float64)))


@needs_lib
def test_op_matches_reference_forced_portable(tmp_path):
    assert_cases_pass_forced_portable("test_sparse_matmul", "_isa", tmp_path)


@needs_lib
def test_op_matches_reference_capped_at_avx2(tmp_path):
    """On an AVX-512 machine the AVX2 kernels are otherwise never run: ONNXSHRINK_MAX_ISA=avx2 runs them."""
    if not {"avx2", "fma"} <= cpu_flags():
        pytest.skip("this CPU has no AVX2/FMA")
    assert_cases_pass_under("test_sparse_matmul", "_isa", tmp_path, {"ONNXSHRINK_MAX_ISA": "avx2"}, "avx2")


@needs_lib
def test_dispatch_follows_the_cpu(monkeypatch):
    monkeypatch.delenv("ONNXSHRINK_FORCE_PORTABLE", raising=False)
    monkeypatch.delenv("ONNXSHRINK_MAX_ISA", raising=False)
    flags = cpu_flags()
    isa = _isa()
    if {"avx512f", "avx512bw", "avx512vl", "fma"} <= flags:
        assert isa == "avx512"
    elif {"avx2", "fma"} <= flags:
        assert isa == "avx2"  # AVX-512 is compiled in but must not be chosen without the CPU flags
    elif flags:
        assert isa == "portable"
    monkeypatch.setenv("ONNXSHRINK_MAX_ISA", "avx2")
    if flags:  # /proc/cpuinfo read: the cap leaves AVX2 where the CPU has it
        assert _isa() == ("avx2" if {"avx2", "fma"} <= flags else "portable")
    monkeypatch.setenv("ONNXSHRINK_MAX_ISA", "portable")
    assert _isa() == "portable"
    monkeypatch.delenv("ONNXSHRINK_MAX_ISA")
    monkeypatch.setenv("ONNXSHRINK_FORCE_PORTABLE", "1")
    assert _isa() == "portable"


@needs_lib
@pytest.mark.realmodel
def test_op_on_real_weights(minilm_path):
    """MiniLM's FFN weights, magnitude-pruned to 90% (csr) and to 2:4, on real-scale activations."""
    import onnx

    model = onnx.load(str(minilm_path))
    weights = [numpy_helper.to_array(t) for t in model.graph.initializer if len(t.dims) == 2 and 0 not in t.dims]
    ffn = [w for w in weights if w.shape in ((384, 1536), (1536, 384))][:2]
    assert len(ffn) == 2
    rng = np.random.default_rng(0)
    for w in ffn:
        pruned = w * (np.abs(w) >= np.quantile(np.abs(w), 0.9))
        groups = np.abs(w).reshape(-1, 4, w.shape[1])
        keep = np.argsort(-groups, axis=1, kind="stable")[:, :2, :]
        two_four = np.zeros_like(groups)
        np.put_along_axis(two_four, keep, np.take_along_axis(w.reshape(-1, 4, w.shape[1]), keep, axis=1), axis=1)
        for fmt, sparse in (("csr", pruned), ("2:4", two_four.reshape(w.shape))):
            inits, names, attrs = arrays_for(fmt, sparse.astype(np.float32))
            a = rng.standard_normal((1, 32, w.shape[0])).astype(np.float32)  # batch 1, 32 tokens
            (y,) = ops.session(sparse_model(*w.shape, fmt, inits, names, attrs)).run(None, {"A": a})
            assert_close(y, sparse_reference(a, sparse.astype(np.float64)), fmt)
            (y1,) = ops.session(sparse_model(*w.shape, fmt, inits, names, attrs)).run(None, {"A": a[:, :1]})
            assert_close(y1, sparse_reference(a[:, :1], sparse.astype(np.float64)), f"{fmt} M=1")


# ---------------------------------------------------------------- bad input


def _bad_case(fmt="csr"):
    rng = np.random.default_rng(3)
    k, n = 21, 10
    w = sparse_weight(rng, k, n, 0.5, "unstructured" if fmt != "2:4" else "2:4")
    inits, names, attrs = arrays_for(fmt, w)
    return k, n, w, inits, names, attrs


@needs_lib
@pytest.mark.parametrize(
    "fmt,mutate,needle",
    [
        ("csr", lambda f: f.update(A=f["A"][:, :-1]), "'A'"),
        ("csr", lambda f: f.update(values=f["values"][:-1]), "values"),
        ("csr", lambda f: f.update(indices=np.full_like(f["indices"], 21)), "indices"),
        ("csr", lambda f: f.update(offsets=f["offsets"][::-1].copy()), "offsets"),
        ("csr", lambda f: f.update(offsets=f["offsets"][:-1]), "offsets"),
        ("2:4", lambda f: f.update(indices=np.full_like(f["indices"], 0xFFFF)), "past K"),
        ("2:4", lambda f: f.update(values=f["values"][:, :-1]), "values"),
    ],
)
def test_bad_input_raises_and_process_survives(fmt, mutate, needle):
    import onnxruntime as ort

    k, n, w, inits, names, attrs = _bad_case(fmt)
    as_inputs = [name for name in inits]  # structure fed at run time: checked on every call
    sess = ops.session(sparse_model(k, n, fmt, inits, names, attrs, as_inputs=as_inputs))
    a = np.random.default_rng(0).standard_normal((3, k)).astype(np.float32)
    feed = {"A": a, **inits}
    bad = dict(feed)
    mutate(bad)
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument) as exc:
        sess.run(None, bad)
    assert "SparseMatMul 'sparse'" in str(exc.value) and needle in str(exc.value)
    (y,) = sess.run(None, feed)  # still usable afterwards
    assert_close(y, sparse_reference(a, w.astype(np.float64)))


@needs_lib
def test_bad_constant_structure_raises_on_every_run():
    import onnxruntime as ort

    k, n, w, inits, names, attrs = _bad_case("csr")
    inits["indices"] = inits["indices"].copy()
    inits["indices"][-1] = k  # one index past K, in an initializer
    sess = ops.session(sparse_model(k, n, "csr", inits, names, attrs))
    a = np.ones((1, k), np.float32)
    for _ in range(2):  # the constant is checked once, and the verdict is not cached as good
        with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument, match="indices"):
            sess.run(None, {"A": a})


@needs_lib
def test_wrong_dtype_and_bad_attributes_raise():
    import onnxruntime as ort

    k, n, w, inits, names, attrs = _bad_case("csr")
    sess = ops.session(sparse_model(k, n, "csr", inits, names, attrs))
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument):
        sess.run(None, {"A": np.ones((1, k), np.float64)})
    bad_format = sparse_model(k, n, "coo", inits, names, attrs)
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument, match="format"):
        ops.session(bad_format).run(None, {"A": np.ones((1, k), np.float32)})
    bad_block = sparse_model(k, n, "blocked", inits, names, {"block_k": 0, "block_n": 8})
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument, match="block_k"):
        ops.session(bad_block).run(None, {"A": np.ones((1, k), np.float32)})
    node = sparse_model(k, n, "csr", inits, names, attrs)
    node.graph.node[0].input.append("extra_bias")
    node.graph.initializer.append(numpy_helper.from_array(np.ones(n + 1, np.float32), "extra_bias"))
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument, match="bias"):
        ops.session(node).run(None, {"A": np.ones((1, k), np.float32)})
