"""Pruning sensitivity: how far the model's outputs drift when one layer alone is pruned.

`layer_sensitivity` takes every layer the `prune` pass would prune (its own layer discovery and
pruning functions, so the figures describe what `prune` will do), prunes that layer alone at each
sparsity of a sweep and measures

    drift = 1 - cosine(outputs, unpruned outputs)

on a few calibration samples: the `cosine` of --max-drift (samples concatenated per output, the
worst output). For small errors 1 - cosine is half the squared relative error across the output,
and errors from different layers are close to uncorrelated, so the drifts of layers pruned together
roughly add up. `allocate_sparsity` relies on that: it picks per-layer sparsities that meet an
overall target with the least summed drift, and `auto_sparsities` is that choice end to end, for
`prune(scope=auto)`.

Cost: the model runs once on the samples, keeping the tensors that enter each layer's downstream
part; a layer then gets one session of that part alone, with its weight as a graph input, and
each sparsity is a few runs of it with the pruned weight fed in. No session is built per
candidate, and the work upstream of a layer, which pruning it cannot change, is never redone.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxshrink.activations import main_graph_tensors, stream_tensors
from onnxshrink.calibration import open_data
from onnxshrink.errors import OnnxShrinkError, UsageError
from onnxshrink.fidelity import output_metrics, summarize
from onnxshrink.graph import constants_to_initializers, outer_scope_names, subgraphs
from onnxshrink.io import load
from onnxshrink.pass_base import Note, PassContext
from onnxshrink.runtime import make_session, run_all

from .prune import Layer, Prune, _hessians, _magnitude, _n_m, sparsegpt

DEFAULT_SPARSITIES = (0.3, 0.5, 0.7, 0.8, 0.9)
METRIC = "1 - cosine of the outputs vs the unpruned model"


def _no_progress(iterable, **_):
    return iterable


# ---------------------------------------------------------------- the table
@dataclass(frozen=True)
class LayerDrift:
    weight: str  # the initializer's name: the key prune's per-layer targets use
    node: str
    op_type: str
    params: int
    drift: tuple[float, ...]  # one per SensitivityTable.sparsities


@dataclass
class SensitivityTable:
    sparsities: tuple[float, ...]
    layers: list[LayerDrift]
    method: str = "magnitude"
    pattern: str = "unstructured"
    samples: int = 0
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)  # layers prune leaves dense, and why

    def markdown(self) -> str:
        header = ["layer", "op", "params"] + [f"{s:.0%}" if abs(s * 100 - round(s * 100)) < 1e-9 else f"{s:.1%}"
                                              for s in self.sparsities]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 3 + "---:|" * len(self.sparsities)]
        for row in self.layers:
            cells = [row.node, row.op_type, f"{row.params:,}"] + [f"{d:.2e}" for d in row.drift]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"metric": METRIC, "method": self.method, "pattern": self.pattern, "samples": self.samples,
                "wall_s": round(self.wall_s, 3), "sparsities": list(self.sparsities),
                "layers": [dict(asdict(row), drift=list(row.drift)) for row in self.layers], "notes": self.notes}

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2) + "\n"

    def to_png(self, path) -> Path:
        """Drift vs sparsity, one line per layer, log y; written atomically."""
        Figure, FigureCanvasAgg = require_matplotlib()
        path = Path(path)
        folder = path.parent if str(path.parent) else Path(".")
        if not folder.is_dir():
            raise OnnxShrinkError(f"{path}: folder {folder} does not exist")
        positive = [d for row in self.layers for d in row.drift if d > 0]
        floor = min(positive) / 10 if positive else 1e-12  # a log axis cannot show a drift of 0
        figure = Figure(figsize=(8, 5), dpi=100)
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        colours = _colours(len(self.layers))
        x = [100 * s for s in self.sparsities]
        for colour, row in zip(colours, self.layers):
            axes.plot(x, [max(d, floor) for d in row.drift], marker="o", markersize=3, linewidth=1, color=colour,
                      label=f"{row.node} ({row.params:,})")
        axes.set_yscale("log")
        axes.set_xlabel(f"sparsity of the one layer pruned, % ({self.method}, {self.pattern})")
        axes.set_ylabel("drift: 1 - cosine of outputs")
        axes.set_title(f"per-layer pruning sensitivity ({len(self.layers)} layers, {self.samples} samples)")
        axes.grid(True, which="both", alpha=0.3)
        if len(self.layers) <= 12:
            axes.legend(fontsize=7)
        else:  # dozens of legend entries would hide the plot; the colour runs with depth instead
            axes.text(0.01, 0.99, "colour: layer order (dark = first)", transform=axes.transAxes, va="top", fontsize=8)
        figure.tight_layout()
        handle = tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.", suffix=".png", delete=False)
        try:
            with handle:
                figure.savefig(handle, format="png")
            os.replace(handle.name, path)
        except BaseException:
            os.unlink(handle.name)
            raise
        return path


def require_matplotlib():
    """matplotlib's Agg figure classes, or a one-line error naming the extra that installs it."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise OnnxShrinkError("the PNG plot needs matplotlib: pip install 'onnxshrink[plot]'") from None
    return Figure, FigureCanvasAgg


