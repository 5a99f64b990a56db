"""Built-in passes, one module per family; importing this package registers them."""

from . import cleanup, dedup, equalize, fp16, mixed_precision, quantize_dynamic, quantize_int8, quantize_weights  # noqa: F401
