"""ai.onnxshrink::LowBitMatMul against a numpy reference: 2/3/4/8 bits, zero points, codebooks.

The reference unpacks the codes with np.unpackbits (no code shared with onnxshrink.packing or the
kernels), dequantizes them as the op's contract says (integer subtract, one float32 multiply) and
computes A @ W + bias in float64. The op must match within 1e-4 relative to the output's largest
magnitude, for odd K and N (not multiples of the block), M = 1 and M large (the gemv and the gemm
kernels), dispatched and forced portable.
"""

import os

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import assert_cases_pass_forced_portable, assert_cases_pass_under, cpu_flags, library_isa
from onnxshrink import ops
import onnxshrink.passes.lower as lower  # registers the pass; holds lowbit_codes

needs_lib = pytest.mark.skipif(not ops.has_library() and os.environ.get("CI", "").lower() != "true",
                               reason="built with ONNXSHRINK_NO_KERNELS=1")
RTOL = 1e-4


# ---------------------------------------------------------------- numpy reference


def unpack_reference(packed, bits, block, k):
    """codes[K, N] from u8 [N, n_blocks, block*bits/8]: LSB-first inside each block."""
    n, blocks, _ = packed.shape
    stream = np.unpackbits(packed.reshape(n, blocks, -1), axis=2, bitorder="little")  # [N, nb, block*bits]
    weights = 1 << np.arange(bits)
    codes = (stream.reshape(n, blocks, block, bits) * weights).sum(axis=3)  # [N, nb, block]
    return codes.reshape(n, blocks * block)[:, :k].T


def lowbit_weight(packed, bits, block, k, scales=None, zero_points=None, codebook=None):
    codes = unpack_reference(packed, bits, block, k)
    n = codes.shape[1]
    if codebook is not None:
        return codebook[codes] if codebook.ndim == 1 else codebook[np.arange(n)[None, :], codes]
    rows = np.arange(k) // block
    zp = (np.full((k, n), 1 << (bits - 1)) if zero_points is None else zero_points.T[rows]).astype(np.int32)
    return (codes.astype(np.int32) - zp).astype(np.float32) * scales.T[rows]


def int8_reference(a, packed, scales, zero_points, bits, block, k, bias=None):
    """accuracy_level 4: each block of each row of A rounded to int8 (xq = rint(x * (127 / amax)) in
    float32, sx = amax / 127), integer dot products with (code - zp), times scale * sx, float64 sum."""
    n, blocks = packed.shape[0], -(-k // block)
    codes = unpack_reference(packed, bits, block, k).astype(np.int64)
    x = a.reshape(-1, k).astype(np.float32)
    padded = np.zeros((x.shape[0], blocks * block), np.float32)
    padded[:, :k] = x
    padded = padded.reshape(x.shape[0], blocks, block)
    amax = np.abs(padded).max(axis=2)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    xq = np.rint(padded * inv[:, :, None]).astype(np.int64)
    sx = (amax / np.float32(127)).astype(np.float32)
    grid = np.zeros((blocks * block, n), np.int64)
    grid[:k] = codes
    zp = np.full((blocks, n), 1 << (bits - 1)) if zero_points is None else zero_points.T.astype(np.int64)
    sums = np.einsum("mbi,bin->mbn", xq, grid.reshape(blocks, block, n)) - xq.sum(axis=2)[:, :, None] * zp[None]
    y = (sums * (scales.T[None] * sx[:, :, None]).astype(np.float64)).sum(axis=1)
    y = y + bias if bias is not None else y
    return y.reshape(*a.shape[:-1], n)


def with_accuracy_level(model, level):
    model.graph.node[0].attribute.append(helper.make_attribute("accuracy_level", level))
    return model


def assert_close(y, ref, what=""):
    scale = float(np.abs(ref).max()) or 1.0
    np.testing.assert_allclose(y, ref, rtol=RTOL, atol=RTOL * scale, err_msg=what)


# ---------------------------------------------------------------- cases


def lowbit_model(k, n, bits, block, inits, names):
    node = helper.make_node("LowBitMatMul", ["A", *names], ["Y"], domain=ops.DOMAIN, name="lowbit", K=k, N=n, bits=bits,
                            block_size=block)
    graph = helper.make_graph([node], "lowbit", [helper.make_tensor_value_info("A", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, name) for name, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ops.DOMAIN, 1)])


