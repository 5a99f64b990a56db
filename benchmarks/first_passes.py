"""cleanup, dedup and fp16 on the four reference models, real inputs.

Prints, per model and pass: nodes, bytes ratio, worst cosine and max relative error against
the original, and the latency ratio (candidate / original, batch 1, 1 thread, medians of
interleaved runs in this same process). Run: python benchmarks/first_passes.py [--runs N]
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "models"))

import inputs  # noqa: E402
import zoo  # noqa: E402

import onnxshrink  # noqa: E402
from onnxshrink.report import table  # noqa: E402
from onnxshrink.runtime import adapt_feeds, interleaved_latency, make_session  # noqa: E402

MODELS = {
    "digits MLP": (zoo.digits_mlp, lambda: inputs.digits_inputs(32)),
    "YOLOv8n": (zoo.yolov8n, lambda: inputs.yolov8n_inputs(8)),
    "PP-OCRv4 det": (zoo.ppocr_det, lambda: inputs.ppocr_det_inputs(4)),
    "MiniLM-L6": (zoo.minilm, lambda: inputs.minilm_inputs(16)),
}
PIPELINES = ["cleanup", "dedup", "fp16", "fp16(compute=fp16)", "cleanup,dedup,fp16"]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=50, help="timed runs per model (interleaved)")
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    args = parser.parse_args()
    rows = []
    for name in args.models:
        fetch, make_feeds = MODELS[name]
        path, feeds = fetch(), make_feeds()
        original = onnxshrink.load(path)
        for pipeline in PIPELINES:
            start = time.perf_counter()
            result = onnxshrink.compress(original, pipeline, calibration=feeds, samples=len(feeds))
            wall = time.perf_counter() - start
            fid = result.report.fidelity
            sessions = [make_session(original, threads=1), make_session(result.model, threads=1)]
            feed_pair = [feeds[0], adapt_feeds(feeds[:1], sessions[1])[0]]
            base, cand = interleaved_latency(sessions, feed_pair, repeats=args.runs)
            rows.append([name, pipeline, f"{result.report.input.nodes}->{result.report.output.nodes}",
                         f"{result.report.output.bytes / result.report.input.bytes:.3f}", f"{fid['cosine']:.7f}",
                         f"{fid['max_rel']:.1e}", f"{base * 1e3:.3f}", f"{cand / base:.3f}", f"{wall:.1f}",
                         ",".join(p.status for p in result.report.passes)])
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    print(table(["model", "pipeline", "nodes", "bytes ratio", "cosine", "max rel err", "fp32 ms",
                 "latency ratio", "tool s", "status"], rows, "llrrrrrrrl"))
    print(f"\nlatency: batch 1, 1 thread, median of {args.runs} interleaved runs each; ratios < 1 are faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
