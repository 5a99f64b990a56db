"""Deep Compression on ONNX: pruning, weight sharing (cluster, pq), low rank (svd, tucker) and
entropy coding (pack), each alone over a sweep of its knob and chained into full pipelines, on the
four reference models, as size-vs-fidelity tables and a Pareto plot.

    python benchmarks/deep_compression.py [--models digits minilm yolov8n ppocr] [--runs 20] [--png pareto.png]

Each row is one pipeline run through onnxshrink.compress in a fresh process (with a time limit),
then packed with `onnxshrink pack`. Columns: the .onnx file and the packed .onnxz against the fp32
.onnx, the task's fidelity on held-out data (the measures of benchmarks/quantize.py), latency in
stock ORT (1 thread, batch 1, medians of runs interleaved with fp32 and every other row of the
model) and the wall time. `--png` draws, per model, the packed
size against the task score with each method's Pareto front (needs matplotlib: `pip install
'.[plot]'`). Pipelines whose passes are not registered show as "not available".
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quantize as bench  # noqa: E402  (models, test sets, task measures, latency: shared with the quantize table)
from _report import log, markdown  # noqa: E402
from quantize import inputs, latency_cell, measure_latency, short, unavailable  # noqa: E402

import onnxshrink  # noqa: E402
from onnxshrink import task_metrics as tm  # noqa: E402
from onnxshrink.onnxz import pack_file  # noqa: E402

# --------------------------------------------------------------------------
# What runs: edit here. The family (first word of the first pass) colours the plot.
# --------------------------------------------------------------------------
PLAN = {
    "digits": [
        *[f"prune(sparsity={s},method=obs),reconstruct" for s in (0.5, 0.7, 0.9)],
        "prune(sparsity=0.9,method=obs,scope=global),reconstruct",
        *[f"cluster(bits={b})" for b in (2, 3, 4, 6)],
        "cluster(bits=4,scope=channel)", "pq(subvector=4,centroids=64)",
        *[f"svd(ratio={r})" for r in (0.3, 0.5)],
        "quantize-weights(bits=4,method=gptq)",
        "prune(sparsity=0.9,method=obs),cluster(bits=4),reconstruct",
        "prune(sparsity=0.9,method=obs),cluster(bits=4),reconstruct(network=off)",  # layer-wise fit only
        "prune(sparsity=0.9,method=obs),reconstruct,cluster(bits=4),reconstruct",
        "prune(sparsity=0.9,method=obs,scope=global),reconstruct,cluster(bits=4),reconstruct",
        "prune(sparsity=0.9,method=obs),reconstruct,cluster(bits=4)",
        "prune(sparsity=0.95,method=obs),cluster(bits=4),reconstruct",
    ],
    "minilm": [
        "prune(sparsity=0.5,method=obs)",
        *[f"cluster(bits={b})" for b in (3, 4, 6)], "cluster(bits=4,scope=channel)",
        "pq(subvector=4,centroids=256)",
        "cluster(bits=4,scope=channel,method=gptq)", "cluster(bits=4,scope=channel,refit=1)",
        # one float16 codebook per 128 inputs of a column, values refit to the layer outputs
        "cluster(bits=4,scope=channel,group=128,refit=1)",
        "svd(ratio=0.7,activation_aware=false)", "svd(ratio=0.7)", "svd(rank=auto,ratio=0.7)",
        "quantize-weights(bits=4,method=gptq)",
        "prune(sparsity=0.5,method=obs),cluster(bits=4)",
    ],
    "yolov8n": [
        "prune(sparsity=0.5)",
        # cluster's default method=auto takes GPTQ codes here (the benchmark gives calibration data)
        *[f"cluster(bits={b})" for b in (4, 6, 8)], "cluster(bits=6,method=kmeans)", "cluster(bits=6,scope=channel)",
        "cluster(bits=6,refit=1)",
        "tucker(ratio=0.7,activation_aware=false)", *[f"tucker(ratio={r})" for r in (0.7, 0.9)],
        "tucker(energy=0.98)",
        "prune(sparsity=0.5),cluster(bits=6)",
        "prune(pattern=channel,sparsity=0.3),reconstruct,cluster(bits=6,scope=channel)",
    ],
    "ppocr": [
        "prune(sparsity=0.5)",
        *[f"cluster(bits={b})" for b in (4, 6, 8)], "cluster(bits=6,method=kmeans)", "cluster(bits=6,refit=1)",
        "prune(sparsity=0.5),cluster(bits=6)",
    ],
}
# As benchmarks/prune.py: digits calibrates on test-split rows 0..299 and tests on 300..539.
CALIBRATION = {"digits": 300, "minilm": 128, "yolov8n": 16, "ppocr": 16}
CHECK_SAMPLES = 8
TIMEOUT = 600.0


def score(key: str, ref: dict, cand: dict, test) -> tuple[str, float]:
    """The number each model's plot puts on its y axis, and its name."""
    if key == "digits":
        return "accuracy", tm.top1_accuracy(cand["logits"], test.labels)
    if key == "minilm":
        return "embedding cosine", float(tm.row_cosines(ref["sentence_embedding"], cand["sentence_embedding"]).mean())
    if key == "yolov8n":
        return "class-score cosine", tm.part_cosine(ref["output0"], cand["output0"], axis=1, start=4)
    return "text-mask IoU", tm.mask_iou(ref["sigmoid_0.tmp_0"], cand["sigmoid_0.tmp_0"], threshold=bench.PPOCR_MASK)["mean"]


