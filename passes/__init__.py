"""Built-in passes, one module per family; importing this package registers them."""

from . import cleanup, dedup, fp16  # noqa: F401
