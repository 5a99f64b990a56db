"""Quantization side by side: onnxruntime.quantization (the peer) and onnxshrink's passes, on the
four reference models, in one run, each judged by what its task needs.

    python benchmarks/quantize.py [--models digits yolov8n ppocr minilm] [--runs 30] [--calib 16] [--test N]
                                  [--wall-rounds 3]
    python benchmarks/quantize.py --rss-sweep [--models ...] [--sweep-digits 50 500] [--sweep-yolo 8 64]
                                  [--sweep-ppocr 8 64]

Prints a markdown table per run: file size, fidelity on held-out test data (digits: accuracy;
YOLOv8n: class-score and box cosine apart, detection F1 vs fp32 after NMS; PP-OCR det: map
cosine and text-mask IoU; MiniLM: sentence-embedding and hidden-state cosine), latency ratios
vs fp32 (batch 1; 1 and 2 threads; medians of runs interleaved with fp32 and every other
variant of the model in the same loop), and the quantization's wall time and peak RSS, each
quantization in a fresh process (benchmarks/_peak_rss.py) so one tool's memory never counts
against another's. A second table times our minmax quantization against ORT's static ones in
interleaved rounds (`--wall-rounds`), medians. `--rss-sweep` instead measures how calibration
memory and time grow with the sample count. Progress goes to stderr, tables to stdout.

onnxshrink passes that are not registered (yet) show as "not available"; any step that fails
shows its error in its own cell and the run goes on. ORT's MatMulNBitsQuantizer needs the
optional package onnx_ir (`pip install '.[bench]'`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "models"))

import inputs  # noqa: E402
from _report import log, markdown  # noqa: E402
import zoo  # noqa: E402

import onnxshrink  # noqa: E402
from onnxshrink import task_metrics as tm  # noqa: E402
from onnxshrink.runtime import adapt_feeds, interleaved_latency, make_session, run_all  # noqa: E402

# --------------------------------------------------------------------------
# What runs: edit here.
# --------------------------------------------------------------------------
# The peer's settings, by row label: (worker tool, options of the ORT call). Static: QDQ,
# per-channel weights, MinMax, the calibration feeds our passes get (streamed from the same .npz).
PEERS = {
    "ORT static s8": ("ort-static", {"activation_type": "QInt8"}),  # ORT's defaults
    "ORT static u8": ("ort-static", {"activation_type": "QUInt8"}),  # best on x86 (u8 x s8 VNNI), per PEERS.md
    # Histogram calibration: holds every calibration activation (see --rss-sweep); same result as
    # MinMax with its default 128 bins, per PEERS.md.
    "ORT static entropy": ("ort-static", {"activation_type": "QInt8", "calibrate_method": "Entropy"}),
    "ORT dynamic": ("ort-dynamic", {"per_channel": True, "weight_type": "QInt8"}),
    "ORT MatMulNBits 4-bit": ("ort-nbits", {"bits": 4, "block_size": 32, "symmetric": True, "accuracy_level": 4}),
}
# onnxshrink pipelines, run through onnxshrink.compress. minmax is the like-for-like row for
# ORT static (MinMax); the default calibration is mse.
STATIC_INT8 = ["quantize-int8(calibration=minmax)", "quantize-int8", "quantize-int8(calibration=entropy)",
               "mixed-precision(budget=cosine>=0.99)"]
WEIGHT_ONLY = ["quantize-dynamic", "quantize-weights(bits=4,method=rtn)", "quantize-weights(bits=4,method=gptq)"]
# Accuracy aids one at a time against the default row: bias correction off; cross-layer
# equalization (with per-channel weights, and with per-tensor weights, where it is meant to help);
# SmoothQuant for the transformer.
AIDS = ["quantize-int8(bias_correction=false)", "quantize-int8(equalize=true)", "quantize-int8(per_channel=false)",
        "quantize-int8(per_channel=false,equalize=true)"]
# (model -> rows): a name in PEERS is the peer, anything else an onnxshrink pipeline.
PLAN = {
    "digits": ["ORT static s8", "ORT dynamic", *STATIC_INT8, *AIDS, *WEIGHT_ONLY],
    "yolov8n": ["ORT static s8", "ORT static u8", *STATIC_INT8, AIDS[0],  # no Relu-joined pairs to equalize
                "quantize-int8(keep_float=1)"],
    "ppocr": ["ORT static s8", "ORT static u8", *STATIC_INT8, *AIDS, "quantize-int8(keep_float=2)"],
    "minilm": ["ORT static s8", "ORT dynamic", "ORT MatMulNBits 4-bit", *STATIC_INT8, AIDS[0],
               "quantize-int8(smooth=0.5)", *WEIGHT_ONLY],
}
# Calibration samples per model. GPTQ's layer Hessians on MiniLM (K up to 1536) need more tokens
# than 16 short sentences hold; every tool gets the same 128.
CALIBRATION = {"digits": 16, "yolov8n": 16, "ppocr": 16, "minilm": 128}
# --rss-sweep: (model, default sample counts) and the two tools compared.
SWEEP = {"digits": (50, 500), "yolov8n": (8, 64), "ppocr": (8, 64)}
# PP-OCR det: ours only; onnxruntime's quantizer needs 1.5-3 GB for 4 of its images (../shared/PEERS.md).
SWEEP_OURS_ONLY = {"ppocr"}
SWEEP_ROWS = ["ORT static s8", "ORT static entropy", "quantize-int8(calibration=minmax)", "quantize-int8"]

WORKER = Path(__file__).resolve().parent / "_peak_rss.py"
# compress() checks every pass against the original on this many samples, holding them and their
# outputs in memory; kept fixed so ours' peak RSS reflects calibration, not the check.
CHECK_SAMPLES = 8
# Ultralytics' default confidence for predictions, and a lower one: the photos hold few objects this
# detector knows (about 10 boxes in 32 images at 0.25), so F1 at 0.1 rests on more boxes.
# A quantization slower than this shows as timed out, which keeps a full table run near 15 minutes
# on 2 cores; the sweep's large calibration sets get longer.
TABLE_TIMEOUT, SWEEP_TIMEOUT = 150.0, 900.0
YOLO_CONF = (0.25, 0.1)
PPOCR_MASK = 0.3  # PP-OCR DB post-processing's binarization threshold


# --------------------------------------------------------------------------
# Models: held-out test data and their task's fidelity
# --------------------------------------------------------------------------
@dataclass
class TestSet:
    feeds: list[dict]  # evaluated for fidelity
    latency_feed: dict  # batch 1, timed
    labels: np.ndarray | None = None
    about: str = ""  # where the data comes from, printed under the table


@dataclass
class ModelBench:
    title: str
    fetch: Callable[[], Path]
    calib_name: str  # models/inputs.calibration_npz name
    test_set: Callable[[int, int | None], TestSet]  # (calibration count, test count or None) -> TestSet
    reference: Callable[[dict, TestSet], str]  # fp32's own row
    fidelity: Callable[[dict, dict, TestSet], str]  # (fp32 outputs, candidate outputs) by output name


def digits_test(calib: int, count: int | None) -> TestSet:
    # Calibration uses the first rows of the test split (inputs.digits_inputs); test on the rest.
    X, y = zoo.digits_test()
    stop = len(X) if count is None else min(len(X), calib + count)
    return TestSet([{"input": X[calib:stop]}], {"input": X[calib:calib + 1]}, y[calib:stop],
                   f"digits: test split rows {calib}..{stop - 1} (calibration: rows 0..{calib - 1})")


def digits_reference(ref: dict, test: TestSet) -> str:
    return f"acc {tm.top1_accuracy(ref['logits'], test.labels):.4f}"


def digits_fidelity(ref: dict, cand: dict, test: TestSet) -> str:
    return (f"acc {tm.top1_accuracy(cand['logits'], test.labels):.4f}, "
            f"top-1 agree {tm.top1_agreement(ref['logits'], cand['logits']):.4f}")


def yolo_test(calib: int, count: int | None) -> TestSet:
    # inputs.photo(i) for i >= 16 are mirrored, then centre-cropped, variants of the 16 base photos:
    # with 16 calibration photos the test photos show the same scenes, flipped or cropped.
    count = 32 if count is None else count
    feeds = [{"images": inputs.yolo_preprocess(inputs.photo(i))} for i in range(calib, calib + count)]
    return TestSet(feeds, feeds[0], about=f"YOLOv8n: photos {calib}..{calib + count - 1} (calibration 0..{calib - 1}; "
                   "photos past 15 are mirrored/cropped variants of the 16 base photos, so scenes overlap)")


def yolo_reference(ref: dict, test: TestSet) -> str:
    counts = [sum(map(len, tm.yolo_detections(ref["output0"], conf=conf))) for conf in YOLO_CONF]
    return f"boxes in {len(test.feeds)} images: " + ", ".join(f"{n} @{conf}" for n, conf in zip(counts, YOLO_CONF))


def yolo_fidelity(ref: dict, cand: dict, test: TestSet) -> str:
    r, c = ref["output0"], cand["output0"]
    text = f"cls cos {tm.part_cosine(r, c, axis=1, start=4):.3f}, box cos {tm.part_cosine(r, c, axis=1, stop=4):.4f}"
    for conf in YOLO_CONF:
        det = tm.detection_agreement(r, c, iou=0.5, conf=conf)
        text += f", F1@{conf} {det['f1']:.2f} ({det['matched']}/{det['reference']} ref, {det['candidate']} found)"
    return text


def ppocr_test(calib: int, count: int | None) -> TestSet:
    # Each image draws other sentences (3 per image, cycling through the 64) at other places on
    # another photo; backgrounds past 15 are mirrored/cropped variants of the calibration photos.
    count = 16 if count is None else count
    feeds = [{"x": inputs.ppocr_normalize(inputs.render_text_image(i))} for i in range(calib, calib + count)]
    return TestSet(feeds, feeds[0], about=f"PP-OCRv4 det: text images {calib}..{calib + count - 1} (calibration "
                   f"0..{calib - 1}; backgrounds past 15 are variants of the calibration photos, sentences differ)")


def ppocr_reference(ref: dict, test: TestSet) -> str:
    maps = [m for batch in ref["sigmoid_0.tmp_0"] for m in batch]
    return f"text pixels (>{PPOCR_MASK}) {np.mean([np.mean(m > PPOCR_MASK) for m in maps]):.1%}"


def ppocr_fidelity(ref: dict, cand: dict, test: TestSet) -> str:
    r, c = ref["sigmoid_0.tmp_0"], cand["sigmoid_0.tmp_0"]
    iou = tm.mask_iou(r, c, threshold=PPOCR_MASK)
    return f"cos {tm.part_cosine(r, c, axis=0):.3f}, mask IoU {iou['mean']:.3f} mean / {iou['min']:.3f} min"


def minilm_test(calib: int, count: int | None) -> TestSet:
    # Calibration: sentences 0..calib-1 padded to a fixed length; test: the other sentences, unpadded.
    total = len(inputs.sentences())
    stop = total if count is None else min(total, calib + count)
    feeds = inputs.minilm_inputs(stop)[calib:]
    length = inputs.minilm_fixed_length()
    latency_feed = inputs.minilm_inputs(calib + 1, pad_to=length)[calib]
    return TestSet(feeds, latency_feed, about=f"MiniLM: sentences {calib}..{stop - 1} (calibration 0..{calib - 1}); "
                   f"latency on one sentence padded to {length} tokens")


def minilm_reference(ref: dict, test: TestSet) -> str:
    return f"{len(test.feeds)} sentences"


def minilm_fidelity(ref: dict, cand: dict, test: TestSet) -> str:
    per_sentence = tm.row_cosines(ref["sentence_embedding"], cand["sentence_embedding"])
    hidden = tm.part_cosine(ref["last_hidden_state"], cand["last_hidden_state"], axis=0)
    return f"emb cos {per_sentence.mean():.4f} mean / {per_sentence.min():.4f} min, hidden cos {hidden:.4f}"


MODELS = {
    "digits": ModelBench("digits MLP", zoo.digits_mlp, "digits_mlp", digits_test, digits_reference, digits_fidelity),
    "yolov8n": ModelBench("YOLOv8n", zoo.yolov8n, "yolov8n", yolo_test, yolo_reference, yolo_fidelity),
    "ppocr": ModelBench("PP-OCRv4 det", zoo.ppocr_det, "ppocr_det", ppocr_test, ppocr_reference, ppocr_fidelity),
    "minilm": ModelBench("MiniLM-L6", zoo.minilm, "minilm", minilm_test, minilm_reference, minilm_fidelity),
}


# --------------------------------------------------------------------------
# One quantization, in its own process
# --------------------------------------------------------------------------
@dataclass
class Variant:
    label: str
    path: Path | None = None
    wall_s: float | None = None
    pass_s: float | None = None  # ours: the passes alone, without compress()'s check of the result
    rss_mb: float | None = None
    problem: str = ""  # why there is no model: not available / failed
    note: str = ""  # e.g. a pass that was rolled back
    fidelity: str = ""
    latency: dict = field(default_factory=dict)  # threads -> seconds, or an error text


def short(error) -> str:
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= 110 else text[:107] + "..."


def unavailable(label: str) -> str:
    """Why an onnxshrink pipeline cannot run here (a pass not registered yet, an unknown option), or ''."""
    if label in PEERS:
        return ""
    try:
        onnxshrink.parse_pipeline(label)
    except onnxshrink.UsageError as exc:
        return f"not available: {short(exc)}"
    return ""


def quantize(label: str, model: Path, calib: Path, out: Path, timeout: float) -> Variant:
    variant = Variant(label)
    variant.problem = unavailable(label)
    if variant.problem:
        return variant
    tool, settings = PEERS.get(label, ("ours", {}))
    job = {"tool": tool, "model": str(model), "out": str(out), "calib": str(calib), "settings": settings,
           "pipeline": label, "samples": CHECK_SAMPLES}
    try:
        proc = subprocess.run([sys.executable, str(WORKER), json.dumps(job)], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        variant.problem = f"failed: timed out after {timeout:.0f} s"
        return variant
    try:
        report = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        # killed (e.g. out of memory: -9) or crashed inside native code before it could report
        tail = proc.stderr.strip().splitlines()
        variant.problem = f"failed: worker exited {proc.returncode}" + (f" ({short(tail[-1])})" if tail else "")
        return variant
    if not report["ok"]:
        variant.problem = ("not available: " if report.get("unavailable") else "failed: ") + short(report["error"])
        return variant
    variant.path, variant.wall_s, variant.rss_mb, variant.note = out, report["wall_s"], report["rss_mb"], report["note"]
    variant.pass_s = report.get("pass_s")
    return variant


# --------------------------------------------------------------------------
# Fidelity and latency
# --------------------------------------------------------------------------
def outputs_by_name(path: Path, feeds: list[dict]) -> dict:
    session = make_session(onnxshrink.load(path), threads=2)
    names = [o.name for o in session.get_outputs()]
    results = run_all(session, adapt_feeds(feeds, session))
    return {name: [result[i] for result in results] for i, name in enumerate(names)}


def fill_fidelity(bench: ModelBench, variants: list[Variant], test: TestSet, on_candidate=None) -> None:
    """Each variant's task fidelity against variants[0] (fp32) on the test feeds, in its own cell;
    `on_candidate(variant, reference outputs, its outputs)` may take more from the same run."""
    reference = outputs_by_name(variants[0].path, test.feeds)
    variants[0].fidelity = bench.reference(reference, test)
    for variant in variants[1:]:
        if variant.path is None:
            continue
        try:
            candidate = outputs_by_name(variant.path, test.feeds)
            variant.fidelity = bench.fidelity(reference, candidate, test)
            if on_candidate is not None:
                on_candidate(variant, reference, candidate)
        except Exception as exc:  # ORT load/run errors and metric shape errors alike
            variant.fidelity = f"error: {short(exc)}"


def measure_latency(variants: list[Variant], feed: dict, threads: int, runs: int) -> None:
    """All variants that load and run, timed in one interleaved loop; ratios are taken against variants[0] (fp32)."""
    sessions, timed = [], []
    for variant in variants:
        if variant.path is None:
            continue
        try:
            # Several threads: no spinning, or each session's idle pool steals the core the next one runs on.
            session = make_session(onnxshrink.load(variant.path), threads=threads, spinning=threads == 1)
            adapted = adapt_feeds([feed], session)[0]
            session.run(None, adapted)
        except Exception as exc:  # a model that loads for fidelity may still fail here; keep the others timed
            variant.latency[threads] = f"error: {short(exc)}"
            continue
        sessions.append((session, adapted))
        timed.append(variant)
    if not sessions:
        return
    medians = interleaved_latency([s for s, _ in sessions], [f for _, f in sessions], repeats=runs)
    for variant, seconds in zip(timed, medians):
        variant.latency[threads] = seconds


def latency_cell(variant: Variant, base: Variant, threads: int) -> str:
    value, reference = variant.latency.get(threads), base.latency.get(threads)
    if isinstance(value, str):
        return value
    if value is None or not isinstance(reference, float):
        return "—"
    if variant is base:
        return f"1.00 ({value * 1e3:.3g} ms)"
    return f"{value / reference:.2f}"


def wall_cell(variant: Variant) -> str:
    if variant.wall_s is None:
        return "—"
    return f"{variant.wall_s:.1f}" + ("" if variant.pass_s is None else f" ({variant.pass_s:.1f})")


def bench_model(key: str, args, workdir: Path) -> tuple[list[list[str]], str]:
    bench = MODELS[key]
    model = bench.fetch()
    count = args.calib or CALIBRATION[key]
    calib = inputs.calibration_npz(bench.calib_name, workdir / f"{key}-calib.npz", count)
    test = bench.test_set(count, args.test)
    fp32 = Variant("fp32", model)
    variants = [fp32]
    for index, label in enumerate(PLAN[key]):
        log(f"{bench.title}: quantizing with {label}")
        variant = quantize(label, model, calib, workdir / f"{key}-{index}.onnx", args.timeout)
        log(f"  -> {variant.problem or f'{variant.wall_s:.1f} s, {variant.rss_mb:.0f} MB'}")
        variants.append(variant)

    log(f"{bench.title}: fidelity on {len(test.feeds)} test feeds")
    fill_fidelity(bench, variants, test)
    for threads in (1, 2):
        log(f"{bench.title}: latency, {threads} thread(s), {args.runs} interleaved runs")
        measure_latency(variants, test.latency_feed, threads, args.runs)

    base_kb = model.stat().st_size / 1e3
    rows = []
    for variant in variants:
        if variant.path is None:
            rows.append([bench.title, variant.label, "—", "—", "—", "—", "—", "—", "—", variant.problem])
            continue
        kb = variant.path.stat().st_size / 1e3
        rows.append([bench.title, variant.label, f"{kb:,.0f}", f"{kb / base_kb:.3f}", variant.fidelity,
                     latency_cell(variant, fp32, 1), latency_cell(variant, fp32, 2),
                     wall_cell(variant),
                     "—" if variant.rss_mb is None else f"{variant.rss_mb:,.0f}", variant.note])
    return rows, test.about


def error_row(key: str, exc: Exception) -> list[str]:
    return [MODELS[key].title, "(all)", "—", "—", "—", "—", "—", "—", "—", f"failed: {short(exc)}"]


# --------------------------------------------------------------------------
# Wall time, ours vs ORT, interleaved
# --------------------------------------------------------------------------
WALL_OURS = "quantize-int8(calibration=minmax)"


def wall_rounds(args, workdir: Path) -> list[list[str]]:
    """Our minmax quantization and ORT's static ones, each in a fresh process, in turn for
    `--wall-rounds` rounds: one pass each through the table is one sample of a noisy machine."""
    rows = []
    for key in args.models:
        bench = MODELS[key]
        peers = [label for label in PLAN[key] if PEERS.get(label, ("",))[0] == "ort-static"]
        model = bench.fetch()
        calib = inputs.calibration_npz(bench.calib_name, workdir / f"{key}-calib.npz", args.calib or CALIBRATION[key])
        walls = {label: [] for label in [WALL_OURS, *peers]}
        passes = []
        for round_ in range(args.wall_rounds):
            log(f"{bench.title}: wall-time round {round_ + 1} of {args.wall_rounds}")
            for label in walls:
                variant = quantize(label, model, calib, workdir / f"{key}-wall.onnx", args.timeout)
                walls[label].append(variant.wall_s if variant.wall_s is not None else float("nan"))
                if label == WALL_OURS and variant.pass_s is not None:
                    passes.append(variant.pass_s)
        ours = float(np.median(walls[WALL_OURS]))
        for label in peers:
            theirs = float(np.median(walls[label]))
            rows.append([bench.title, label, " / ".join(f"{t:.2f}" for t in walls[WALL_OURS]),
                         " / ".join(f"{t:.2f}" for t in walls[label]), f"{ours / theirs:.2f}",
                         f"{np.median(passes) / theirs:.2f}" if passes else "—"])
    return rows


# --------------------------------------------------------------------------
# --rss-sweep
# --------------------------------------------------------------------------
def rss_sweep(args, workdir: Path) -> list[list[str]]:
    counts = {"digits": args.sweep_digits, "yolov8n": args.sweep_yolo, "ppocr": args.sweep_ppocr}
    rows = []
    for key in (k for k in SWEEP if k in args.models):
        bench = MODELS[key]
        model = bench.fetch()
        for count in counts[key]:
            # ours reads the .npz one sample at a time; ORT's reader streams the same file (_peak_rss.StreamingReader)
            calib = inputs.calibration_npz(bench.calib_name, workdir / f"sweep-{key}-{count}.npz", count)
            for index, label in enumerate(SWEEP_ROWS):
                if key in SWEEP_OURS_ONLY and label in PEERS:
                    continue
                log(f"sweep: {bench.title}, {label}, {count} samples")
                variant = quantize(label, model, calib, workdir / f"sweep-{key}-{count}-{index}.onnx", args.timeout)
                ok = variant.path is not None
                rows.append([bench.title, label, str(count), wall_cell(variant),
                             f"{variant.rss_mb:,.0f}" if ok else "—",
                             f"{variant.path.stat().st_size / 1e3:,.0f}" if ok else "—", variant.problem or variant.note])
    return rows


def print_table(args, rows: list[list[str]], abouts: list[str], start: float) -> None:
    print(markdown(["model", "tool / pipeline", "file KB", "size ×", "fidelity vs fp32 (test data)",
                    "latency × 1 thread", "latency × 2 threads", "quant s (ours: passes alone)", "quant peak RSS MB", "note"], rows))
    counts = ", ".join(f"{MODELS[k].title} {args.calib or CALIBRATION[k]}" for k in args.models)
    print(f"\nCalibration samples: {counts} (models/inputs.calibration_npz), the same .npz for every tool. "
          f"Test data, held out where the inputs allow:")
    for about in abouts:
        print(f"- {about}")
    print(f"\nLatency: batch 1, ratio of medians over {args.runs} runs interleaved with fp32 and every variant of "
          f"the model, in alternating order (< 1 is faster); at 2 threads every session has intra-op spinning off "
          f"(with it, idle pools of the other sessions take the second core: fp32 ran slower at 2 threads than at 1). "
          f"Quantization: one fresh process each, {args.timeout:.0f} s at most; our time "
          f"includes compress()'s check of the result (checker, a session, {CHECK_SAMPLES} runs of each model), the "
          f"passes' own time in brackets; peak RSS = "
          f"the process's high-water mark (VmHWM) minus its value after the imports. YOLOv8n F1: detections after "
          f"class-aware NMS (IoU 0.45, confidence as shown) matched to fp32's at IoU >= 0.5, same class. PP-OCR mask: "
          f"map > {PPOCR_MASK}. ORT static: QDQ, per-channel, MinMax; dynamic: per-channel QInt8; MatMulNBits: 4-bit, "
          f"block 32, symmetric, accuracy_level 4. Total {time.perf_counter() - start:.0f} s.")


# --------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--runs", type=int, default=30, help="timed runs per variant and thread count (interleaved)")
    parser.add_argument("--calib", type=int, default=None,
                        help="calibration samples (images, sentences, rows; default: "
                             + ", ".join(f"{k} {v}" for k, v in CALIBRATION.items()) + ")")
    parser.add_argument("--test", type=int, default=None,
                        help="test samples per model (default: digits the rest of the split, YOLOv8n 32, "
                             "PP-OCR 16, MiniLM the other 64 sentences)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds one quantization may take before its row says it timed out "
                             f"(default {TABLE_TIMEOUT:.0f}; --rss-sweep {SWEEP_TIMEOUT:.0f})")
    parser.add_argument("--wall-rounds", type=int, default=3,
                        help="rounds of the interleaved wall-time comparison, ours minmax vs ORT static (0: skip)")
    parser.add_argument("--wall-only", action="store_true", help="only the wall-time comparison")
    parser.add_argument("--rss-sweep", action="store_true",
                        help="instead of the table: peak RSS and time of calibration at two sample counts")
    parser.add_argument("--sweep-digits", type=int, nargs=2, default=SWEEP["digits"], metavar=("FEW", "MANY"))
    parser.add_argument("--sweep-yolo", type=int, nargs=2, default=SWEEP["yolov8n"], metavar=("FEW", "MANY"))
    parser.add_argument("--sweep-ppocr", type=int, nargs=2, default=SWEEP["ppocr"], metavar=("FEW", "MANY"))
    args = parser.parse_args()

    args.timeout = args.timeout or (SWEEP_TIMEOUT if args.rss_sweep else TABLE_TIMEOUT)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="onnxshrink-quantize-") as folder:
        workdir = Path(folder)
        if args.rss_sweep:
            print(markdown(["model", "tool / pipeline", "calibration samples", "quant s (ours: passes alone)", "peak RSS MB", "file KB",
                            "note"], rss_sweep(args, workdir)))
            print(f"\nEach row in a fresh process; peak RSS = the process's high-water mark (VmHWM) minus its value "
                  f"after the imports. Our pass reads the .npz one sample at a time; ORT's reader streams the same "
                  f"file. compress() also checks the result on {CHECK_SAMPLES} samples. Digits counts past 540 repeat "
                  f"rows; YOLOv8n images past 16 are mirrored/cropped photos. Total {time.perf_counter() - start:.0f} s.")
            return 0
        rows, abouts = [], []
        for key in ([] if args.wall_only else args.models):
            try:
                model_rows, about = bench_model(key, args, workdir)
                rows += model_rows
                abouts.append(about)
            except Exception as exc:  # a model that cannot be fetched or fed must not end the run
                log(f"{key}: {exc!r}")
                rows.append(error_row(key, exc))
    if not args.wall_only:
        print_table(args, rows, abouts, start)
    if args.wall_rounds:
        with tempfile.TemporaryDirectory(prefix="onnxshrink-quantize-") as folder:
            rows = wall_rounds(args, Path(folder))
        print()
        print(markdown(["model", "peer", f"ours {WALL_OURS} s, by round", "peer s, by round",
                        "ours / peer (medians)", "passes alone / peer"], rows))
        print(f"\nEach quantization in a fresh process, ours and the peers in turn, {args.wall_rounds} rounds; ours "
              f"is compress() with its default check of the result ({CHECK_SAMPLES} samples). "
              f"Total {time.perf_counter() - start:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