# --------------------------------------------------------------------------
# One pipeline, in its own process (this file run with --job)
# --------------------------------------------------------------------------
def run_job(job: dict) -> dict:
    start = time.perf_counter()
    result = onnxshrink.compress(job["model"], job["label"], calibration=job["calib"], samples=CHECK_SAMPLES)
    onnxshrink.save(result.model, job["out"])
    wall = time.perf_counter() - start
    pack_file(job["out"], job["out"] + "z")
    problems = [p.message or f"{p.spec}: {p.status}" for p in result.report.rolled_back]
    return {"ok": True, "wall_s": wall, "note": "; ".join(problems)}


def compress_in_process(label: str, model: Path, calib: Path, out: Path, timeout: float) -> dict:
    job = {"label": label, "model": str(model), "calib": str(calib), "out": str(out)}
    try:
        proc = subprocess.run([sys.executable, __file__, "--job", json.dumps(job)], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"failed: timed out after {timeout:.0f} s"}
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        tail = proc.stderr.strip().splitlines()
        return {"ok": False, "error": f"failed: worker exited {proc.returncode}" + (f" ({short(tail[-1])})" if tail else "")}


# --------------------------------------------------------------------------
def bench_model(key: str, args, workdir: Path) -> tuple[list[list[str]], list[dict], str]:
    model_bench = bench.MODELS[key]
    model = model_bench.fetch()
    calib = inputs.calibration_npz(model_bench.calib_name, workdir / f"{key}-calib.npz", CALIBRATION[key])
    test = model_bench.test_set(CALIBRATION[key], None)
    fp32 = bench.Variant("fp32", model)
    pack_file(model, workdir / f"{key}-fp32.onnxz")
    variants = [fp32]
    for index, label in enumerate(PLAN[key]):
        if args.only not in label:
            continue
        variant = bench.Variant(label)
        variant.problem = unavailable(label)
        if not variant.problem:
            log(f"{model_bench.title}: {label}")
            out = workdir / f"{key}-{index}.onnx"
            report = compress_in_process(label, model, calib, out, args.timeout)
            if report["ok"]:
                variant.path, variant.wall_s, variant.note = out, report["wall_s"], report["note"]
            else:
                variant.problem = report["error"]
            log(f"  -> {variant.problem or f'{variant.wall_s:.1f} s'}")
        variants.append(variant)

    log(f"{model_bench.title}: fidelity on {len(test.feeds)} test feeds")
    scores = {}

    def keep_score(variant, reference, candidate):
        scores.setdefault("fp32", score(key, reference, reference, test))
        scores[variant.label] = score(key, reference, candidate, test)

    bench.fill_fidelity(model_bench, variants, test, keep_score)
    log(f"{model_bench.title}: latency, 1 thread, {args.runs} interleaved runs")
    measure_latency(variants, test.latency_feed, 1, args.runs)

    base_kb = model.stat().st_size / 1e3
    rows, points = [], []
    for variant in variants:
        if variant.path is None:
            rows.append([model_bench.title, variant.label, "—", "—", "—", "—", "—", variant.problem])
            continue
        packed = Path(str(variant.path) + "z") if variant is not fp32 else workdir / f"{key}-fp32.onnxz"
        file_x, packed_x = variant.path.stat().st_size / 1e3 / base_kb, packed.stat().st_size / 1e3 / base_kb
        rows.append([model_bench.title, variant.label, f"{file_x:.3f}", f"{packed_x:.4f} ({1 / packed_x:.1f}x smaller)", variant.fidelity,
                     latency_cell(variant, fp32, 1), "—" if variant.wall_s is None else f"{variant.wall_s:.1f}",
                     variant.note])
        if variant.label in scores:
            name, value = scores[variant.label]
            points.append({"model": model_bench.title, "label": variant.label, "packed": packed_x, "score": value,
                           "metric": name})
    return rows, points, test.about