def _colours(count: int) -> list:
    from matplotlib import colormaps

    if count <= 10:
        return [colormaps["tab10"](i) for i in range(count)]
    return [colormaps["viridis"](i / (count - 1)) for i in range(count)]


def check_sparsities(values) -> tuple[float, ...]:
    """Sorted, distinct sparsities in [0, 1); anything else is a usage error."""
    try:
        sparsities = sorted({float(v) for v in values})
    except (TypeError, ValueError):
        raise UsageError(f"sparsities: give numbers in [0, 1), e.g. 0.5,0.7,0.9; got {values!r}") from None
    if not sparsities:
        raise UsageError("sparsities: give at least one, e.g. 0.5,0.7,0.9")
    bad = [s for s in sparsities if not 0 <= s < 1]
    if bad:
        raise UsageError(f"sparsities must lie in [0, 1); got {bad[0]:g}")
    return tuple(sparsities)


def parse_sparsities(text: str) -> tuple[float, ...]:
    """'0.5,0.7,0.9' -> (0.5, 0.7, 0.9)."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise UsageError(f"sparsities: '{text}' is not a comma-separated list of numbers, e.g. 0.5,0.7,0.9") from None
    return check_sparsities(values)


# ---------------------------------------------------------------- measuring
def layer_sensitivity(model, data, sparsities=DEFAULT_SPARSITIES, method: str = "magnitude",
                      pattern: str = "unstructured", max_samples: int = 8, min_elements: int = 1024,
                      exclude=(), *, threads: int | None = None,
                      progress: Callable = _no_progress) -> SensitivityTable:
    """Drift of the model's outputs with each prunable layer alone pruned to each sparsity.

    `model`: a path or ModelProto (not modified); `data`: anything `open_data` takes (an .npz, a
    folder, feed dicts, CalibrationData; None synthesizes inputs, which say little about real
    drift); the first `max_samples` samples are used (they also make the obs Hessians). N:M
    patterns fix the sparsity at 1 - N/M, so their table has that one column."""
    start = time.perf_counter()
    sparsities = check_sparsities(sparsities)
    if max_samples < 1:
        raise UsageError(f"samples must be at least 1, got {max_samples}")
    model = load(model)
    constants_to_initializers(model.graph)  # as the prune pass does before it looks for layers
    layers, n_m, pruner, notes = _prunable(model, method, pattern, min_elements, exclude)
    if not layers:
        raise OnnxShrinkError(f"no MatMul/Gemm/Conv weight of {min_elements}+ elements to prune "
                              "(see min_elements, exclude)")
    if n_m:
        sparsities = (1 - n_m[0] / n_m[1],)
    feeds = open_data(data, model, synthesize_count=max_samples).take(max_samples)
    if not feeds:
        raise OnnxShrinkError("calibration data holds no samples")
    prune_one = _PruneOne(model, pruner, n_m)
    if method == "obs":
        notes_obs: list[Note] = []
        obs_layers = [layer for layer in layers if layer.supports_obs]
        context = PassContext(data=feeds, data_is_real=True, progress=progress)
        prune_one.hessians = _hessians(model, obs_layers, max_samples, context, notes_obs)
        notes += [f"{n.where}: {n.message}" for n in notes_obs]

    downstream = Downstream(model, layers, feeds, threads)
    rows = []
    for layer in progress(layers, desc="sensitivity", unit="layer"):
        drifts = downstream.measure(layer, [prune_one(layer, s) for s in sparsities])
        params = int(np.prod(downstream.initializers[layer.weight].dims))
        rows.append(LayerDrift(layer.weight, layer.where, layer.node.op_type, params, tuple(drifts)))
    return SensitivityTable(tuple(sparsities), rows, method, pattern, len(feeds), time.perf_counter() - start, notes)


def _prunable(model, method, pattern, min_elements, exclude):
    """The layers the prune pass would prune with these options, found by the pass itself."""
    if pattern == "channel":
        raise UsageError("sensitivity measures unstructured and N:M pruning; pattern=channel changes layer shapes")
    pruner = Prune(method=method, pattern=pattern, min_elements=min_elements, exclude=tuple(exclude))
    layers, notes = pruner._layers(model)
    notes = [f"{n.where}: {n.message}" for n in notes]
    n_m = _n_m(pattern)
    if n_m:  # the pass leaves a layer dense when its reduction axis does not split into groups of M
        weights = {t.name: t for t in model.graph.initializer}
        uneven = [layer for layer in layers if layer.matrix(weights).shape[0] % n_m[1]]
        notes += [f"{layer.where}: left dense: inputs not a multiple of {n_m[1]}" for layer in uneven]
        layers = [layer for layer in layers if layer not in uneven]
    return layers, n_m, pruner, notes


class _PruneOne:
    """One layer's weight pruned as the prune pass prunes it, returned in its stored layout."""

    def __init__(self, model: onnx.ModelProto, pruner: Prune, n_m):
        self.weights = {t.name: t for t in model.graph.initializer}
        self.n_m = n_m
        self.block, self.damping = pruner.options.block, pruner.options.damping
        self.hessians: dict[str, np.ndarray] = {}

    def __call__(self, layer: Layer, sparsity: float) -> np.ndarray:
        matrix = layer.matrix(self.weights)
        if layer.weight in self.hessians:
            pruned = sparsegpt(matrix, self.hessians[layer.weight], sparsity, self.n_m, self.block, self.damping)
        else:
            pruned = _magnitude(matrix, sparsity, self.n_m)
        scratch = {layer.weight: onnx.TensorProto()}  # Layer.store undoes the matrix view into a tensor
        layer.store(scratch, pruned)
        return numpy_helper.to_array(scratch[layer.weight])


