"""Pruning side by side: onnxshrink's prune / reconstruct / store-sparse and the peer onnxsim 0.8.1's
pruning functions, on the four reference models, in one run.

    python benchmarks/prune.py [--models digits minilm yolov8n ppocr] [--runs 20] [--timeout 1200]

Prints a markdown table: nonzero weights and file size against fp32 (dense, and with
`store-sparse` for unstructured rows), the task's fidelity on held-out data (the same measures as
benchmarks/quantize.py: digits accuracy, MiniLM sentence-embedding cosine, YOLOv8n class-score
cosine and detection F1 vs fp32 after NMS, PP-OCR text-mask IoU), latency vs fp32 in stock ORT
(1 thread, batch 1, medians of runs interleaved with fp32 and every other variant), and the
pruning's wall time. Every pruning runs in a fresh process with a time limit; a peer that does not
install, or a step that fails, shows why in its own row and the run goes on.

onnxsim 0.8.1 is found where `pip install onnxsim==0.8.1` put it (e.g. `pip install '.[bench]'`);
its functions are called with their documented arguments and our calibration feeds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quantize as bench  # noqa: E402  (models, test sets, task measures, latency: shared with the quantize table)
from _report import log, markdown  # noqa: E402
from quantize import inputs, latency_cell, measure_latency, short  # noqa: E402

import onnxshrink  # noqa: E402

# --------------------------------------------------------------------------
# What runs: edit here.
# --------------------------------------------------------------------------
SPARSITIES = (0.5, 0.7, 0.8, 0.9)


def unstructured(sparsities, reconstruct=True) -> list[str]:
    rows = []
    for s in sparsities:
        rows += [f"prune(sparsity={s})", f"prune(sparsity={s},method=obs)"]
        if reconstruct:
            rows.append(f"prune(sparsity={s},method=obs),reconstruct")
    return rows


# Peer rows: label -> (onnxsim function, keyword arguments; "calibration" marks one that takes feeds).
PEERS: dict[str, tuple[str, dict]] = {}


def onnxsim_rows(magnitude=(), sparsegpt=(), nm=False, structured=()) -> list[str]:
    rows = {f"onnxsim magnitude {s}": ("apply_magnitude_pruning", {"sparsity": s}) for s in magnitude}
    rows |= {f"onnxsim sparsegpt {s}": ("apply_sparsegpt_pruning", {"sparsity": s, "calibration": True})
             for s in sparsegpt}
    if nm:
        rows["onnxsim sparsegpt 2:4"] = ("apply_sparsegpt_pruning", {"n": 2, "m": 4, "calibration": True})
    rows |= {f"onnxsim structured {s}": ("apply_structured_pruning", {"sparsity": s}) for s in structured}
    PEERS.update(rows)
    return list(rows)


PLAN = {
    "digits": [*unstructured(SPARSITIES), "prune(sparsity=0.9,method=obs,scope=global),reconstruct",
               # without the second pass that gives unread channels' budget to the channels still read
               "prune(sparsity=0.9,method=obs,zero_unread=false)",
               # the layer-wise fit alone, without the network refit that follows it on MLPs
               "prune(sparsity=0.8,method=obs),reconstruct(network=off)",
               "prune(sparsity=0.9,method=obs),reconstruct(network=off)",
               "prune(sparsity=0.9,scope=auto)", "prune(pattern=2:4,method=obs),reconstruct",
               *onnxsim_rows(magnitude=SPARSITIES, sparsegpt=SPARSITIES, nm=True)],
    # obs on 36 layers of up to 1536 inputs: one sparsity with reconstruct, the others without.
    # The network refit after the layer-wise fit: 300 steps fit its work limit (the default 2000 do not),
    # at a step of about 1e-4 of these weights (rate is relative to each tensor's RMS value).
    "minilm": [*unstructured((0.5,)), "prune(sparsity=0.5,method=obs),reconstruct(steps=300,rate=0.0025)",
               *unstructured((0.7, 0.8), reconstruct=False),
               "prune(pattern=2:4)", "prune(pattern=2:4,method=obs)",
               "prune(pattern=2:4,method=obs),reconstruct(steps=300,rate=0.0025)",
               *onnxsim_rows(magnitude=(0.5,), sparsegpt=(0.5,), nm=True)],
    # All Conv: obs goes through the input patches (no refit); whole channels are what speed these up.
    "yolov8n": ["prune(sparsity=0.5)", "prune(sparsity=0.5,method=obs)", "prune(sparsity=0.5,method=obs),reconstruct",
                "prune(pattern=channel,sparsity=0.3)", "prune(pattern=channel,sparsity=0.3),reconstruct",
                "prune(pattern=channel,sparsity=0.3,round_to=8),reconstruct",
                *onnxsim_rows(magnitude=(0.5,), structured=(0.3,))],
    "ppocr": ["prune(sparsity=0.5)", "prune(sparsity=0.5,method=obs)", "prune(pattern=channel,sparsity=0.3)", "prune(pattern=channel,sparsity=0.3),reconstruct",
              "prune(pattern=channel,sparsity=0.1,round_to=8),reconstruct",
              *onnxsim_rows(magnitude=(0.5,), structured=(0.3,))],
}
# Digits: the first 300 rows of the test split calibrate, rows 300..539 test (as tests/test_prune.py).
CALIBRATION = {"digits": 300, "minilm": 128, "yolov8n": 16, "ppocr": 16}
CHECK_SAMPLES = 8  # compress() checks each pass on this many calibration samples
TIMEOUT = 1200.0  # MiniLM's network refit takes about ten minutes on 2 cores


# --------------------------------------------------------------------------
# One pruning, in its own process (this file run with --job)
# --------------------------------------------------------------------------
def run_job(job: dict) -> dict:
    start = time.perf_counter()
    if job["label"] in PEERS:
        return run_peer(job, start)
    result = onnxshrink.compress(job["model"], job["label"], calibration=job["calib"], samples=CHECK_SAMPLES)
    onnxshrink.save(result.model, job["out"])
    wall = time.perf_counter() - start
    problems = [p.message or f"{p.spec}: {p.status}" for p in result.report.rolled_back]
    # store-sparse on the result: what the pruned file takes on disk (unstructured zeros only).
    stored = onnxshrink.compress(result.model, "store-sparse", samples=1)
    onnxshrink.save(stored.model, job["out"] + ".sparse.onnx")
    return {"ok": True, "wall_s": wall, "note": "; ".join(problems)}


def run_peer(job: dict, start: float) -> dict:
    try:
        import onnxsim
    except ImportError as exc:
        return {"ok": False, "error": f"not available: onnxsim does not import ({exc}); pip install onnxsim==0.8.1"}
    function, settings = PEERS[job["label"]]
    settings = dict(settings)
    if settings.pop("calibration", False):
        data = onnxshrink.open_data(job["calib"], onnx.load(job["model"]))
        feeds = list(data)
        settings |= {"calibration_data": feeds, "num_samples": len(feeds)}
    model = getattr(onnxsim, function)(onnx.load(job["model"]), **settings)
    wall = time.perf_counter() - start
    onnx.save(model, job["out"])
    return {"ok": True, "wall_s": wall, "note": f"onnxsim {getattr(onnxsim, '__version__', '?')} {function}"}


def prune_in_process(label: str, model: Path, calib: Path, out: Path, timeout: float) -> dict:
    job = {"label": label, "model": str(model), "calib": str(calib), "out": str(out)}
    try:
        proc = subprocess.run([sys.executable, __file__, "--job", json.dumps(job)], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s"}
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        tail = proc.stderr.strip().splitlines()
        return {"ok": False, "error": f"worker exited {proc.returncode}" + (f" ({short(tail[-1])})" if tail else "")}


# --------------------------------------------------------------------------
# Measures
# --------------------------------------------------------------------------
def nonzero_weights(path: Path) -> int:
    """Nonzero float weights of MatMul/Gemm/Conv nodes (what pruning removes)."""
    model = onnx.load(str(path))
    weights = {t.name: t for t in model.graph.initializer}
    # Paddle exports (PP-OCR) hold their weights in Constant nodes, not initializers.
    weights |= {n.output[0]: a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute
                if a.name == "value"}
    names = {n.input[1] for n in model.graph.node if n.op_type in ("MatMul", "Gemm", "Conv") and len(n.input) > 1}
    return sum(int(np.count_nonzero(numpy_helper.to_array(weights[n]))) for n in names if n in weights)


def bench_model(key: str, args, workdir: Path) -> tuple[list[list[str]], str]:
    model_bench = bench.MODELS[key]
    model = model_bench.fetch()
    count = CALIBRATION[key]
    calib = inputs.calibration_npz(model_bench.calib_name, workdir / f"{key}-calib.npz", count)
    test = model_bench.test_set(count, None)
    fp32 = bench.Variant("fp32", model)
    variants = [fp32]
    for index, label in enumerate(PLAN[key]):
        log(f"{model_bench.title}: {label}")
        variant = bench.Variant(label)
        out = workdir / f"{key}-{index}.onnx"
        report = prune_in_process(label, model, calib, out, args.timeout)
        if report["ok"]:
            variant.path, variant.wall_s, variant.note = out, report["wall_s"], report["note"]
        else:
            variant.problem = report["error"]
        log(f"  -> {variant.problem or f'{variant.wall_s:.1f} s'}")
        variants.append(variant)

    log(f"{model_bench.title}: fidelity on {len(test.feeds)} test feeds")
    bench.fill_fidelity(model_bench, variants, test)
    log(f"{model_bench.title}: latency, 1 thread, {args.runs} interleaved runs")
    measure_latency(variants, test.latency_feed, 1, args.runs)

    base_nonzero, base_kb = nonzero_weights(model), model.stat().st_size / 1e3
    rows = []
    for variant in variants:
        if variant.path is None:
            rows.append([model_bench.title, variant.label, "—", "—", "—", "—", "—", "—", variant.problem])
            continue
        kb = variant.path.stat().st_size / 1e3
        sparse = Path(str(variant.path) + ".sparse.onnx")
        sparse_cell = f"{sparse.stat().st_size / 1e3 / base_kb:.3f}" if sparse.exists() else "—"
        rows.append([model_bench.title, variant.label, f"{nonzero_weights(variant.path) / base_nonzero:.3f}",
                     f"{kb / base_kb:.3f}", sparse_cell, variant.fidelity, latency_cell(variant, fp32, 1),
                     "—" if variant.wall_s is None else f"{variant.wall_s:.1f}", variant.note])
    return rows, test.about


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--job":
        try:
            print(json.dumps(run_job(json.loads(sys.argv[2]))))
        except Exception as exc:  # every tool raises its own types; the row shows the message
            message = str(exc).strip().splitlines()
            print(json.dumps({"ok": False, "error": f"failed: {type(exc).__name__}: {message[0] if message else ''}"}))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=list(PLAN), choices=list(PLAN))
    parser.add_argument("--runs", type=int, default=20, help="timed runs per variant (interleaved)")
    parser.add_argument("--timeout", type=float, default=TIMEOUT, help="seconds one pruning may take")
    args = parser.parse_args()
    start = time.perf_counter()
    rows, abouts = [], []
    with tempfile.TemporaryDirectory(prefix="onnxshrink-prune-") as folder:
        for key in args.models:
            try:
                model_rows, about = bench_model(key, args, Path(folder))
                rows += model_rows
                abouts.append(about)
            except Exception as exc:  # a model that cannot be fetched or fed must not end the run
                log(f"{key}: {exc!r}")
                rows.append([key, "—", "—", "—", "—", f"error: {short(exc)}", "—", "—", ""])
    print(markdown(["model", "pruning", "nonzero weights ×", "file ×", "file × store-sparse", "fidelity vs fp32 (test data)",
                    "latency × 1 thread", "prune s", "note"], rows))
    counts = ", ".join(f"{bench.MODELS[k].title} {CALIBRATION[k]}" for k in args.models)
    print(f"\nCalibration samples: {counts}, the same .npz for every tool. Test data, held out:")
    for about in abouts:
        print(f"- {about}")
    print(f"\nNonzero weights: of MatMul/Gemm/Conv weights, against fp32. Latency: batch 1, ratio of medians over "
          f"{args.runs} runs interleaved with fp32. Our time includes compress()'s check of the result on "
          f"{CHECK_SAMPLES} samples. Total {time.perf_counter() - start:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
