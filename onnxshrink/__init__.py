"""onnxshrink: compress ONNX models by rewriting their graphs.

    import onnxshrink
    result = onnxshrink.compress("model.onnx", "cleanup,dedup,fp16", max_drift="cosine>=0.999")
    onnxshrink.save(result.model, "small.onnx")
    print(result.report.table())
"""

from .calibration import CalibrationData, open_data
from .compare import compare
from .errors import OnnxShrinkError, UsageError
from .io import load, save
from .manager import Report, Result, compress
from .options import PassOptions, option
from .pass_base import Note, Pass, PassContext, PassOutput, PassResult
from .pipeline import Pipeline, load_recipe, parse_pipeline
from .registry import all_passes, get_pass, register_pass

__version__ = "0.1.0"


def session(model, providers=None, **session_options):
    """An onnxruntime InferenceSession with the onnxshrink op library registered."""
    from .ops import session as _session

    return _session(model, providers=providers, **session_options)


__all__ = [
    "CalibrationData", "Note", "OnnxShrinkError", "Pass", "PassContext", "PassOptions", "PassOutput", "PassResult",
    "Pipeline", "Report", "Result", "UsageError", "all_passes", "compare", "compress", "get_pass", "load",
    "load_recipe", "open_data", "option", "parse_pipeline", "register_pass", "save", "session",
]