class Downstream:
    """Runs, for one layer, only the nodes its weight can change.

    One reference run taps every tensor that flows into some layer's downstream region from outside
    it; each layer then gets one session of its region alone, with its weight turned into a graph
    input, so a candidate weight is a feed rather than a new model and session. On YOLOv8n the
    regions hold 44% of the convolution work on average (the backbone's late layers and the heads
    much less). The price is memory: the tapped tensors of every sample (YOLOv8n 320x320: 20 MB
    a sample)."""

    def __init__(self, model: onnx.ModelProto, layers: list[Layer], feeds: list[dict], threads: int | None):
        graph = model.graph
        self.model, self.threads = model, threads
        self.initializers = {t.name: t for t in graph.initializer}
        self.outputs = [o.name for o in graph.output]
        self.nodes = list(graph.node)
        self.reads = [({*node.input} | {name for sub in subgraphs(node) for name in outer_scope_names(sub)}) - {""}
                      for node in self.nodes]  # a subgraph's outer-scope reads are its node's inputs too
        consumers: dict[str, list[int]] = {}
        for index, names in enumerate(self.reads):
            for name in names:
                consumers.setdefault(name, []).append(index)
        self.regions: dict[str, tuple[list[int], list[str]]] = {}
        for layer in layers:
            region, stack = set(consumers.get(layer.weight, ())), list(consumers.get(layer.weight, ()))
            while stack:
                for name in self.nodes[stack.pop()].output:
                    for index in consumers.get(name, ()):
                        if index not in region:
                            region.add(index)
                            stack.append(index)
            produced = {name for index in region for name in self.nodes[index].output}
            boundary = {name for index in region for name in self.reads[index]} - produced - set(self.initializers)
            self.regions[layer.weight] = (sorted(region), sorted(boundary))
        tappable = main_graph_tensors(model)
        wanted = {name for _, boundary in self.regions.values() for name in boundary} | set(self.outputs)
        self.values = list(stream_tensors(model, sorted(wanted & tappable), feeds, threads=threads))
        for name in set(self.outputs) - tappable:  # an initializer given out as an output as it is
            for values in self.values:
                values[name] = numpy_helper.to_array(self.initializers[name])
        self.reference = [[values[name] for name in self.outputs] for values in self.values]

    def measure(self, layer: Layer, candidates: list[np.ndarray]) -> list[float]:
        """Drift with `layer`'s weight replaced by each candidate (stored layout) in turn."""
        region, boundary = self.regions[layer.weight]
        if not all(isinstance(self.values[0][name], np.ndarray) for name in boundary):
            # a sequence or optional crosses in: no typed input can take it, so run the whole graph
            region, boundary = list(range(len(self.nodes))), [i.name for i in self.model.graph.input
                                                              if i.name not in self.initializers]
        produced = {name for index in region for name in self.nodes[index].output}
        outputs = [o for o in self.model.graph.output if o.name in produced]
        if not outputs:
            return [0.0] * len(candidates)  # nothing downstream reaches an output
        weight = self.initializers[layer.weight]
        inputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(self.values[0][name].dtype), None)
                  for name in boundary] + [helper.make_tensor_value_info(weight.name, weight.data_type, weight.dims)]
        read = {name for index in region for name in self.reads[index]}
        initializers = [t for name, t in self.initializers.items() if name in read and name != weight.name]
        graph = helper.make_graph([self.nodes[i] for i in region], "downstream", inputs, outputs, initializers)
        part = helper.make_model(graph, opset_imports=self.model.opset_import, ir_version=self.model.ir_version)
        part.functions.extend(self.model.functions)
        session = make_session(part, self.threads)
        names = [o.name for o in outputs]
        drifts = []
        for candidate in candidates:
            feeds = [{**{name: values[name] for name in boundary}, weight.name: candidate} for values in self.values]
            changed = [dict(zip(names, got)) for got in run_all(session, feeds)]
            outputs_now = [[new.get(name, old) for name, old in zip(self.outputs, reference)]
                           for new, reference in zip(changed, self.reference)]
            cosine = summarize(output_metrics(self.outputs, self.reference, outputs_now))["cosine"]
            drifts.append(max(0.0, 1.0 - cosine))  # rounding can put the cosine a hair above 1
        return drifts


