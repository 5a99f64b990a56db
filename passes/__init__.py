"""Built-in passes, one module per family; importing this package registers them."""

from . import cleanup, dedup, fp16  # noqa: F401
from . import quantize_dynamic  # noqa: F401
from . import quantize_int8  # noqa: F401
from . import quantize_weights  # noqa: F401
from . import mixed_precision  # noqa: F401
