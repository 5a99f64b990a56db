"""Runs a pipeline: each pass, then a check that the model is valid, loads in ORT and stays
within the user's drift bound of the ORIGINAL model's outputs; a pass that fails is rolled back."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field

import onnx

from .calibration import open_data
from .errors import OnnxShrinkError
from .fidelity import METRICS, Bound, output_metrics, parse_drift, summarize
from .graph import ModelStats, model_stats, walk_nodes
from .io import load
from .memory import PeakMemory
from .pass_base import Note, Pass, PassContext
from .pipeline import Pipeline, parse_pipeline
from .runtime import adapt_feeds, make_session, run_all, serialized

log = logging.getLogger("onnxshrink")


@dataclass
class PassRecord:
    name: str
    spec: str
    status: str  # applied | unchanged | rolled back | invalid
    message: str
    before: ModelStats
    after: ModelStats
    fidelity: dict
    per_output: dict
    wall_s: float
    peak_rss_mb: float
    notes: list[Note] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"pass": self.name, "spec": self.spec, "status": self.status, "message": self.message,
                "before": self.before.as_dict(), "after": self.after.as_dict(), "fidelity": self.fidelity,
                "per_output": self.per_output, "wall_s": round(self.wall_s, 4), "peak_rss_mb": round(self.peak_rss_mb, 1),
                "notes": [{"where": n.where, "message": n.message} for n in self.notes]}


@dataclass
class Report:
    pipeline: str
    input: ModelStats
    output: ModelStats
    data: str
    samples: int
    max_drift: str
    passes: list[PassRecord]
    fidelity: dict

    def as_dict(self) -> dict:
        return {"pipeline": self.pipeline, "input": self.input.as_dict(), "output": self.output.as_dict(),
                "data": self.data, "samples": self.samples, "max_drift": self.max_drift, "fidelity": self.fidelity,
                "passes": [p.as_dict() for p in self.passes]}

    @property
    def rolled_back(self) -> list[PassRecord]:
        return [p for p in self.passes if p.status in ("rolled back", "invalid")]

    def table(self) -> str:
        from .report import pass_table

        return pass_table(self)


@dataclass
class Result:
    model: onnx.ModelProto
    report: Report

    def save(self, path) -> None:
        from .io import save

        save(self.model, path)


def as_pipeline(pipeline) -> Pipeline:
    if isinstance(pipeline, Pipeline):
        return pipeline
    if isinstance(pipeline, str):
        return parse_pipeline(pipeline)
    if isinstance(pipeline, Pass):
        return Pipeline([pipeline])
    if isinstance(pipeline, (list, tuple)) and all(isinstance(p, Pass) for p in pipeline):
        return Pipeline(list(pipeline))
    raise OnnxShrinkError("pipeline must be text such as 'cleanup,fp16', a Pipeline or a list of passes")


def compress(model, pipeline, calibration=None, max_drift: str | None = None, samples: int = 8,
             show_progress: bool | None = None) -> Result:
    """Run `pipeline` on `model` (a path or ModelProto, never modified) and return the new model and a report."""
    pipeline = as_pipeline(pipeline)
    bounds = parse_drift(max_drift)
    if samples < 1:
        raise OnnxShrinkError(f"samples must be at least 1, got {samples}")
    current = load(model)
    data = open_data(calibration, current, synthesize_count=samples)
    feeds = data.take(samples)
    if not feeds:
        raise OnnxShrinkError(f"{data.origin}: holds no samples")
    if not data.real and any(p.needs_data for p in pipeline.passes):
        log.warning("no calibration data given: %s use synthesized inputs; pass --calib for real data",
                    ", ".join(p.name for p in pipeline.passes if p.needs_data))
    current_bytes = serialized(current)  # once for the checker and the session: 0.1 s per 90 MB
    strict_check = _passes_full_check(current if current_bytes is None else current_bytes)
    reference_session = make_session(current, model_bytes=current_bytes)
    names = [o.name for o in reference_session.get_outputs()]
    try:
        reference = run_all(reference_session, feeds)
    except OnnxShrinkError as exc:
        if data.real:
            raise
        raise OnnxShrinkError(f"synthesized inputs do not run this model ({str(exc)[:160]}); give real inputs "
                              "with --calib (an .npz of stacked samples also serves scalar and RNN-state inputs)") from None
    del reference_session, current_bytes

    original = stats = model_stats(current)
    records = []
    progress = _progress_bar(show_progress)
    context = PassContext(data=data, data_is_real=data.real, progress=progress, warn=log.warning, reference=current)
    fidelity: dict = {"cosine": 1.0, "max_abs": 0.0, "max_rel": 0.0}
    for step in progress(pipeline.passes, desc="passes", unit="pass"):
        record, candidate = _run_step(step, current, stats, context, strict_check, names, reference, feeds, bounds)
        records.append(record)
        if record.status in ("applied", "unchanged"):
            current, stats = candidate, record.after
            fidelity = record.fidelity or fidelity
        log.info("%s: %s%s", step.spec(), record.status, f" ({record.message})" if record.message else "")
    report = Report(str(pipeline), original, stats, data.origin, len(feeds),
                    ",".join(map(str, bounds)), records, fidelity)
    return Result(current, report)


def _run_step(step: Pass, model, stats, context, strict_check, names, reference, feeds, bounds: list[Bound]):
    unmatched = _unmatched_names(step, model)
    start = time.perf_counter()
    with PeakMemory() as peak:
        result = step.apply(model, context, before=stats)
    wall = time.perf_counter() - start
    result.notes[:0] = unmatched
    record = PassRecord(step.name, step.spec(), "applied", "", result.before, result.after, {}, {}, wall,
                        peak.bytes / 2**20, result.notes)
    if not result.modified:
        record.status = "unchanged"
    model_bytes = serialized(result.model)
    problem = _validity_problem(result.model if model_bytes is None else model_bytes, strict_check)
    if problem is None:
        try:
            session = make_session(result.model, model_bytes=model_bytes)
            outputs = run_all(session, adapt_feeds(feeds, session))
        except OnnxShrinkError as exc:
            problem = f"does not run in onnxruntime ({exc})"
    if problem is not None:
        record.status, record.message = "invalid", f"rolled back: {step.name} produced a model that {problem}"
        log.error("%s", record.message)
        return record, None
    record.per_output = output_metrics(names, reference, outputs)
    record.fidelity = summarize(record.per_output)
    broken = [b for b in bounds if b.holds(record.fidelity) is False]
    if broken:
        figures = "; ".join(f"{b.metric} {record.fidelity[METRICS[b.metric]]:.6g} breaks {b}" for b in broken)
        record.status, record.message = "rolled back", f"rolled back {step.spec()}: {figures}"
        log.warning("%s", record.message)
    return record, result.model


def _unmatched_names(step: Pass, model) -> list[Note]:
    """A note for each `include`/`exclude` entry that names no node and no op type of the model: a
    typo, or a list written in parentheses, which the option parser reads as one name."""
    if not isinstance(model, onnx.ModelProto):
        return []
    known = {name for node in walk_nodes(model.graph) for name in (node.name, node.op_type)}
    notes = []
    for option in ("include", "exclude"):
        values = getattr(step.options, option, None)
        for value in values if isinstance(values, tuple) else ():
            if isinstance(value, str) and value not in known:
                hint = " (lists are written [a,b])" if value.startswith("(") else ""
                notes.append(Note("(options)", f"{option}: {value!r} matches no node name or op type of this "
                                               f"model{hint}"))
    return notes


def _passes_full_check(model: onnx.ModelProto | bytes) -> bool:
    try:
        onnx.checker.check_model(model, full_check=True)
        return True
    except Exception:  # the checker raises several types; the original failing it only relaxes our check
        return False


def _validity_problem(model: onnx.ModelProto | bytes, strict: bool) -> str | None:
    try:
        onnx.checker.check_model(model, full_check=strict)
    except Exception as exc:  # ValidationError, InferenceError, ValueError (size) all mean "invalid"
        return f"fails the ONNX checker ({str(exc).splitlines()[0][:300]})"
    return None


def _progress_bar(show: bool | None):
    if show is None:
        show = sys.stderr.isatty() and log.getEffectiveLevel() <= logging.WARNING
    if not show:
        return lambda iterable, **_: iterable
    from tqdm import tqdm

    return lambda iterable, **kw: tqdm(iterable, file=sys.stderr, leave=False, **kw)