# ---------------------------------------------------------------- allocating
def allocate_sparsity(table: SensitivityTable, target: float,
                      params_by_layer: dict[str, int] | None = None) -> dict[str, float]:
    """Per-layer sparsities whose parameter-weighted mean is `target`, with the least summed drift.

    Each layer's curve is (0, 0) plus its measured points, replaced by its lower convex hull, so the
    marginal drift per removed parameter rises along it. Taking hull segments cheapest first, across
    layers, is then optimal for the piecewise-linear curves (the Lagrangian solution), and the last
    segment is taken partly so the target is met exactly. Sparsities stay in [0, largest swept].
    `params_by_layer` (weight name -> elements; default: the table's) picks and weighs the layers."""
    if not 0 <= target < 1:
        raise UsageError(f"target sparsity must lie in [0, 1); got {target}")
    params = dict(params_by_layer) if params_by_layer is not None else {r.weight: r.params for r in table.layers}
    rows = {row.weight: row for row in table.layers}
    missing = sorted(set(params) - set(rows))
    if missing:
        raise OnnxShrinkError(f"allocate_sparsity: no sensitivity measured for '{missing[0]}'")
    total = sum(params.values())
    reachable = sum(n * table.sparsities[-1] for n in params.values()) / total if total else 0.0
    if target > reachable + 1e-12:
        raise OnnxShrinkError(f"target sparsity {target:g} is above the largest swept ({reachable:g}); "
                              "sweep larger sparsities")
    segments = []  # (drift per removed parameter, from, weight, to)
    for weight, count in params.items():
        points = _lower_hull([(0.0, 0.0)] + list(zip(table.sparsities, rows[weight].drift)))
        for (s0, d0), (s1, d1) in zip(points, points[1:]):
            if s1 > s0:  # a swept 0 repeats the (0, 0) start
                segments.append(((d1 - d0) / (count * (s1 - s0)), s0, weight, s1))
    segments.sort()  # a layer's hull slopes rise, so its own segments come out in order
    chosen = {weight: 0.0 for weight in params}
    budget = target * total
    for _, start, weight, stop in segments:
        if budget <= 0:
            break
        step = min(stop - start, budget / params[weight])
        chosen[weight] = start + step
        budget -= step * params[weight]
    return chosen


