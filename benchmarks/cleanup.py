"""Graph cleanup side by side: onnxshrink's `cleanup` pass, `onnxslim.slim(model)` and
`onnxsim.simplify(model)` (both with their defaults), on the reference models and the foreign
models that ship in PyPI packages, in one run.

    python benchmarks/cleanup.py [--models yolov8n ppocr_det ...] [--runs 20] [--samples 4]
    python benchmarks/cleanup.py --node-tests        # onnx's backend node tests through cleanup

For every model and tool: nodes in the file, nodes onnxruntime runs after its own optimizer
(`SessionOptions.optimized_model_filepath`, default level, subgraphs included), file size,
`onnx.checker.check_model(full_check=True)`, the largest output difference on real inputs relative
to the output's largest magnitude and whether every output keeps its shape, latency relative to
the original (1 thread, medians of interleaved runs), and the tool's wall time and peak RSS (fresh
processes; RSS is the high-water mark, VmHWM, minus its value after the imports, as in
_peak_rss.py). The last column compares ours with the better of the peers that kept every output
(within 1e-6 relative, same shapes) and did not crash.

Our pass gets real check samples (other samples than the ones judged), as `--calib` would give it:
its weight folds are kept only within its tolerance on them. "ours-1e-4" is the same pass with
`tolerance=1e-4`, to show what those folds give where they move outputs by more than 1e-6.

Peers are imported from the environment: `pip install onnxslim==0.1.98 onnxsim==0.8.1` (or put
them on PYTHONPATH). A missing peer shows as "not available". Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from _report import log, markdown, peak_rss_mb

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "models"))

WORKER_TIMEOUT = 600.0
# "ours": the cleanup pass with its defaults, given real check samples (as `--calib` would); "ours-1e-4"
# also keeps weight folds that move outputs by up to 1e-4 of their largest magnitude.
TOOLS = ("ours", "ours-1e-4", "onnxslim", "onnxsim")
OUR_OPTIONS = {"ours": {}, "ours-1e-4": {"tolerance": 1e-4}}


# --------------------------------------------------------------------------
# Models and their real inputs
# --------------------------------------------------------------------------
@dataclass
class Model:
    key: str
    title: str
    path: object  # () -> Path
    feeds: object  # (n) -> list of feed dicts
    about: str
    input_shapes: dict | None = None  # for the static-shape rows: input name -> dims


def _zoo(name):
    def fetch():
        import zoo
        return zoo.get(name)
    return fetch


def _foreign(name):
    def fetch():
        import foreign
        return foreign.fetch(name)
    return fetch


def _yolo_feeds(n):
    import inputs
    return inputs.yolov8n_inputs(n)


def _ppocr_det_feeds(n):
    import inputs
    return inputs.ppocr_det_inputs(n)


def _minilm_feeds(n):
    import inputs
    single = inputs.minilm_inputs(n)
    batched = inputs.minilm_batches(2, 2)  # batch 2, padded: a second batch size and an attention mask with zeros
    return single[: max(n - 1, 1)] + batched[:1]


def _text_strip(index: int, height: int, width: int, grey: bool = False) -> np.ndarray:
    """A strip of one of models/inputs.py's text images (photo + rendered sentences), resized."""
    import inputs
    from PIL import Image

    image = inputs.render_text_image(index)
    rows = image.shape[0]
    top = (index * 37) % max(rows - 90, 1)
    strip = Image.fromarray(image[top:top + 90])
    if grey:
        strip = strip.convert("L")
    return np.asarray(strip.resize((width, height), Image.BILINEAR))


def _ppocr_rec_feeds(n):
    # PP-OCR recognition: height 48, width free; x/255 normalised to [-1, 1]
    feeds = []
    for i in range(n):
        width = (320, 480)[i % 2]
        x = _text_strip(i, 48, width).astype(np.float32) / 255.0
        feeds.append({"x": np.ascontiguousarray(((x - 0.5) / 0.5).transpose(2, 0, 1)[None])})
    return feeds


def _ppocr_cls_feeds(n):
    feeds = []
    for i in range(n):
        x = _text_strip(i, 48, 192).astype(np.float32) / 255.0
        feeds.append({"x": np.ascontiguousarray(((x - 0.5) / 0.5).transpose(2, 0, 1)[None])})
    return feeds


def _ddddocr_det_feeds(n):
    import inputs
    return [{"images": np.ascontiguousarray(inputs.letterbox(inputs.photo(i), 416).astype(np.float32)
                                            .transpose(2, 0, 1)[None])} for i in range(n)]


