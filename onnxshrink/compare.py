"""Side-by-side comparison of two models on the same data: fidelity, size and latency."""

from __future__ import annotations

from .calibration import open_data
from .errors import OnnxShrinkError
from .fidelity import output_metrics, summarize
from .io import load
from .runtime import adapt_feeds, interleaved_latency, make_session, run_all


def compare(reference, candidate, data=None, samples: int = 8, latency_runs: int = 30, threads: int = 1) -> dict:
    """Cosine, max abs/rel error, top-1 agreement, size ratio and latency ratio (interleaved medians)."""
    ref_model, cand_model = load(reference), load(candidate)
    feeds = open_data(data, ref_model, synthesize_count=samples).take(samples)
    if not feeds:
        raise OnnxShrinkError("comparison data holds no samples")
    ref_session, cand_session = make_session(ref_model, threads), make_session(cand_model, threads)
    ref_names = [o.name for o in ref_session.get_outputs()]
    cand_names = [o.name for o in cand_session.get_outputs()]
    if ref_names != cand_names:
        raise OnnxShrinkError(f"the models' outputs differ: {ref_names} vs {cand_names}")
    cand_inputs = {i.name for i in cand_session.get_inputs()}
    if cand_inputs != {i.name for i in ref_session.get_inputs()}:
        raise OnnxShrinkError("the models' inputs differ; compare models of the same interface")
    per_output = output_metrics(ref_names, run_all(ref_session, feeds), run_all(cand_session, adapt_feeds(feeds, cand_session)))
    result = {"per_output": per_output, "summary": summarize(per_output), "samples": len(feeds),
              "size": {"reference": ref_model.ByteSize(), "candidate": cand_model.ByteSize(),
                       "ratio": cand_model.ByteSize() / max(ref_model.ByteSize(), 1)}}
    if latency_runs:
        ref_s, cand_s = interleaved_latency([ref_session, cand_session], [feeds[0], adapt_feeds(feeds[:1], cand_session)[0]],
                                            repeats=latency_runs)
        result["latency"] = {"reference_ms": ref_s * 1e3, "candidate_ms": cand_s * 1e3, "ratio": cand_s / ref_s,
                             "threads": threads, "runs": latency_runs}
    return result
