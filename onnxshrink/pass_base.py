"""What a pass is: a name, typed options, and a `run` that returns a new model plus notes.

Passes are functional: `run` gets a private copy of the model and returns the model to keep.
`apply` wraps it with the before/after figures every report needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, ClassVar

import onnx

from .graph import ModelStats, model_stats
from .io import load
from .options import PassOptions

if TYPE_CHECKING:
    from .calibration import CalibrationData


@dataclass(frozen=True)
class Note:
    """What a pass did, or skipped and why, at one node or tensor."""

    where: str
    message: str


@dataclass
class PassContext:
    """What a pass may use besides the model."""

    data: "CalibrationData | None" = None
    reference: onnx.ModelProto | None = None  # the pipeline's input model, for passes that refit to it
    data_is_real: bool = False
    progress: Callable = lambda iterable, **_: iterable  # wraps long loops in a progress bar
    warn: Callable[[str], None] = lambda message: None


@dataclass
class PassOutput:
    model: onnx.ModelProto
    notes: list[Note] = field(default_factory=list)


@dataclass
class PassResult:
    name: str
    options: PassOptions
    model: onnx.ModelProto
    before: ModelStats
    after: ModelStats
    notes: list[Note]
    modified: bool


class Pass:
    """Base class. Subclasses set `name`, `summary`, `Options` and implement `run`."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Options: ClassVar[type[PassOptions]] = PassOptions
    needs_data: ClassVar[bool] = False  # True when real calibration data changes the result
    needs_library: ClassVar[bool] = False  # True when the output uses the onnxshrink op library

    def __init__(self, options: PassOptions | None = None, **values):
        if options is not None and values:
            raise TypeError("give either an Options instance or keyword values, not both")
        self.options = options if options is not None else self.Options.from_mapping(values, self.name)

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassOutput:
        raise NotImplementedError

    def apply(self, model: onnx.ModelProto, context: PassContext | None = None,
              before: ModelStats | None = None) -> PassResult:
        """Run the pass on a copy of `model`; `before`, where the caller knows model_stats(model), saves its cost."""
        context = context or PassContext()
        before = before or model_stats(model)
        output = self.run(load(model), context)
        modified = output.model != model  # protobuf equality: any change to the graph counts
        return PassResult(self.name, self.options, output.model, before, model_stats(output.model), output.notes, modified)

    def spec(self) -> str:
        from .pipeline import format_pass

        return format_pass(self.name, self.options.changed())

    @classmethod
    def describe(cls) -> dict:
        return {"name": cls.name, "summary": cls.summary, "needs_data": cls.needs_data,
                "options": cls.Options.describe()}
