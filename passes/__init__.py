"""Built-in passes, one module per family; importing this package registers them."""

from . import (cleanup, dedup, equalize, fp16, mixed_precision, prune, quantize_dynamic, quantize_int8,  # noqa: F401
               quantize_weights, reconstruct, sparse_storage)