def _ddddocr_ocr_feeds(n):
    feeds = []
    for i in range(n):
        width = (160, 256, 224)[i % 3]
        x = _text_strip(i, 64, width, grey=True).astype(np.float32) / 255.0
        feeds.append({"input1": np.ascontiguousarray(((x - 0.5) / 0.5)[None, None])})
    return feeds


def _magika_feeds(n):
    # Magika's features: the first and last 1024 bytes of a file (whitespace stripped), padded with 256.
    import inputs
    import onnx
    files = [Path(inputs.__file__), Path(onnx.__file__), Path(np.__file__).parent / "core" / "_multiarray_umath.py",
             REPO / "README.md", Path(onnx.__file__).parent / "onnx_ml_pb2.py", REPO / "models" / "sentences.txt"]
    feeds = []
    for k in range(n):
        data = files[k % len(files)].read_bytes().strip()
        begin = list(data[:1024]) + [256] * max(0, 1024 - len(data))
        end = [256] * max(0, 1024 - len(data)) + list(data[-1024:])
        feeds.append({"bytes": np.array([begin + end], dtype=np.int32)})
    return feeds


def _audio(seconds: float = 2.0, rate: int = 16000) -> np.ndarray:
    """A deterministic speech-like signal (no audio ships in the dependencies): voiced segments with a
    gliding pitch and formant-like harmonics, separated by quiet noise."""
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * rate)) / rate
    pitch = 140 + 30 * np.sin(2 * np.pi * 1.3 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    envelope = (np.sin(2 * np.pi * 0.7 * t) > -0.2).astype(float)
    return (0.3 * voiced * envelope + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def _silero_feeds(state_names: tuple, state_shape: tuple):
    """Feeds of a streaming run: consecutive chunks at 16 kHz (512 samples) and 8 kHz (256), each
    with the state the original model returned for the chunk before."""
    def build(n, path):
        import onnxruntime as ort
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        audio = _audio()
        feeds = []
        for rate, chunk in ((16000, 512), (8000, 256)):
            states = {name: np.zeros(state_shape, np.float32) for name in state_names}
            count = max(n // 2, 1)
            for k in range(count):
                feed = {"input": audio[None, k * chunk:(k + 1) * chunk].copy(), "sr": np.array(rate, np.int64), **states}
                feeds.append(feed)
                outputs = session.run(None, feed)
                states = dict(zip(state_names, outputs[1:1 + len(state_names)]))
        return feeds
    return build


def _silero_seq_feeds(n):
    audio = _audio()
    frames = np.stack([audio[k * 512: k * 512 + 576] for k in range(8)])
    zeros = np.zeros((1, 1, 128), np.float32)
    return [{"input": frames[: 4 + k % 5].copy(), "h": zeros, "c": zeros} for k in range(n)]


MODELS = {m.key: m for m in [
    Model("yolov8n", "YOLOv8n (NudeNet 320n)", _zoo("yolov8n"), _yolo_feeds,
          "torch 2.3, opset 17, dynamic dims; scikit-image photos letterboxed to 320"),
    Model("yolov8n_static", "YOLOv8n, input 1x3x320x320", _zoo("yolov8n"), _yolo_feeds,
          "the same file with its input fixed by each tool's input-shape option",
          input_shapes={"images": [1, 3, 320, 320]}),
    Model("ppocr_det", "PP-OCRv4 det", _zoo("ppocr_det"), _ppocr_det_feeds,
          "paddle2onnx, opset 12; photos with rendered sentences"),
    Model("minilm", "MiniLM-L6", _zoo("minilm"), _minilm_feeds,
          "torch legacy exporter, opset 17; sentences, batch 1 and a padded batch of 2"),
    Model("ppocr_rec", "PP-OCRv4 rec", _foreign("ppocr_rec"), _ppocr_rec_feeds,
          "paddle2onnx, opset 12; text strips 48x320 and 48x480"),
    Model("ppocr_cls", "PP-OCR mobile cls", _foreign("ppocr_cls"), _ppocr_cls_feeds,
          "PaddlePaddle, opset 11, IR 7; text strips 48x192"),
    Model("ddddocr_det", "ddddocr det (YOLOX)", _foreign("ddddocr_det"), _ddddocr_det_feeds,
          "torch 1.9, opset 11; photos letterboxed to 416"),
    Model("ddddocr_ocr", "ddddocr ocr (CNN+BiLSTM)", _foreign("ddddocr_ocr"), _ddddocr_ocr_feeds,
          "torch 1.9, opset 12, RNN; grey text strips of height 64, widths 160-256"),
    Model("ddddocr_old", "ddddocr old (quantized)", _foreign("ddddocr_old"), _ddddocr_ocr_feeds,
          "onnx.quantize, opset 12, ConvInteger; grey text strips"),
    Model("magika", "Magika v3.3", _foreign("magika"), _magika_feeds,
          "tf2onnx, opset 15; bytes of real files"),
    Model("silero_vad_v5", "Silero VAD v5", _foreign("silero_vad_v5"), None,
          "spox, opset 16, 25 If; streaming chunks at 16 and 8 kHz"),
    Model("silero_vad_op15", "Silero VAD op15", _foreign("silero_vad_op15"), None,
          "torch 2.3, opset 15, 12 If + LSTM; streaming chunks"),
    Model("silero_vad_v4", "Silero VAD v4", _foreign("silero_vad_v4"), None,
          "torch 1.12, opset 16, 9 If + 8 LSTM; streaming chunks"),
    Model("silero_vad_seq", "Silero VAD sequence", _foreign("silero_vad_seq"), lambda n: _silero_seq_feeds(n),
          "torch 2.11, opset 16, LSTM; 4-8 frames of 576 samples"),
]}
_SILERO_STATES = {"silero_vad_v5": (("state",), (2, 1, 128)), "silero_vad_op15": (("state",), (2, 1, 128)),
                  "silero_vad_v4": (("h", "c"), (2, 1, 64))}


def model_feeds(key: str, n: int, path: Path) -> list:
    if key in _SILERO_STATES:
        return _silero_feeds(*_SILERO_STATES[key])(n, path)
    return MODELS[key].feeds(n)


# --------------------------------------------------------------------------
# One tool on one model, in its own process
# --------------------------------------------------------------------------
def worker(job: dict) -> dict:
    # Every tool's libraries are imported before the baseline, so all jobs subtract the same.
    import pickle

    import onnx
    import onnxruntime  # noqa: F401 - imported before the baseline like every other library

    import onnxshrink
    from onnxshrink.calibration import open_data
    from onnxshrink.pass_base import PassContext
    from onnxshrink.passes.cleanup import Cleanup
    available = {"ours": True, "ours-1e-4": True}
    try:
        import onnxslim
        available["onnxslim"] = True
    except ImportError:
        available["onnxslim"] = False
    try:
        import onnxsim
        available["onnxsim"] = True
    except ImportError:
        available["onnxsim"] = False
    tool, shapes = job["tool"], job.get("input_shapes")
    if not available[tool]:
        return {"ok": False, "unavailable": True, "error": f"{tool} is not installed"}
    check = None
    if job.get("check"):
        with open(job["check"], "rb") as handle:  # written by this script's parent process
            check = pickle.load(handle)
    base = peak_rss_mb()
    start = time.perf_counter()
    note = ""
    try:
        model = onnx.load(job["model"])
        if tool in OUR_OPTIONS:
            spec = [f"{name}:{'x'.join(map(str, dims))}" for name, dims in (shapes or {}).items()]
            context = PassContext(data=open_data(check, model), data_is_real=True) if check else PassContext()
            # run() on the freshly loaded (so private) model: the pass itself, without Pass.apply's
            # before/after statistics for the report or compress()'s validation of the result.
            result = Cleanup(input_shapes=tuple(spec), **OUR_OPTIONS[tool]).run(model, context)
            out = result.model
            note = "; ".join(n.message for n in result.notes if "weight folds" in n.message)
        elif tool == "onnxslim":
            kwargs = {"input_shapes": [f"{k}:{','.join(map(str, v))}" for k, v in shapes.items()]} if shapes else {}
            out = onnxslim.slim(model, **kwargs)
        else:
            kwargs = {"overwrite_input_shapes": shapes} if shapes else {}
            out, ok = onnxsim.simplify(model, **kwargs)
            if not ok:
                note = "onnxsim reported its check failed"
        onnx.save(out, job["out"])
    except Exception as exc:  # every tool raises its own types; the row shows the message
        traceback.print_exc(file=sys.stderr)
        lines = str(exc).strip().splitlines()
        return {"ok": False, "unavailable": False, "error": f"{type(exc).__name__}: {lines[0] if lines else ''}"}
    return {"ok": True, "wall_s": time.perf_counter() - start, "rss_mb": peak_rss_mb() - base, "note": note,
            "onnxshrink": onnxshrink.__file__}


@dataclass
class Run:
    tool: str
    path: Path | None = None
    wall_s: float | None = None
    rss_mb: float | None = None
    problem: str = ""
    note: str = ""
    nodes: int | None = None
    ort_nodes: int | str | None = None
    kb: float | None = None
    full_check: str = ""
    max_rel: float | None = None
    shapes_ok: bool | None = None
    outputs_problem: str = ""
    latency: float | str | None = None

    @property
    def valid(self) -> bool:
        """Kept every output (within 1e-6 relative, same shapes) and did not crash."""
        return self.path is not None and not self.outputs_problem and self.max_rel is not None and \
            self.max_rel <= 1e-6 and bool(self.shapes_ok) and isinstance(self.ort_nodes, int)


def run_tool(tool: str, model: Path, out: Path, shapes: dict | None, timeout: float, check: Path | None,
             repeats: int = 1) -> Run:
    """The tool in a fresh process, `repeats` times (this machine is shared: the median time is steadier)."""
    run = Run(tool)
    job = {"tool": tool, "model": str(model), "out": str(out), "input_shapes": shapes,
           "check": str(check) if check else None}
    reports = []
    for _ in range(repeats):
        try:
            proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            run.problem = f"timed out after {timeout:.0f} s"
            return run
        try:
            report = json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            tail = proc.stderr.strip().splitlines()
            run.problem = f"crashed (exit {proc.returncode})" + (f": {tail[-1][:120]}" if tail else "")
            return run
        if not report["ok"]:
            run.problem = ("not available: " if report.get("unavailable") else "crashed: ") + report["error"][:160]
            return run
        reports.append(report)
    run.path, run.note = out, reports[-1]["note"]
    run.wall_s = float(np.median([r["wall_s"] for r in reports]))
    run.rss_mb = float(np.median([r["rss_mb"] for r in reports]))
    return run


# --------------------------------------------------------------------------
# Judging a file
# --------------------------------------------------------------------------
def count_nodes(graph) -> int:
    from onnxshrink.graph import walk_nodes
    return sum(1 for _ in walk_nodes(graph))


def ort_node_count(path: Path) -> int:
    """Nodes (subgraphs included) in the model onnxruntime writes after its default optimizations."""
    import onnx
    import onnxruntime as ort
    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 4
        options.optimized_model_filepath = str(Path(folder) / "optimized.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return count_nodes(onnx.load(options.optimized_model_filepath, load_external_data=False).graph)


def session(path: Path):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 4
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def judge(run: Run, original: Path, reference: list, names: list, feeds: list, shapes: dict | None) -> None:
    import onnx

    from onnxshrink.fidelity import output_metrics, summarize
    run.kb = run.path.stat().st_size / 1e3
    run.nodes = count_nodes(onnx.load(str(run.path), load_external_data=False).graph)
    try:
        onnx.checker.check_model(str(run.path), full_check=True)
        run.full_check = "ok"
    except Exception as exc:  # the checker raises several types
        run.full_check = "FAIL: " + str(exc).strip().splitlines()[0][:80]
    try:
        run.ort_nodes = ort_node_count(run.path)
    except Exception as exc:  # onnxruntime refuses the file
        run.ort_nodes = "load fails"
        run.outputs_problem = "onnxruntime cannot load it: " + str(exc).strip().splitlines()[0][:80]
        return
    try:
        sess = session(run.path)
        out_names = [o.name for o in sess.get_outputs()]
        if out_names != names:
            run.outputs_problem = f"outputs {out_names} instead of {names}"
            return
        candidate = [sess.run(None, feed) for feed in feeds]
    except Exception as exc:  # a run that fails is a changed output
        run.outputs_problem = "run fails: " + str(exc).strip().splitlines()[0][:100]
        return
    per_output = output_metrics(names, reference, candidate)
    run.shapes_ok = all(np.shape(r) == np.shape(c) for ref, cand in zip(reference, candidate) for r, c in zip(ref, cand))
    run.max_rel = summarize(per_output).get("max_rel", 0.0)


def measure_latency(runs: list[Run], original: Path, feed: dict, repeats: int) -> float:
    """Medians of interleaved runs; small models get more runs (about 8 s of timing per model)."""
    from onnxshrink.runtime import interleaved_latency
    timed = [r for r in runs if r.path is not None and not r.outputs_problem]
    sessions = [session(original)] + [session(r.path) for r in timed]
    start = time.perf_counter()
    for _ in range(3):
        sessions[0].run(None, feed)
    once = (time.perf_counter() - start) / 3
    repeats = max(repeats, min(2000, int(8.0 / max(once * len(sessions), 1e-6))))
    medians = interleaved_latency(sessions, feed, repeats=repeats)
    for run, seconds in zip(timed, medians[1:]):
        run.latency = seconds / medians[0]
    return medians[0]


# --------------------------------------------------------------------------
def bench_model(key: str, args, workdir: Path) -> tuple[list[list[str]], dict]:
    import pickle

    bench = MODELS[key]
    path = Path(bench.path())
    # Every other sample judges the outputs; the ones between are our pass's check samples.
    samples = model_feeds(key, 2 * args.samples, path)
    feeds, check = samples[0::2], samples[1::2]
    check_path = workdir / f"{key}-check.pkl"
    with open(check_path, "wb") as handle:
        pickle.dump(check, handle)
    ref_session = session(path)
    names = [o.name for o in ref_session.get_outputs()]
    reference = [ref_session.run(None, feed) for feed in feeds]
    original = Run("original", path)
    original.kb = path.stat().st_size / 1e3
    import onnx
    original.nodes = count_nodes(onnx.load(str(path), load_external_data=False).graph)
    original.ort_nodes = ort_node_count(path)
    try:
        onnx.checker.check_model(str(path), full_check=True)
        original.full_check = "ok"
    except Exception as exc:  # noqa: BLE001
        original.full_check = "FAIL: " + str(exc).strip().splitlines()[0][:80]
    runs = []
    for tool in args.tools:
        log(f"{bench.title}: {tool}")
        run = run_tool(tool, path, workdir / f"{key}-{tool}.onnx", bench.input_shapes, args.timeout, check_path,
                       args.tool_repeats)
        if run.path is not None:
            judge(run, path, reference, names, feeds, bench.input_shapes)
        log(f"  -> {run.problem or run.outputs_problem or f'{run.wall_s:.2f} s, ORT nodes {run.ort_nodes}'}")
        runs.append(run)
    base_ms = measure_latency(runs, path, feeds[0], args.runs)
    ours = next((r for r in runs if r.tool == "ours"), None)
    peers = [r for r in runs if r.tool not in OUR_OPTIONS and r.valid]
    bar = min((r.ort_nodes for r in peers), default=None)
    verdict = "—"
    if ours is not None and ours.valid and bar is not None:
        verdict = "fewer" if ours.ort_nodes < bar else ("equal" if ours.ort_nodes == bar else "MORE")
    elif ours is not None and ours.valid:
        verdict = "no valid peer"
    elif ours is not None:
        verdict = "OURS INVALID"
    rows = [[bench.title, "original", str(original.nodes), str(original.ort_nodes), f"{original.kb:,.0f}",
             original.full_check, "—", "—", f"1.00 ({base_ms * 1e3:.3g} ms)", "—", "—", ""]]
    for run in runs:
        if run.path is None:
            rows.append([bench.title, run.tool] + ["—"] * 9 + [run.problem])
            continue
        ratio = f"{run.latency:.3f}" if isinstance(run.latency, float) else "—"
        rel = "—" if run.max_rel is None else f"{run.max_rel:.1e}"
        shapes = "—" if run.shapes_ok is None else ("same" if run.shapes_ok else "CHANGED")
        note = "; ".join(x for x in [run.outputs_problem, run.note,
                                     "larger than the input" if run.kb > original.kb else ""] if x)
        if run.tool == "ours":
            note = "; ".join(x for x in [note, f"vs best valid peer: {verdict}" + (f" ({bar})" if bar is not None else "")] if x)
        rows.append([bench.title, run.tool, str(run.nodes), str(run.ort_nodes), f"{run.kb:,.0f}", run.full_check,
                     rel, shapes, ratio, f"{run.wall_s:.2f}", f"{run.rss_mb:,.0f}", note])
    summary = {"model": key, "verdict": verdict, "bar": bar, "ours": ours.ort_nodes if ours else None,
               "ours_valid": bool(ours and ours.valid), "latency": {r.tool: r.latency for r in runs},
               "wall": {r.tool: r.wall_s for r in runs}, "full_check": {r.tool: r.full_check for r in runs},
               "kb": {r.tool: r.kb for r in runs}, "original_kb": original.kb}
    return rows, summary


# --------------------------------------------------------------------------
# onnx's backend node tests
# --------------------------------------------------------------------------
def node_tests(limit: int | None) -> int:
    sys.path.insert(0, str(REPO / "tests"))
    from test_cleanup import sweep_node_tests  # noqa: E402 - the test's own sweep, so both judge alike
    result = sweep_node_tests(every=limit or 1, log=log)
    print(f"onnx backend node tests: {result['cases']} models, {result['ort_refused']} refused by onnxruntime "
          f"as given (skipped), {result['crashes']} crashes, {result['changed']} changed outputs, "
          f"{result['invalid']} invalid results, {result['modified']} modified by cleanup; {result['seconds']:.0f} s")
    for line in result["problems"][:40]:
        print(f"- {line}")
    return 1 if result["crashes"] or result["changed"] or result["invalid"] else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--tools", nargs="*", default=list(TOOLS), choices=list(TOOLS))
    parser.add_argument("--runs", type=int, default=20, help="timed runs per model and tool (interleaved)")
    parser.add_argument("--samples", type=int, default=4, help="real input samples per model for the output check")
    parser.add_argument("--timeout", type=float, default=WORKER_TIMEOUT)
    parser.add_argument("--tool-repeats", type=int, default=3, help="fresh-process runs of each tool (median time)")
    parser.add_argument("--node-tests", action="store_true", help="instead: onnx's backend node tests through cleanup")
    parser.add_argument("--node-limit", type=int, default=None, help="with --node-tests: only every k-th case")
    parser.add_argument("--json", help="also write the per-model summary here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.node_tests:
        return node_tests(args.node_limit)
    start = time.perf_counter()
    rows, summaries, abouts = [], [], []
    with tempfile.TemporaryDirectory(prefix="onnxshrink-cleanup-bench-") as folder:
        for key in args.models:
            try:
                model_rows, summary = bench_model(key, args, Path(folder))
            except Exception as exc:  # a model that cannot be fetched or fed must not end the run
                log(f"{key}: {exc!r}")
                traceback.print_exc(file=sys.stderr)
                model_rows, summary = [[MODELS[key].title, "(all)"] + ["—"] * 9 + [f"failed: {exc}"]], {"model": key}
            rows += model_rows
            summaries.append(summary)
            abouts.append(f"{MODELS[key].title}: {MODELS[key].about}")
    print(markdown(["model", "tool", "nodes", "nodes after ORT opt", "file KB", "full_check", "max rel. diff",
                    "output shapes", "latency × (1 thread)", "tool s", "tool peak RSS MB", "note"], rows))
    judged = [s for s in summaries if s.get("verdict") not in (None, "—")]
    fewer = sum(s["verdict"] == "fewer" for s in judged)
    equal = sum(s["verdict"] == "equal" for s in judged)
    more = sum(s["verdict"] == "MORE" for s in judged)
    no_bar = sum(s["verdict"] == "no valid peer" for s in judged)
    invalid = sum(s["verdict"] == "OURS INVALID" for s in judged)
    print(f"\nNodes after onnxruntime's optimizer, ours vs the better valid peer (a peer that changed an output by more "
          f"than 1e-6 relative, changed a shape or crashed sets no bar): fewer on {fewer}, equal on {equal}, more on "
          f"{more}, no valid peer on {no_bar}, ours invalid on {invalid}, of {len(judged)} models.")
    print("\nInputs:")
    for about in abouts:
        print(f"- {about}")
    print(f"\n'max rel. diff': the largest |difference| over all outputs and samples divided by the output's largest "
          f"magnitude, on {args.samples} real samples per model (onnxruntime, 1 thread, default optimizations). "
          f"Latency: median of at least {args.runs} runs (more for fast models: about 8 s of timing per model) interleaved "
          f"with the original and the other tools' files, batch as fed, "
          f"relative to the original (< 1 is faster). Tool time and peak RSS: median of {args.tool_repeats} fresh processes, each loading, processing and "
          f"saving; ours is the cleanup pass's run() (Pass.apply adds its report statistics, onnxshrink.compress its validation). Total {time.perf_counter() - start:.0f} s.")
    if args.json:
        Path(args.json).write_text(json.dumps(summaries, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
