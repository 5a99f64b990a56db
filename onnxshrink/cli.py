"""The `onnxshrink` command. Exit codes: 0 done, 1 bad input or failed run, 2 usage error."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from pathlib import Path

from .errors import OnnxShrinkError, UsageError

log = logging.getLogger("onnxshrink")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, like every other usage error
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    common.add_argument("-v", "--verbose", action="store_true", help="print progress details and tracebacks")
    parser = _Parser(prog="onnxshrink", description="Compress ONNX models by rewriting their graphs.", parents=[common])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("compress", parents=[common], help="run a pass pipeline on a model")
    p.add_argument("model", help="input .onnx (never modified)")
    p.add_argument("-o", "--output", required=True, help="output .onnx (written atomically)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("-p", "--pipeline", help="e.g. 'cleanup,dedup,fp16'")
    how.add_argument("--recipe", help="YAML or JSON recipe file")
    p.add_argument("--calib", help=".npz (one array per input) or a folder of .npz files")
    p.add_argument("--max-drift", help="roll back a pass that breaks this, e.g. 'cosine>=0.99,top1>=0.98'")
    p.add_argument("--samples", type=int, default=None, help="samples used to check fidelity (default 8)")
    p.add_argument("--report", help="write the report as JSON here")
    p.add_argument("--strict", action="store_true", help="exit 1 when any pass was rolled back")

    p = sub.add_parser("inspect", parents=[common], help="opsets, ops, params, bytes, sparsity, inputs/outputs")
    p.add_argument("model")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("compare", parents=[common], help="fidelity, size and latency of CAND against REF")
    p.add_argument("reference")
    p.add_argument("candidate")
    p.add_argument("--data", help=".npz or folder of .npz files (default: synthesized inputs)")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--runs", type=int, default=30, help="timed runs per model (0: no latency)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("sensitivity", parents=[common], help="per-layer output drift vs pruning sparsity")
    p.add_argument("model", help="input .onnx")
    p.add_argument("--calib", required=True, help=".npz (one array per input) or a folder of .npz files")
    p.add_argument("--sparsities", help="comma-separated, each in [0, 1) (default 0.3,0.5,0.7,0.8,0.9)")
    p.add_argument("--method", choices=("magnitude", "obs"), default="magnitude")
    p.add_argument("--pattern", choices=("unstructured", "2:4", "4:8"), default="unstructured",
                   help="N:M patterns fix the sparsity at 1 - N/M")
    p.add_argument("--samples", type=int, default=8, help="calibration samples per measurement (default 8)")
    p.add_argument("--png", help="plot drift vs sparsity here (needs matplotlib: onnxshrink[plot])")
    p.add_argument("--json", help="write the table as JSON here")

    p = sub.add_parser("pack", parents=[common], help="entropy-code a model losslessly into an .onnxz file")
    p.add_argument("model", help="input .onnx (never modified)")
    p.add_argument("-o", "--output", required=True, help="output .onnxz (written atomically)")
    p.add_argument("--level", type=int, default=None,
                   help="zstd level 1-22 (default 12; streams that LZMA codes smaller take LZMA)")
    p.add_argument("--reference", help="the uncompressed original .onnx: report bits per weight of it")

    p = sub.add_parser("unpack", parents=[common], help="restore the exact .onnx bytes from an .onnxz file")
    p.add_argument("model", help="input .onnxz")
    p.add_argument("-o", "--output", required=True, help="output .onnx (written atomically)")

    p = sub.add_parser("passes", parents=[common], help="every pass with its options")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("demo", parents=[common], help="compress the embedded digits network and show the figures")
    p.add_argument("-p", "--pipeline", default=None, help="pipeline to demonstrate (default: cleanup,dedup,fp16)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    verbose = "-v" in argv or "--verbose" in argv
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(format="onnxshrink: %(message)s", stream=sys.stderr,
                            level=logging.ERROR if args.quiet else logging.INFO if args.verbose else logging.WARNING)
        return COMMANDS[args.command](args) or 0
    except OnnxShrinkError as exc:
        if verbose:
            traceback.print_exc()
        print(f"onnxshrink: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("onnxshrink: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug of ours: still one line unless -v, but say it is internal
        if verbose:
            traceback.print_exc()
        text = str(exc).splitlines()[0] if str(exc) else ""
        print(f"onnxshrink: internal error: {type(exc).__name__}: {text} (run with -v for details)", file=sys.stderr)
        return 1


def _compress(args) -> int:
    from .io import load, save
    from .manager import compress
    from .pipeline import load_recipe

    if Path(args.output).resolve() == Path(args.model).resolve():
        raise UsageError("the output path is the input path; onnxshrink never overwrites its input")
    if not Path(args.output).resolve().parent.is_dir():
        raise OnnxShrinkError(f"{args.output}: output folder does not exist")
    if args.recipe:
        recipe = load_recipe(args.recipe)
        pipeline, drift, samples = recipe.pipeline, args.max_drift or recipe.max_drift, args.samples or recipe.samples
    else:
        from .pipeline import parse_pipeline

        pipeline, drift, samples = parse_pipeline(args.pipeline), args.max_drift, args.samples
    model = load(args.model)
    result = compress(model, pipeline, calibration=args.calib, max_drift=drift, samples=samples or 8)
    save(result.model, args.output)
    if args.report:
        _write_json(args.report, result.report.as_dict())
    if not args.quiet:
        print(result.report.table())
        print(f"wrote {args.output}")
    if args.strict and result.report.rolled_back:
        return 1
    return 0


def _write_json(path: str, data: dict) -> None:
    from .io import save_text

    save_text(path, json.dumps(data, indent=2, default=str) + "\n")


def _inspect(args) -> int:
    from .inspect_model import inspect_model, inspect_text
    from .io import load

    info = inspect_model(load(args.model))
    print(json.dumps(info, indent=2) if args.json else inspect_text(info))
    return 0


def _compare(args) -> int:
    from .compare import compare
    from .report import human_bytes, table

    result = compare(args.reference, args.candidate, data=args.data, samples=args.samples, latency_runs=args.runs)
    if args.json:
        print(json.dumps(result, indent=2, default=float))
        return 0
    rows = []
    for name, m in result["per_output"].items():
        rows.append([name, f"{m['cosine']:.6f}", f"{m['max_abs']:.3e}", f"{m['max_rel']:.3e}",
                     f"{m['top1']:.4f}" if "top1" in m else "-"])
    print(table(["output", "cosine", "max abs", "max rel", "top-1 agree"], rows))
    size = result["size"]
    print(f"size: {human_bytes(size['reference'])} -> {human_bytes(size['candidate'])} ({size['ratio']:.3f}x)")
    if "latency" in result:
        lat = result["latency"]
        print(f"latency: {lat['reference_ms']:.3f} ms -> {lat['candidate_ms']:.3f} ms ({lat['ratio']:.3f}x; "
              f"median of {lat['runs']} interleaved runs, {lat['threads']} thread)")
    print(f"on {result['samples']} samples")
    return 0


def _sensitivity(args) -> int:
    from .io import load
    from .manager import _progress_bar
    from .passes.sensitivity import DEFAULT_SPARSITIES, METRIC, layer_sensitivity, parse_sparsities, require_matplotlib

    # Everything a user can get wrong is checked before the measurement, which can take minutes.
    if args.sparsities is not None and args.pattern != "unstructured":
        raise UsageError(f"--sparsities does not apply to --pattern {args.pattern}, which fixes the sparsity")
    sparsities = parse_sparsities(args.sparsities) if args.sparsities is not None else DEFAULT_SPARSITIES
    if args.samples < 1:
        raise UsageError(f"--samples must be at least 1, got {args.samples}")
    for output in filter(None, (args.png, args.json)):
        if Path(output).resolve() == Path(args.model).resolve():
            raise UsageError("an output path is the input path; onnxshrink never overwrites its input")
        if not Path(output).resolve().parent.is_dir():
            raise OnnxShrinkError(f"{output}: output folder does not exist")
    if args.png:
        require_matplotlib()
    table = layer_sensitivity(load(args.model), args.calib, sparsities, args.method, args.pattern, args.samples,
                              progress=_progress_bar(None))  # a bar on a terminal, as compress shows
    if args.json:
        from .io import save_text

        save_text(args.json, table.to_json())
    if args.png:
        table.to_png(args.png)
    if not args.quiet:
        print(table.markdown())
        print(f"drift: {METRIC}, each layer pruned alone ({args.method}, {args.pattern}); "
              f"{table.samples} samples, {table.wall_s:.1f} s")
        for output in filter(None, (args.json, args.png)):
            print(f"wrote {output}")
    return 0


def _pack(args) -> int:
    from .graph import model_stats
    from .io import load
    from .onnxz import LEVEL, pack_file

    level = LEVEL if args.level is None else args.level
    if not 1 <= level <= 22:
        raise UsageError(f"--level must be between 1 and 22, got {level}")
    weights = model_stats(load(args.reference)).params if args.reference else None
    report = pack_file(args.model, args.output, level)
    if not args.quiet:
        print("\n".join(report.lines()))
        if weights:
            print(f"  {8 * report.packed_bytes / weights:.2f} bits per weight of {args.reference} "
                  f"({weights:,} weights)")
    return 0


def _unpack(args) -> int:
    from .onnxz import unpack_file

    size = unpack_file(args.model, args.output)
    if not args.quiet:
        print(f"wrote {args.output} ({size:,} bytes, checksum verified)")
    return 0


def _passes(args) -> int:
    from .registry import all_passes

    described = [cls.describe() for cls in all_passes().values()]
    if args.json:
        print(json.dumps(described, indent=2, default=str))
        return 0
    for entry in described:
        print(f"{entry['name']}: {entry['summary']}")
        for opt in entry["options"]:
            choices = f" [{'|'.join(map(str, opt['choices']))}]" if opt["choices"] else ""
            print(f"    {opt['name']} ({opt['type']}, default {opt['default']}){choices}: {opt['help']}")
    return 0


def _demo(args) -> int:
    from .demo import DEFAULT_PIPELINE, run_demo

    text, _ = run_demo(args.pipeline or DEFAULT_PIPELINE)
    print(text)
    return 0


COMMANDS = {"compress": _compress, "inspect": _inspect, "compare": _compare, "sensitivity": _sensitivity,
            "pack": _pack, "unpack": _unpack, "passes": _passes, "demo": _demo}

if __name__ == "__main__":
    sys.exit(main())
