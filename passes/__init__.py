"""Built-in passes, one module per family; importing this package registers them."""

from . import (cleanup, dedup, equalize, fp16, low_rank, lower, mixed_precision, prune, quantize_dynamic,  # noqa: F401
               quantize_int8, quantize_weights, reconstruct, sparse_storage, tucker, weight_sharing)