def family(label: str) -> str:
    passes = [p.split("(")[0] for p in label.split("),")]
    return "fp32" if label == "fp32" else (passes[0] if len(passes) == 1 or passes[0] == "prune" and
                                           all(p in ("prune", "reconstruct") for p in passes) else "pipeline")


def pareto_plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(p["model"] for p in points))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4.2), squeeze=False)
    for ax, title in zip(axes[0], models):
        mine = [p for p in points if p["model"] == title]
        for name in dict.fromkeys(family(p["label"]) for p in mine):
            group = sorted((p for p in mine if family(p["label"]) == name), key=lambda p: p["packed"])
            ax.plot([p["packed"] for p in group], [p["score"] for p in group], "o", label=name)
        front, best = [], -float("inf")  # smallest file first: a point is on the front if it scores higher
        for p in sorted(mine, key=lambda p: p["packed"]):
            if p["score"] > best:
                front.append(p)
                best = p["score"]
        ax.step([p["packed"] for p in front], [p["score"] for p in front], where="post", color="black", lw=0.8,
                label="Pareto front")
        ax.set_xscale("log")
        ax.set_xlabel("packed file / fp32 file")
        ax.set_ylabel(mine[0]["metric"])
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--job":
        try:
            print(json.dumps(run_job(json.loads(sys.argv[2]))))
        except Exception as exc:  # the row shows the message
            message = str(exc).strip().splitlines()
            print(json.dumps({"ok": False, "error": f"failed: {type(exc).__name__}: {message[0] if message else ''}"}))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=list(PLAN), choices=list(PLAN))
    parser.add_argument("--runs", type=int, default=20, help="timed runs per variant (interleaved)")
    parser.add_argument("--timeout", type=float, default=TIMEOUT, help="seconds one pipeline may take")
    parser.add_argument("--only", default="", help="run only the pipelines whose text contains this")
    parser.add_argument("--png", type=Path, default=None, help="write the Pareto plot here")
    args = parser.parse_args()
    start = time.perf_counter()
    rows, points, abouts = [], [], []
    with tempfile.TemporaryDirectory(prefix="onnxshrink-deep-") as folder:
        for key in args.models:
            try:
                model_rows, model_points, about = bench_model(key, args, Path(folder))
                rows += model_rows
                points += model_points
                abouts.append(about)
            except Exception as exc:  # a model that cannot be fetched or fed must not end the run
                log(f"{key}: {exc!r}")
                rows.append([key, "—", "—", "—", f"error: {short(exc)}", "—", "—", ""])
    print(markdown(["model", "pipeline", "file ×", "packed .onnxz ×", "fidelity vs fp32 (test data)",
                    "latency × 1 thread", "wall s", "note"], rows))
    counts = ", ".join(f"{bench.MODELS[k].title} {CALIBRATION[k]}" for k in args.models)
    print(f"\nCalibration samples: {counts}. Test data, held out:")
    for about in abouts:
        print(f"- {about}")
    print(f"\nFile and packed sizes against the fp32 .onnx file; pack is zstd or LZMA, the smaller, over "
          f"byte-shuffled payloads, lossless. Latency: batch 1, ratio of medians over {args.runs} runs "
          f"interleaved with fp32. Wall time includes compress()'s check on {CHECK_SAMPLES} samples, not the packing. "
          f"Total {time.perf_counter() - start:.0f} s.")
    if args.png and points:
        try:
            pareto_plot(points, args.png)
            print(f"\nPareto plot: {args.png}")
        except ImportError:
            print("\nno plot: matplotlib is not installed (pip install '.[plot]')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
