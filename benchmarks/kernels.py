"""SparseMatMul and LowBitMatMul against onnxruntime's dense MatMul and MatMulNBits, in one run.

    python benchmarks/kernels.py [--quick] [--threads 1 2] [--runs 20] [--no-e2e] [--shapes 4096x4096]
                                 [--max-isa avx2]

For every K x N in {768x768, 768x3072, 3072x768, 4096x4096} and M in {1, 8, 64}, one session per
kernel on the same weight shape, all with the same session options (1 and 2 intra-op threads),
timed in interleaved rounds (onnxruntime's dense MatMul first): dense fp32; MatMulNBits 4-bit
block 32 at accuracy_level 4 (int8 activations, its fast path) and 0 (float32, the same numerics as
ours); SparseMatMul csr at 50/70/90/95% zeros and 2:4; LowBitMatMul at 2/3/4/8 bits, block 32,
with float32 activations and with int8 ones (accuracy_level 4, the "int8" rows). Medians. At
M = 1 every kernel streams its weights once, so bytes / time is its achieved weight bandwidth,
given against a memory bandwidth measured here (numpy sum of 512 MB, one thread: a plain read
loop, which a kernel with software prefetch can exceed).

Then the end-to-end cases (skipped by --quick and --no-e2e): all-MiniLM-L6-v2 pruned to 80% with
obs (calibration: 32 sentences), lowered with `lower(batch=<tokens>)`, against the dense fp32 model
at batch 1; and MiniLM quantized to 4 bits (MatMulNBits, accuracy_level 4) against the same model
with every layer lowered to LowBitMatMul (`lower(min_gain=0)`) and as `lower(batch=<tokens>)`
chooses, on one token and on a padded sentence. A last table checks the targets. The tables' titles
name the CPU and the kernel variant the library picked; `--max-isa avx2` caps it (ONNXSHRINK_MAX_ISA),
to time the AVX2 kernels on an AVX-512 machine. `--quick`:
768x3072 and 4096x4096, M 1 and 64, 70/90% zeros, 2 and 4 bits, 1 thread, 10 runs. Progress goes to stderr, tables to stdout.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "models"))

from _report import log, markdown  # noqa: E402

import onnxshrink  # noqa: E402
import onnxshrink.passes.lower as lower  # noqa: E402  (registers the pass; format packers)
from onnxshrink import ops  # noqa: E402
from onnxshrink.runtime import interleaved_latency, session_options  # noqa: E402

SHAPES = [(768, 768), (768, 3072), (3072, 768), (4096, 4096)]
ROWS = [1, 8, 64]
SPARSITIES = [0.5, 0.7, 0.9, 0.95]
WIDTHS = [2, 3, 4, 8]
BLOCK = 32
QUICK = dict(shapes=[(768, 3072), (4096, 4096)], rows=[1, 64], sparsities=[0.7, 0.9], widths=[2, 4], threads=[1], runs=10)


@dataclass
class Kernel:
    label: str
    model: object
    weight_bytes: int


def _model(k: int, node, inits: list, domains: list):
    graph = helper.make_graph([node], "bench", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)] + [helper.make_opsetid(d, 1) for d in domains])


def dense_kernel(w: np.ndarray) -> Kernel:
    node = helper.make_node("MatMul", ["A", "W"], ["Y"])
    return Kernel("ORT MatMul fp32", _model(w.shape[0], node, [numpy_helper.from_array(w, "W")], []), w.nbytes)


def nbits_kernel(k: int, n: int, rng, accuracy_level: int) -> Kernel:
    blocks = -(-k // BLOCK)
    b = rng.integers(0, 256, (n, blocks, BLOCK // 2), dtype=np.uint8)
    s = (rng.random((n, blocks)) * 0.01).astype(np.float32)
    node = helper.make_node("MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft", K=k, N=n, bits=4,
                            block_size=BLOCK, accuracy_level=accuracy_level)
    inits = [numpy_helper.from_array(b, "B"), numpy_helper.from_array(s, "S")]
    return Kernel(f"ORT MatMulNBits 4-bit acc{accuracy_level}", _model(k, node, inits, ["com.microsoft"]), b.nbytes + s.nbytes)


def sparse_kernel(w: np.ndarray, sparsity: float, fmt: str = "csr") -> Kernel:
    k, n = w.shape
    pruned = w.copy()
    if fmt == "2:4":
        groups = np.abs(w).reshape(k // 4, 4, n)
        weakest = np.argsort(groups, axis=1)[:, :2, :]
        mask = np.ones_like(groups, bool)
        np.put_along_axis(mask, weakest, False, axis=1)
        pruned *= mask.reshape(k, n)
        values, meta = lower.two_four_arrays(pruned)
        arrays, names = [("values", values), ("indices", meta)], ["values", "indices", ""]
    else:
        pruned[np.abs(w) < np.quantile(np.abs(w), sparsity)] = 0
        values, indices, offsets = lower.csr_arrays(pruned)
        arrays, names = [("values", values), ("indices", indices), ("offsets", offsets)], ["values", "indices", "offsets"]
    node = helper.make_node("SparseMatMul", ["A", *names], ["Y"], domain=ops.DOMAIN, K=k, N=n, format=fmt)
    inits = [numpy_helper.from_array(a, name) for name, a in arrays]
    label = f"SparseMatMul {fmt}" + (f" {sparsity:.0%}" if fmt == "csr" else "")
    return Kernel(label, _model(k, node, inits, [ops.DOMAIN]), sum(a.nbytes for _, a in arrays))


def lowbit_kernel(k: int, n: int, bits: int, rng, accuracy_level: int = 0) -> Kernel:
    blocks = -(-k // BLOCK)
    codes = lower.lowbit_codes(rng.integers(0, 1 << bits, (k, n)).astype(np.uint8), bits, BLOCK)
    scales = (rng.random((n, blocks)) * 0.01).astype(np.float32)
    node = helper.make_node("LowBitMatMul", ["A", "codes", "scales"], ["Y"], domain=ops.DOMAIN, K=k, N=n, bits=bits,
                            block_size=BLOCK, accuracy_level=accuracy_level)
    inits = [numpy_helper.from_array(codes, "codes"), numpy_helper.from_array(scales, "scales")]
    label = f"LowBitMatMul {bits}-bit" + (" int8" if accuracy_level == 4 else "")
    return Kernel(label, _model(k, node, inits, [ops.DOMAIN]), codes.nbytes + scales.nbytes)


def session(model, threads: int):
    import onnxruntime as ort

    options = session_options(threads, spinning=threads == 1)
    options.register_custom_ops_library(ops.library_path())  # every session: the same options
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def memory_bandwidth_gbps() -> float:
    """Read bandwidth of one core: numpy sum over 512 MB (far past any cache), best of 5."""
    data = np.ones(128 * 2**20, np.float32)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.nbytes / best / 1e9


def bench_shape(k: int, n: int, cfg, bandwidth: float, results: dict) -> list[list[str]]:
    rng = np.random.default_rng(k * 7 + n)
    w = rng.standard_normal((k, n)).astype(np.float32)
    kernels = [dense_kernel(w), nbits_kernel(k, n, rng, 4), nbits_kernel(k, n, rng, 0)]
    kernels += [sparse_kernel(w, s) for s in cfg["sparsities"]]
    kernels.append(sparse_kernel(w, 0.5, "2:4"))
    kernels += [lowbit_kernel(k, n, bits, rng) for bits in cfg["widths"]]
    kernels += [lowbit_kernel(k, n, bits, rng, accuracy_level=4) for bits in cfg["widths"]]
    rows = []
    for threads in cfg["threads"]:
        sessions = [session(kern.model, threads) for kern in kernels]
        for m in cfg["rows"]:
            log(f"{k}x{n} M={m} threads={threads}: {len(sessions)} kernels, {cfg['runs']} interleaved rounds")
            feed = {"A": rng.standard_normal((m, k)).astype(np.float32)}
            times = interleaved_latency(sessions, feed, repeats=cfg["runs"])
            dense_t, nbits_t = times[0], times[1]
            for kern, t in zip(kernels, times):
                results[(kern.label, k, n, m, threads)] = t
                gbps = kern.weight_bytes / t / 1e9
                roof = f"{gbps:.1f} ({gbps / bandwidth:.0%})" if m == 1 else ""
                rows.append([kern.label, f"{k}x{n}", str(m), str(threads), f"{t * 1e3:.3f}", f"{dense_t / t:.2f}x",
                             f"{nbits_t / t:.2f}x", f"{kern.weight_bytes / 2**20:.1f}", roof])
        del sessions
    return rows


def e2e(cfg) -> tuple[list[list[str]], dict]:
    """MiniLM pruned 80% (obs) and lowered vs dense fp32 at batch 1; MiniLM at 4 bits with
    MatMulNBits vs the same model lowered to LowBitMatMul. figures: (kind, input, threads) -> ratio."""
    import inputs
    import zoo

    path = zoo.minilm()
    length = inputs.minilm_fixed_length()
    dense = onnxshrink.load(path)
    log("MiniLM: prune(sparsity=0.8,method=obs) on 32 sentences (about a minute)")
    pruned = onnxshrink.compress(path, "prune(sparsity=0.8,method=obs)",
                                 calibration=inputs.minilm_inputs(32, pad_to=length)).model
    lowered = lower.Lower(batch=length).apply(pruned).model
    # 4 bits: quantize-weights gives MatMulNBits (accuracy_level 4); lower(min_gain=0) takes every
    # layer into LowBitMatMul whatever its cost model predicts, so the op itself is what is timed.
    # lower(batch=<tokens>) is what a user runs: it takes the layers its cost model predicts faster.
    nbits = onnxshrink.compress(path, "quantize-weights(bits=4)").model
    forced = lower.Lower(min_gain=0).apply(nbits).model
    feeds = {1: {name: value[:, :1] for name, value in inputs.minilm_inputs(1)[0].items()},
             length: inputs.minilm_inputs(1, pad_to=length)[0]}
    chosen = {tokens: lower.Lower(batch=tokens).apply(nbits).model for tokens in feeds}

    def count(model, op_type):
        return sum(n.op_type == op_type for n in model.graph.node)

    rows, figures = [], {}
    for threads in cfg["threads"]:
        cases = [("sparse", feeds[length], f"{length} tokens",
                  [("dense fp32", dense), ("pruned 80% obs (dense zeros)", pruned),
                   (f"pruned + lower ({count(lowered, 'SparseMatMul')} SparseMatMul)", lowered)])]
        cases += [("lowbit", feed, f"{tokens} token" + "s" * (tokens > 1),
                   [("4-bit MatMulNBits acc4", nbits),
                    (f"4-bit + lower(min_gain=0) ({count(forced, 'LowBitMatMul')} LowBitMatMul)", forced),
                    (f"4-bit + lower(batch={tokens}) ({count(chosen[tokens], 'LowBitMatMul')} LowBitMatMul)",
                     chosen[tokens])])
                  for tokens, feed in feeds.items()]
        for kind, feed, tokens, variants in cases:
            sessions = [session(m, threads) for _, m in variants]
            outs = [s.run(None, feed)[0] for s in sessions]
            times = interleaved_latency(sessions, feed, repeats=max(cfg["runs"], 30))
            source = 1 if kind == "sparse" else 0  # the model the lowered rows were made from
            for i, ((label, _), t) in enumerate(zip(variants, times)):
                drift = float(np.abs(outs[i] - outs[source]).max() / np.abs(outs[source]).max())
                rows.append([label, tokens, str(threads), f"{t * 1e3:.2f}", f"{times[0] / t:.2f}x",
                             f"{drift:.1e}" if i > source else ""])
            figures[(kind, tokens, threads)] = times[0] / times[-1]
            if kind == "lowbit":
                figures[("lowbit-forced", tokens, threads)] = times[0] / times[1]
    return rows, figures


def targets(results: dict, threads: list[int], e2e_figures: dict | None) -> list[list[str]]:
    def ratio(a, b, k, n, m, th):
        ta, tb = results.get((a, k, n, m, th)), results.get((b, k, n, m, th))
        return None if ta is None or tb is None else tb / ta

    rows = []
    # Our op's int8 activations (accuracy_level 4, the "int8" rows) are what a user of MatMulNBits'
    # level 4 gets when `lower` rewrites it, so the targets against MatMulNBits acc4 and dense use
    # them; the float32 path ("float") compares with acc0 (the same numerics), and keeps its own
    # rows against the same goals.
    checks = [
        ("SparseMatMul csr 90%, M=1, 4096x4096 vs dense", "SparseMatMul csr 90%", "ORT MatMul fp32", 4096, 4096, 1, 4.0),
        ("SparseMatMul csr 70%, M=1, 4096x4096 vs dense", "SparseMatMul csr 70%", "ORT MatMul fp32", 4096, 4096, 1, 1.5),
        ("LowBitMatMul 4-bit int8, M=1, 4096x4096 vs MatMulNBits acc4", "LowBitMatMul 4-bit int8",
         "ORT MatMulNBits 4-bit acc4", 4096, 4096, 1, 1.0),
        ("LowBitMatMul 4-bit int8, M=1, 4096x4096 vs dense", "LowBitMatMul 4-bit int8", "ORT MatMul fp32", 4096, 4096, 1, 5.0),
        ("LowBitMatMul 2-bit int8 vs our 4-bit int8, M=1, 4096x4096", "LowBitMatMul 2-bit int8", "LowBitMatMul 4-bit int8",
         4096, 4096, 1, 1.3),
        ("LowBitMatMul 4-bit float, M=1, 4096x4096 vs MatMulNBits acc0", "LowBitMatMul 4-bit", "ORT MatMulNBits 4-bit acc0",
         4096, 4096, 1, 1.0),
        ("LowBitMatMul 4-bit float, M=1, 4096x4096 vs dense", "LowBitMatMul 4-bit", "ORT MatMul fp32", 4096, 4096, 1, 5.0),
        ("LowBitMatMul 2-bit float vs our 4-bit float, M=1, 4096x4096", "LowBitMatMul 2-bit", "LowBitMatMul 4-bit",
         4096, 4096, 1, 1.3),
        ("LowBitMatMul 4-bit, M=64, 4096x4096 vs dense (>= 1/1.5)", "LowBitMatMul 4-bit", "ORT MatMul fp32", 4096, 4096, 64, 1 / 1.5),
    ]
    for th in threads:
        for label, ours, theirs, k, n, m, goal in checks:
            got = ratio(ours, theirs, k, n, m, th)
            rows.append([label, str(th), "n/a" if got is None else f"{got:.2f}x", f">= {goal:.2f}x",
                         "n/a" if got is None else ("met" if got >= goal else "missed")])
        for (kind, tokens, figure_threads), got in (e2e_figures or {}).items():
            if figure_threads != th:
                continue
            label = {"sparse": "MiniLM 80% obs + lower vs dense fp32",
                     "lowbit": "MiniLM 4-bit + lower(batch=tokens) vs MatMulNBits",
                     "lowbit-forced": "MiniLM 4-bit, every layer LowBitMatMul, vs MatMulNBits"}[kind] + f", {tokens}"
            goal_ok = got > 1 if kind == "sparse" else got >= 1
            rows.append([label, str(th), f"{got:.2f}x", "> 1.00x" if kind == "sparse" else ">= 1.00x",
                         "met" if goal_ok else "missed"])
    return rows


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            line = next((line for line in info if line.startswith("model name")), "")
        return line.split(":", 1)[1].strip() if line else platform.processor() or "unknown CPU"
    except OSError:
        return platform.processor() or "unknown CPU"


def kernel_variants() -> str:
    """The variant each op would pick for a session created now."""
    return ", ".join(f"{op} {ops.kernel_variant(symbol)}" for op, symbol in
                     (("SparseMatMul", "OnnxShrinkSparseMatMulIsa"), ("LowBitMatMul", "OnnxShrinkLowBitMatMulIsa")))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small subset (see the module docstring)")
    parser.add_argument("--threads", type=int, nargs="*", default=None, help="intra-op thread counts (default 1 2)")
    parser.add_argument("--runs", type=int, default=None, help="interleaved timed rounds (default 20)")
    parser.add_argument("--no-e2e", action="store_true", help="skip the MiniLM end-to-end case")
    parser.add_argument("--shapes", nargs="*", default=None, metavar="KxN", help="only these weight shapes, e.g. 4096x4096")
    parser.add_argument("--max-isa", choices=("avx512_bf16", "avx512_vnni", "avx512", "avx2", "portable"), default=None,
                        help="cap the op library's kernel choice (sets ONNXSHRINK_MAX_ISA)")
    args = parser.parse_args()
    if args.max_isa:
        os.environ["ONNXSHRINK_MAX_ISA"] = args.max_isa  # read when each session is created
    cfg = dict(QUICK) if args.quick else dict(shapes=SHAPES, rows=ROWS, sparsities=SPARSITIES, widths=WIDTHS,
                                              threads=[1, 2], runs=20)
    if args.threads:
        cfg["threads"] = args.threads
    if args.runs:
        cfg["runs"] = args.runs
    if args.shapes:
        cfg["shapes"] = [tuple(int(d) for d in shape.lower().split("x")) for shape in args.shapes]
    ops.library_path()  # fails with the one-line reason when the op library is missing

    bandwidth = memory_bandwidth_gbps()
    log(f"measured read bandwidth (one core): {bandwidth:.1f} GB/s")
    machine = f"{cpu_name()}; kernels: {kernel_variants()}"
    log(machine)
    results: dict = {}
    rows = []
    for k, n in cfg["shapes"]:
        rows += bench_shape(k, n, cfg, bandwidth, results)
    print(f"## Kernels (medians of {cfg['runs']} interleaved rounds; memory bandwidth {bandwidth:.1f} GB/s; "
          f"{machine})\n")
    print(markdown(["kernel", "K x N", "M", "threads", "ms", "vs dense", "vs MatMulNBits acc4", "weights MiB",
                    "M=1 GB/s (of measured)"], rows))
    figures = None
    if not (args.quick or args.no_e2e):
        e2e_rows, figures = e2e(cfg)
        print("\n## End to end: all-MiniLM-L6-v2, batch 1 (ratios against the first row of each group)\n")
        print(markdown(["model", "input", "threads", "ms", "vs first", "max rel diff vs the model lowered"], e2e_rows))
    print("\n## Targets\n")
    print(markdown(["target", "threads", "measured", "goal", ""], targets(results, cfg["threads"], figures)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