def _lower_hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Lower convex hull of points sorted by x (monotone chain); collinear points dropped."""
    hull: list[tuple[float, float]] = []
    for x, y in sorted(points):
        while len(hull) >= 2:
            (x0, y0), (x1, y1) = hull[-2], hull[-1]
            if (x1 - x0) * (y - y0) - (y1 - y0) * (x - x0) > 0:  # hull[-1] lies strictly below the chord
                break
            hull.pop()
        hull.append((x, y))
    return hull


def sweep_around(target: float) -> tuple[float, ...]:
    """Sparsities for scope=auto: densities from 4x to 1/4x the target's, so that a layer can be given
    more sparsity than the target as well as less."""
    return tuple(s for s in (round(1 - (1 - target) * f, 6) for f in (4, 2, 1.5, 1, 0.75, 0.5, 0.25)) if 0 < s < 1)


def auto_sparsities(model, data, target: float, method: str = "magnitude", pattern: str = "unstructured", *,
                    sparsities=None, max_samples: int = 8, min_elements: int = 1024, exclude=(),
                    threads: int | None = None, progress: Callable = _no_progress) -> dict[str, float]:
    """{weight initializer name: sparsity} for every layer prune would prune, meeting `target` overall
    (parameter-weighted) where it costs the least measured drift: what prune(scope=auto) applies."""
    if pattern != "unstructured":
        raise UsageError("scope=auto needs pattern=unstructured: N:M fixes each layer's sparsity, channel its shape")
    if not 0 <= target < 1:
        raise UsageError(f"target sparsity must lie in [0, 1); got {target}")
    if target == 0:  # nothing to spend: no need to measure
        model = load(model)
        constants_to_initializers(model.graph)
        return {layer.weight: 0.0 for layer in _prunable(model, method, pattern, min_elements, exclude)[0]}
    table = layer_sensitivity(model, data, sparsities or sweep_around(target), method, pattern, max_samples,
                              min_elements, exclude, threads=threads, progress=progress)
    return allocate_sparsity(table, target)


def apply_sparsities(model, sparsities: dict[str, float], data=None, method: str = "magnitude",
                     max_samples: int = 128) -> onnx.ModelProto:
    """A copy of `model` with each named weight pruned (unstructured) to its sparsity, as the prune pass
    prunes it; `data` is needed for method=obs. For trying an allocation outside a pipeline."""
    model = load(model)
    constants_to_initializers(model.graph)
    layers, _, pruner, _ = _prunable(model, method, "unstructured", 1, ())
    layers = [layer for layer in layers if layer.weight in sparsities]
    unknown = sorted(set(sparsities) - {layer.weight for layer in layers})
    if unknown:
        raise OnnxShrinkError(f"'{unknown[0]}' is not the weight of a MatMul/Gemm/Conv layer that prune can prune")
    prune_one = _PruneOne(model, pruner, None)
    if method == "obs":
        if data is None:
            raise OnnxShrinkError("method=obs needs calibration data for the layer Hessians")
        context = PassContext(data=open_data(data, model), data_is_real=True)
        prune_one.hessians = _hessians(model, [layer for layer in layers if layer.supports_obs], max_samples,
                                       context, [])
    pruned = {layer.weight: prune_one(layer, sparsities[layer.weight]) for layer in layers}
    for tensor in model.graph.initializer:
        if tensor.name in pruned:
            tensor.CopyFrom(numpy_helper.from_array(pruned[tensor.name], tensor.name))
    return model
