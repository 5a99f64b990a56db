"""Robustness run: onnxshrink on real models it was not written for.

For every foreign model (models/foreign.py) and every zoo model (models/zoo.py) this runs,
with synthesized inputs (no --calib):

    API  onnxshrink.compress(path, P)  for P in cleanup, dedup, fp16, cleanup,dedup,fp16
    CLI  onnxshrink inspect IN
    CLI  onnxshrink compress IN -o OUT -p cleanup,dedup,fp16 --report R

and classifies each as ok (possibly with passes rolled back), a clean refusal (OnnxShrinkError /
CLI "onnxshrink: error: ...") or a CRASH (any other exception, an "internal error" from the
CLI, a traceback, a signal).  Every written model is checked with
``onnx.checker.check_model(full_check=True)`` and loaded in onnxruntime.

Each model runs in its own worker process, so a crash in native code marks that model's
cases instead of ending the run.

    python benchmarks/robustness.py                 # everything, one table
    python benchmarks/robustness.py -m silero_vad_v5 -m magika --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO / "models"
if str(MODELS_DIR) not in sys.path:
    sys.path.insert(0, str(MODELS_DIR))

API_PIPELINES = ["cleanup", "dedup", "fp16", "cleanup,dedup,fp16"]
# -p replaces the API pipelines; workers inherit the choice through the environment
if os.environ.get("ONNXSHRINK_ROBUST_PIPELINES"):
    API_PIPELINES = os.environ["ONNXSHRINK_ROBUST_PIPELINES"].split(";")
CLI_PIPELINE = "cleanup,dedup,fp16"
# the installed console script, run outside the repo so that ./onnxshrink does not shadow the package
CLI = [str(Path(sys.executable).parent / "onnxshrink")]
TIMEOUT_S = 900


def _silero_feeds(state: dict[str, tuple], sr: bool = True, chunk: int = 512):
    """Real-shaped feeds for the Silero VADs: audio-like chunks, zero state, sr=16000 (a scalar)."""
    import numpy as np

    rng = np.random.default_rng(0)
    feeds = []
    for _ in range(8):
        feed = {"input": (0.1 * rng.standard_normal((1, chunk))).astype(np.float32)}
        feed.update({name: np.zeros(shape, np.float32) for name, shape in state.items()})
        if sr:
            feed["sr"] = np.array(16000, dtype=np.int64)
        feeds.append(feed)
    return feeds


# Hand-made feeds for models whose synthesized inputs do not run (scalar sample rate, batch in
# axis 1 of the state): with these the passes themselves are exercised too ("api+feeds" rows).
FEEDS = {
    "silero_vad_v5": lambda: _silero_feeds({"state": (2, 1, 128)}),
    "silero_vad_op15": lambda: _silero_feeds({"state": (2, 1, 128)}),
    "silero_vad_v4": lambda: _silero_feeds({"h": (2, 1, 64), "c": (2, 1, 64)}),
}


def model_path(name: str) -> Path:
    import foreign
    import zoo

    if name in zoo.MODELS:
        return zoo.get(name)
    return foreign.fetch(name)


def all_models() -> list[str]:
    import foreign
    import zoo

    return list(zoo.MODELS) + foreign.all_names()


# --------------------------------------------------------------------------- checks
def check_file(path: Path) -> tuple[str, str]:
    """(checker verdict, onnxruntime verdict) for a written model: 'ok' or 'FAIL: first line'."""
    import onnx

    import onnxshrink

    try:
        onnx.checker.check_model(str(path), full_check=True)
        checker = "ok"
    except Exception as exc:  # noqa: BLE001 - any checker failure is a verdict
        checker = f"FAIL: {type(exc).__name__}: {_first(exc)}"
    try:
        onnxshrink.session(str(path))
        runtime = "ok"
    except Exception as exc:  # noqa: BLE001
        runtime = f"FAIL: {type(exc).__name__}: {_first(exc)}"
    return checker, runtime


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


def _tail(text: str, lines: int = 6) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def baseline(path: Path) -> dict:
    """How the original model itself fares: checker, ORT load, a run on synthesized feeds."""
    import onnxshrink
    from onnxshrink.calibration import open_data
    from onnxshrink.runtime import make_session, run_all

    checker, runtime = check_file(path)
    info = {"checker": checker, "ort": runtime}
    try:
        model = onnxshrink.load(path)
        feeds = open_data(None, model, synthesize_count=1).take(1)
        info["feed"] = {k: f"{v.dtype}{list(v.shape)}" for k, v in feeds[0].items()}
        run_all(make_session(model), feeds)
        info["runs"] = "ok"
    except Exception as exc:  # noqa: BLE001
        info["runs"] = f"FAIL: {type(exc).__name__}: {_first(exc)}"
    return info


def api_case(path: Path, pipeline: str, workdir: Path, feeds=None) -> dict:
    import onnxshrink
    from onnxshrink.errors import OnnxShrinkError

    row = {"case": f"api{'+feeds' if feeds else ''} {pipeline}"}
    start = time.perf_counter()
    try:
        result = onnxshrink.compress(path, pipeline, calibration=feeds)
    except OnnxShrinkError as exc:
        row.update(status="refused", message=str(exc))
        return _timed(row, start)
    except Exception as exc:  # noqa: BLE001 - the point is to catch what onnxshrink does not
        row.update(status="CRASH", message=f"{type(exc).__name__}: {_first(exc)}",
                   traceback=_tail(traceback.format_exc(), 12))
        return _timed(row, start)
    report = result.report
    row.update(status="ok", nodes=[report.input.nodes, report.output.nodes],
               bytes_ratio=report.output.bytes / report.input.bytes if report.input.bytes else 1.0,
               fidelity=report.fidelity,
               passes=[(p.spec, p.status) for p in report.passes],
               rolled_back=[p.message for p in report.rolled_back])
    out = workdir / f"api-{bool(feeds)}-{pipeline.replace(',', '_')}.onnx"
    try:
        onnxshrink.save(result.model, out)
    except Exception as exc:  # noqa: BLE001
        row.update(status="CRASH", message=f"save: {type(exc).__name__}: {_first(exc)}",
                   traceback=_tail(traceback.format_exc(), 12))
        return _timed(row, start)
    row["checker"], row["ort"] = check_file(out)
    out.unlink()
    return _timed(row, start)


def _timed(row: dict, start: float) -> dict:
    row["wall_s"] = round(time.perf_counter() - start, 2)
    return row


def _classify_cli(row: dict, proc: subprocess.CompletedProcess, argv: list[str], argv_cwd: Path) -> bool:
    """Fill status/message from a CLI run; True when it exited 0."""
    err = proc.stderr.strip()
    if proc.returncode == 0:
        row["status"] = "ok"
        return True
    if proc.returncode < 0:
        row.update(status="CRASH", message=f"killed by signal {-proc.returncode}", traceback=_tail(err, 12))
    elif "Traceback (most recent call last)" in err or "internal error" in err:
        row.update(status="CRASH", message=_tail(err, 1))
        verbose = subprocess.run(argv + ["-v"], capture_output=True, text=True, timeout=TIMEOUT_S, cwd=argv_cwd)
        row["traceback"] = _tail(verbose.stderr, 12)
    elif err.startswith("onnxshrink: error:") and len(err.splitlines()) == 1:
        row.update(status="refused", message=err.removeprefix("onnxshrink: error: "))
    elif err.splitlines()[-1].startswith("onnxshrink: error:"):  # clean refusal, but other lines before it
        row.update(status="refused+noise", message=err.splitlines()[-1].removeprefix("onnxshrink: error: "),
                   note=f"{len(err.splitlines()) - 1} extra stderr lines, first: {err.splitlines()[0][:160]!r}")
    else:  # a refusal that is not one line, or no message at all
        row.update(status="CRASH", message=f"exit {proc.returncode}, stderr not one error line: {_tail(err, 1)!r}",
                   traceback=_tail(err, 12))
    row["exit"] = proc.returncode
    return False


def cli_cases(path: Path, workdir: Path) -> list[dict]:
    import onnx

    from onnxshrink.graph import model_stats

    rows = []
    argv = CLI + ["inspect", str(path)]
    start = time.perf_counter()
    row = {"case": "cli inspect"}
    _classify_cli(row, subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=workdir), argv, workdir)
    rows.append(_timed(row, start))

    out, report = workdir / "cli-out.onnx", workdir / "cli-report.json"
    argv = CLI + ["compress", str(path), "-o", str(out), "-p", CLI_PIPELINE, "--report", str(report), "-q"]
    start = time.perf_counter()
    row = {"case": f"cli compress {CLI_PIPELINE}"}
    if _classify_cli(row, subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=workdir), argv, workdir):
        data = json.loads(report.read_text())
        before = data["input"]
        after = model_stats(onnx.load(str(out)))
        row.update(nodes=[before["nodes"], after.nodes],
                   bytes_ratio=out.stat().st_size / path.stat().st_size,
                   fidelity=data["fidelity"],
                   passes=[(p["spec"], p["status"]) for p in data["passes"]],
                   rolled_back=[p["message"] for p in data["passes"] if p["status"] in ("rolled back", "invalid")])
        row["checker"], row["ort"] = check_file(out)
    elif out.exists():
        row["note"] = "output file written despite the failure"
        row["checker"], row["ort"] = check_file(out)
    rows.append(_timed(row, start))
    return rows


def worker(name: str) -> dict:
    """All cases for one model (run in a child process)."""
    import logging

    logging.getLogger("onnxshrink").setLevel(logging.CRITICAL)  # the table says what happened
    import onnxshrink

    entry = {"model": name, "onnxshrink": onnxshrink.__file__}
    try:
        path = model_path(name)
    except Exception as exc:  # noqa: BLE001
        entry["fetch_error"] = f"{type(exc).__name__}: {_first(exc)}"
        return entry
    entry["path"] = str(path)
    entry["baseline"] = baseline(path)
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnxshrink-robust-") as tmp:
        for pipeline in API_PIPELINES:
            rows.append(api_case(path, pipeline, Path(tmp)))
        if entry["baseline"]["runs"] != "ok" and name in FEEDS:
            feeds = FEEDS[name]()
            for pipeline in API_PIPELINES:
                rows.append(api_case(path, pipeline, Path(tmp), feeds))
        rows += cli_cases(path, Path(tmp))
    entry["rows"] = rows
    return entry


def run_worker(name: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        target = handle.name
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", name, "--worker-out", target],
                              capture_output=True, text=True, timeout=TIMEOUT_S * 8)
        text = Path(target).read_text()
        if proc.returncode == 0 and text:
            return json.loads(text)
        return {"model": name, "worker_crash": f"exit {proc.returncode}", "rows": [],
                "traceback": _tail(proc.stderr, 12)}
    except subprocess.TimeoutExpired:
        return {"model": name, "worker_crash": "timed out", "rows": []}
    finally:
        os.unlink(target)


# --------------------------------------------------------------------------- output
def _fid(fidelity: dict | None) -> str:
    if not fidelity:
        return "-"
    parts = []
    if "cosine" in fidelity:
        parts.append(f"cos {fidelity['cosine']:.6f}")
    if "max_abs" in fidelity:
        parts.append(f"abs {fidelity['max_abs']:.1e}")
    if "top1" in fidelity:
        parts.append(f"top1 {fidelity['top1']:.3f}")
    return " ".join(parts)


def _verdict(text: str | None) -> str:
    return "-" if text is None else ("ok" if text == "ok" else "FAIL")


def render(results: list[dict]) -> str:
    from onnxshrink.report import table

    rows, details = [], []
    for entry in results:
        name = entry["model"]
        if "fetch_error" in entry or "worker_crash" in entry:
            rows.append([name, "(all)", "CRASH" if "worker_crash" in entry else "no model", "", "", "", "", "",
                         entry.get("fetch_error") or entry.get("worker_crash")])
            if entry.get("traceback"):
                details.append(f"{name}: worker\n{entry['traceback']}")
            continue
        base = entry["baseline"]
        rows.append([name, "(original)", "", "", "", "", _verdict(base["checker"]), _verdict(base["ort"]),
                     f"synth run {base['runs']}; feed {base.get('feed')}"])
        for row in entry["rows"]:
            status = row["status"]
            if status == "ok" and row.get("rolled_back"):
                status = f"ok, {len(row['rolled_back'])} rolled back"
            nodes = f"{row['nodes'][0]}->{row['nodes'][1]}" if "nodes" in row else ""
            ratio = f"{row['bytes_ratio']:.3f}" if "bytes_ratio" in row else ""
            note = row.get("message") or "; ".join(row.get("rolled_back", [])) or row.get("note", "")
            rows.append([name, row["case"], status, nodes, ratio, _fid(row.get("fidelity")),
                         _verdict(row.get("checker")), _verdict(row.get("ort")), note[:140]])
            if row.get("traceback") or (row.get("checker") not in (None, "ok")) or (row.get("ort") not in (None, "ok")):
                extra = [f"{name}: {row['case']}: {row['status']}: {row.get('message', '')}"]
                for key in ("checker", "ort"):
                    if row.get(key) not in (None, "ok"):
                        extra.append(f"  output {key}: {row[key]}")
                if row.get("traceback"):
                    extra.append("  " + row["traceback"].replace("\n", "\n  "))
                details.append("\n".join(extra))
    text = table(["model", "case", "status", "nodes", "bytes", "fidelity", "check", "ort", "message / rolled back"],
                 rows, "lllrrllll")
    counts: dict[str, int] = {}
    for entry in results:
        for row in entry.get("rows", []):
            key = row["status"] if not row.get("rolled_back") else "ok (rolled back)"
            counts[key] = counts.get(key, 0) + 1
            if row.get("checker") not in (None, "ok") or row.get("ort") not in (None, "ok"):
                counts["invalid output"] = counts.get("invalid output", 0) + 1
    text += "\n\n" + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    if details:
        text += "\n\nDetails:\n" + "\n\n".join(details)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", action="append", help="only this model (repeatable)")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("-p", "--pipeline", action="append",
                        help="API pipeline to run instead of the default four (repeatable)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        Path(args.worker_out).write_text(json.dumps(worker(args.worker), default=str))
        return 0
    if args.pipeline:
        global API_PIPELINES
        API_PIPELINES = args.pipeline
        os.environ["ONNXSHRINK_ROBUST_PIPELINES"] = ";".join(args.pipeline)
    names = args.model or all_models()
    results = []
    for name in names:
        start = time.perf_counter()
        results.append(run_worker(name))
        print(f"# {name}: {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    print(render(results))
    crashed = any(r.get("worker_crash") or any(row["status"] == "CRASH" for row in r.get("rows", []))
                  for r in results)
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