def lowbit_case(k, n, lead, bits, block, mode="linear", seed=0, bias=True):
    """(model, A, reference, W). mode: linear, zp (explicit zero points), codebook, codebook-col."""
    rng = np.random.default_rng(seed)
    blocks = -(-k // block)
    codes = rng.integers(0, 1 << bits, (k, n)).astype(np.uint8)
    packed = lower.lowbit_codes(codes, bits, block)
    inits = {"codes": packed}
    names = ["codes"]
    scales = zero_points = codebook = None
    if mode.startswith("codebook"):
        shape = (1 << bits,) if mode == "codebook" else (n, 1 << bits)
        codebook = rng.standard_normal(shape).astype(np.float32)
        names += ["", ""]
    else:
        scales = ((rng.random((n, blocks)) - 0.3) * 0.1).astype(np.float32)  # some negative, as rtn writes them
        inits["scales"] = scales
        names.append("scales")
        if mode == "zp":
            zero_points = rng.integers(0, 1 << bits, (n, blocks)).astype(np.uint8)
            inits["zero_points"] = zero_points
            names.append("zero_points")
        else:
            names.append("")
    b = None
    if bias:
        b = rng.standard_normal(n).astype(np.float32)
        inits["bias"] = b
    names.append("bias" if bias else "")
    if codebook is not None:
        inits["codebook"] = codebook
        names.append("codebook")
    w = lowbit_weight(packed, bits, block, k, scales, zero_points, codebook).astype(np.float64)
    a = rng.standard_normal((*lead, k)).astype(np.float32)
    ref = a.astype(np.float64) @ w + (b if bias else 0)
    return lowbit_model(k, n, bits, block, inits, names), a, ref


# (K, N, A's leading shape, block): odd K/N; M = 1, a few rows (gemv), many rows (gemm)
SHAPES = [(37, 29, (1,), 16), (64, 48, (3,), 32), (300, 257, (2, 33), 32), (768, 100, (64,), 128), (5, 3, (7,), 16),
          (130, 19, (1, 5), 64)]
MODES = ["linear", "zp", "codebook", "codebook-col"]
CASES = [(bits, shape, mode) for bits in (2, 3, 4, 8) for shape in SHAPES for mode in MODES]


INT8_SHAPES = [(37, 29, (1,), 32), (64, 48, (3,), 32), (300, 257, (2, 2), 64), (768, 100, (5,), 128), (130, 19, (1, 4), 16)]
# The AVX2 int8 kernel works in groups of 8 blocks: whole groups plus a partial one, blocks that
# share a 32-byte load of codes (2-bit 32 and 64, 4-bit 32) or span several (64..256), a block it
# leaves to the portable kernel (96 at 2 and 4 bits), K not a multiple of the block.
INT8_SHAPES += [(1100, 37, (1,), 32), (777, 19, (11,), 32), (640, 23, (2,), 64), (1100, 9, (5,), 128),
                (2100, 7, (3,), 256), (500, 13, (7,), 96)]


def _check_cases():
    for bits, (k, n, lead, block), mode in CASES:
        model, a, ref = lowbit_case(k, n, lead, bits, block, mode)
        (y,) = ops.session(model, intra_op_num_threads=2).run(None, {"A": a})
        assert y.shape == ref.shape and y.dtype == np.float32
        assert_close(y, ref, f"bits={bits} shape={(k, n, lead, block)} mode={mode}")
    _check_int8_cases()


def _check_int8_cases():
    for bits in (2, 3, 4, 8):
        for k, n, lead, block in INT8_SHAPES:
            for mode in ("linear", "zp"):
                model, a, ref = lowbit_case(k, n, lead, bits, block, mode)
                inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
                want = int8_reference(a, inits["codes"], inits["scales"], inits.get("zero_points"), bits, block, k,
                                      inits.get("bias"))
                (y,) = ops.session(with_accuracy_level(model, 4), intra_op_num_threads=2).run(None, {"A": a})
                assert_close(y, want, f"int8 bits={bits} shape={(k, n, lead, block)} mode={mode}")
                # int8 activations stay close to the float32 result (MatMulNBits' level 4 is as close)
                scale = float(np.abs(ref).max())
                assert float(np.abs(y - ref).max()) <= 2e-2 * scale


def _isa():
    return library_isa("OnnxShrinkLowBitMatMulIsa")


# ---------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("k,n,block", [(37, 29, 16), (64, 1, 32), (1, 5, 16), (300, 7, 128)])
def test_lowbit_codes_roundtrip(bits, k, n, block):
    codes = np.random.default_rng(bits).integers(0, 1 << bits, (k, n)).astype(np.uint8)
    packed = lower.lowbit_codes(codes, bits, block)
    assert packed.shape == (n, -(-k // block), block * bits // 8) and packed.dtype == np.uint8
    np.testing.assert_array_equal(unpack_reference(packed, bits, block, k), codes)


def test_codebook_of_picks_the_fewest_bits():
    rng = np.random.default_rng(0)
    for values, bits in ((4, 2), (5, 3), (16, 4), (17, 8), (256, 8)):
        table = rng.standard_normal(values).astype(np.float32)
        w = table[rng.integers(0, values, (40, 30))]
        codes, book, got = lower.codebook_of(w)
        assert got == bits and book.shape == (1 << bits,)
        np.testing.assert_array_equal(book[codes], w)
    assert lower.codebook_of(rng.standard_normal((40, 30)).astype(np.float32)) is None


# ---------------------------------------------------------------- the op


@needs_lib
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("mode", MODES)
def test_op_matches_reference(bits, mode):
    for k, n, lead, block in SHAPES:
        model, a, ref = lowbit_case(k, n, lead, bits, block, mode)
        for threads in (1, 2):
            (y,) = ops.session(model, intra_op_num_threads=threads).run(None, {"A": a})
            assert y.shape == ref.shape and y.dtype == np.float32
            assert_close(y, ref, f"{(k, n, lead, block)} threads={threads}")


@needs_lib
@pytest.mark.parametrize("bits", [2, 4])
def test_float_gemv_every_block_and_row_count(bits):
    """The float gemv (M < 12) on blocks smaller than, equal to and larger than the BF16 kernel's
    128-code span (16..256), blocks it leaves to the float32 kernel (48, 96), K ending mid-span and
    mid-block, 1 to 11 rows (its 4-row passes and their remainders), N not a multiple of its 4
    columns: whichever kernel this CPU picks."""
    cases = [(1000, 33, 16), (2100, 7, 32), (130, 9, 64), (777, 13, 128), (1100, 5, 256), (500, 6, 48), (300, 5, 96)]
    for k, n, block in cases:
        for mode in ("linear", "zp"):
            for m in (1, 2, 3, 5, 11):
                model, a, ref = lowbit_case(k, n, (m,), bits, block, mode, seed=k + m)
                (y,) = ops.session(model, intra_op_num_threads=2).run(None, {"A": a})
                assert_close(y, ref, f"bits={bits} K={k} N={n} block={block} {mode} M={m}")


@needs_lib
def test_int8_activations_match_their_reference():
    _check_int8_cases()


@needs_lib
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_int8_activations_every_row_count(bits):
    """M = 1..11: the int8 kernel takes rows 4 at a time, then 3, 2 or 1."""
    model, a, _ = lowbit_case(600, 21, (11,), bits, 32, "linear")
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    session = ops.session(with_accuracy_level(model, 4))
    for m in range(1, 12):
        want = int8_reference(a[:m], inits["codes"], inits["scales"], None, bits, 32, 600, inits["bias"])
        (y,) = session.run(None, {"A": a[:m]})
        assert_close(y, want, f"bits={bits} M={m}")


@needs_lib
def test_int8_activations_apply_at_every_row_count():
    """accuracy_level 4 rounds A to int8 at any M, as MatMulNBits does: 12 and 64 rows (where the
    float32 path would take panels) give the int8 definition, not the float32 result."""
    model, a, ref = lowbit_case(96, 40, (64,), 4, 32)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    session = ops.session(with_accuracy_level(model, 4))
    for m in (12, 64):
        (y,) = session.run(None, {"A": a[:m]})
        want = int8_reference(a[:m], inits["codes"], inits["scales"], None, 4, 32, 96, inits["bias"])
        assert_close(y, want, f"M={m}")
        assert float(np.abs(y - ref[:m]).max()) > 1e-5 * float(np.abs(ref).max())  # it really is int8


@needs_lib
def test_op_large_shape_both_kernels():
    """768 x 3072 (a transformer FFN), M = 1 and 8 (gemv), 12 and 64 (gemm), one bias-free case."""
    for bits, m in ((4, 1), (2, 8), (3, 12), (8, 64)):
        model, a, ref = lowbit_case(768, 3072, (m,), bits, 32, "zp" if bits == 8 else "linear", bias=bits != 2)
        (y,) = ops.session(model, intra_op_num_threads=2).run(None, {"A": a})
        assert_close(y, ref, f"bits={bits} M={m}")


@needs_lib
def test_op_matches_reference_forced_portable(tmp_path):
    assert_cases_pass_forced_portable("test_lowbit_matmul", "_isa", tmp_path)


@needs_lib
def test_op_matches_reference_capped_at_avx2(tmp_path):
    """On an AVX-512 machine the AVX2 kernels are otherwise never run: ONNXSHRINK_MAX_ISA=avx2 runs them."""
    if not {"avx2", "fma"} <= cpu_flags():
        pytest.skip("this CPU has no AVX2/FMA")
    assert_cases_pass_under("test_lowbit_matmul", "_isa", tmp_path, {"ONNXSHRINK_MAX_ISA": "avx2"}, "avx2")


@needs_lib
def test_op_matches_reference_capped_at_avx512(tmp_path):
    """On a CPU with AVX-512 BF16 and VNNI the float gemv of 2/4-bit weights runs on vdpbf16ps and
    the int8 one on vpdpbusd; the AVX-512 F float kernels and the vpmaddubsw int8 ones still serve
    CPUs without them (Skylake-X): ONNXSHRINK_MAX_ISA=avx512 runs them here."""
    if not {"avx512f", "avx512bw", "avx512vl", "fma"} <= cpu_flags():
        pytest.skip("this CPU has no AVX-512")
    assert_cases_pass_under("test_lowbit_matmul", "_isa", tmp_path, {"ONNXSHRINK_MAX_ISA": "avx512"}, "avx512")


@needs_lib
def test_dispatch_env_var(monkeypatch):
    monkeypatch.delenv("ONNXSHRINK_FORCE_PORTABLE", raising=False)
    monkeypatch.delenv("ONNXSHRINK_MAX_ISA", raising=False)
    isa = _isa()
    assert isa in ("portable", "avx2", "avx512", "avx512_vnni", "avx512_bf16")
    flags = cpu_flags()
    if {"avx512f", "avx512bw", "avx512vl", "fma", "avx512_vnni"} <= flags:  # built wherever GCC/Clang can
        assert isa == ("avx512_bf16" if "avx512_bf16" in flags else "avx512_vnni")
        monkeypatch.setenv("ONNXSHRINK_MAX_ISA", "avx512_vnni")
        assert _isa() == "avx512_vnni"
    monkeypatch.setenv("ONNXSHRINK_MAX_ISA", "avx512_bf16")
    assert _isa() == isa
    monkeypatch.setenv("ONNXSHRINK_MAX_ISA", "portable")
    assert _isa() == "portable"
    monkeypatch.delenv("ONNXSHRINK_MAX_ISA")
    monkeypatch.setenv("ONNXSHRINK_FORCE_PORTABLE", "1")
    assert _isa() == "portable"


@needs_lib
@pytest.mark.realmodel
def test_op_on_real_weights(minilm_path):
    """MiniLM's FFN weights quantized by quantize-weights' rtn (2, 3, 4, 8 bits; with and without
    zero points), on real activations' scale: the op computes exactly what the codes describe."""
    import onnx

    from onnxshrink.passes.quantize_weights import rtn

    model = onnx.load(str(minilm_path))
    weights = [numpy_helper.to_array(t) for t in model.graph.initializer if len(t.dims) == 2 and 0 not in t.dims]
    ffn = [w for w in weights if w.shape in ((384, 1536), (1536, 384))][:2]
    assert len(ffn) == 2
    rng = np.random.default_rng(0)
    for w in ffn:
        k, n = w.shape
        for bits, symmetric in ((2, True), (3, False), (4, True), (8, False)):
            q = rtn(w.astype(np.float64), bits, 32, symmetric)
            inits = {"codes": lower.lowbit_codes(q.codes, bits, 32), "scales": np.ascontiguousarray(q.scales.T)}
            names = ["codes", "scales"]
            if q.zero_points is not None:
                inits["zero_points"] = np.ascontiguousarray(q.zero_points.T)
                names.append("zero_points")
            weight = q.dequantize().astype(np.float64)
            for m in (1, 8, 32):
                a = rng.standard_normal((m, k)).astype(np.float32)
                (y,) = ops.session(lowbit_model(k, n, bits, 32, inits, names)).run(None, {"A": a})
                assert_close(y, a.astype(np.float64) @ weight, f"{w.shape} bits={bits} M={m}")


# ---------------------------------------------------------------- bad input


@needs_lib
@pytest.mark.parametrize(
    "mutate,needle",
    [
        (lambda i: i.update(codes=i["codes"][:, :-1]), "codes"),
        (lambda i: i.update(scales=i["scales"][:-1]), "scales"),
        (lambda i: i.update(zero_points=i["zero_points"][:, :1]), "zero_points"),
        (lambda i: i.update(bias=i["bias"][:-1]), "bias"),
    ],
)
def test_bad_input_raises_and_process_survives(mutate, needle):
    import onnxruntime as ort

    k, n, bits, block = 40, 9, 3, 16
    model, a, ref = lowbit_case(k, n, (2,), bits, block, "zp")
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    mutate(inits)
    bad = lowbit_model(k, n, bits, block, inits, list(model.graph.node[0].input)[1:])
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument) as exc:
        ops.session(bad).run(None, {"A": a})
    assert "LowBitMatMul 'lowbit'" in str(exc.value) and needle in str(exc.value)
    sess = ops.session(model)
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument, match="'A'"):
        sess.run(None, {"A": a[:, :-1]})
    (y,) = sess.run(None, {"A": a})  # still usable afterwards
    assert_close(y, ref)


@needs_lib
def test_bad_attributes_and_mode_mixups_raise():
    import onnxruntime as ort

    model, a, _ = lowbit_case(40, 9, (1,), 4, 16)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    names = list(model.graph.node[0].input)[1:]
    level = lowbit_model(40, 9, 4, 16, inits, names)
    level.graph.node[0].attribute.append(helper.make_attribute("accuracy_level", 7))
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument, match="accuracy_level"):
        ops.session(level).run(None, {"A": a})
    for attr, value, needle in (("bits", 5, "bits"), ("block_size", 24, "block_size")):
        bad = lowbit_model(40, 9, 4, 16, inits, names)
        for at in bad.graph.node[0].attribute:
            if at.name == attr:
                at.i = value
        with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument, match=needle):
            ops.session(bad).run(None, {"A": a})
    both = dict(inits, codebook=np.zeros(16, np.float32))  # scales and a codebook: ambiguous
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument, match="codebook"):
        ops.session(lowbit_model(40, 9, 4, 16, both, names + ["codebook"])).run(None, {"A": a})
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument, match="scales"):
        ops.session(lowbit_model(40, 9, 4, 16, {"codes": inits["codes"]}, ["codes"])).run(None, {"A": a})
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument):
        ops.session(model).run(None, {"A": a.astype(np.float64)})
