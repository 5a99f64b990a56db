"""Pipelines as text (`prune(sparsity=0.5),fp16`) and as YAML/JSON recipes.

Printing a parsed pipeline gives text that parses to the same pipeline.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import OnnxShrinkError, UsageError
from .options import format_value, split_top_level
from .pass_base import Pass
from .registry import get_pass

_PASS_NAME = re.compile(r"^[a-z][a-z0-9]*(?:-[a-z0-9]+)*$")


@dataclass
class Pipeline:
    passes: list[Pass] = field(default_factory=list)

    def __str__(self) -> str:
        return ",".join(p.spec() for p in self.passes)

    def __eq__(self, other) -> bool:
        return isinstance(other, Pipeline) and [(p.name, p.options) for p in self.passes] == [
            (p.name, p.options) for p in other.passes]


@dataclass
class Recipe:
    pipeline: Pipeline
    max_drift: str | None = None
    samples: int | None = None


def format_pass(name: str, options: dict) -> str:
    if not options:
        return name
    return f"{name}(" + ",".join(f"{k}={format_value(v)}" for k, v in options.items()) + ")"


def parse_pipeline(text: str) -> Pipeline:
    """Parse `name(key=value,...),name,...` into passes with validated options."""
    if not text or not text.strip():
        raise UsageError("empty pipeline: give passes such as 'cleanup,fp16'")
    passes = []
    for chunk in split_top_level(text.strip()):
        chunk = chunk.strip()
        if not chunk:
            raise UsageError(f"empty pass in pipeline '{text}' (two commas in a row?)")
        passes.append(_parse_pass(chunk))
    return Pipeline(passes)


def _parse_pass(chunk: str) -> Pass:
    match = re.fullmatch(r"([^()]+?)\s*(?:\((.*)\))?\s*", chunk, flags=re.S)
    if not match:
        raise UsageError(f"cannot read pass '{chunk}': expected name or name(key=value,...)")
    name, body = match.group(1).strip(), match.group(2)
    if not _PASS_NAME.match(name):
        raise UsageError(f"bad pass name '{name}': pass names are kebab-case, e.g. quantize-int8")
    values = {}
    if body is not None and body.strip():
        for item in split_top_level(body):
            key, eq, value = item.partition("=")
            key = key.strip().replace("-", "_")
            if not eq or not key:
                raise UsageError(f"{name}: option '{item.strip()}' must be written key=value")
            if key in values:
                raise UsageError(f"{name}: option '{key}' given twice")
            values[key] = value.strip()
    return get_pass(name)(**values)


def pipeline_from_steps(steps) -> Pipeline:
    """A recipe's `pipeline`: text, or a list of names / {name: options} / {pass: name, options: {...}}."""
    if isinstance(steps, str):
        return parse_pipeline(steps)
    if not isinstance(steps, list) or not steps:
        raise UsageError("recipe 'pipeline' must be pipeline text or a non-empty list of passes")
    passes = []
    for step in steps:
        if isinstance(step, str):
            passes.extend(parse_pipeline(step).passes)
            continue
        if isinstance(step, dict) and "pass" in step:
            name, options = step["pass"], step.get("options") or {}
        elif isinstance(step, dict) and len(step) == 1:
            (name, options), = step.items()
            options = options or {}
        else:
            raise UsageError(f"recipe step {step!r}: expected a pass name, {{name: {{options}}}} or {{pass: name, options: {{...}}}}")
        if not isinstance(options, dict):
            raise UsageError(f"recipe step '{name}': options must be a mapping")
        passes.append(get_pass(str(name))(**{str(k).replace("-", "_"): v for k, v in options.items()}))
    return Pipeline(passes)


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise OnnxShrinkError(f"{path}: no such recipe file")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise UsageError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or "pipeline" not in data:
        raise UsageError(f"{path}: a recipe is a mapping with a 'pipeline' key")
    unknown = set(data) - {"pipeline", "max_drift", "samples"}
    if unknown:
        raise UsageError(f"{path}: unknown recipe keys {', '.join(sorted(unknown))} (known: pipeline, max_drift, samples)")
    return Recipe(pipeline_from_steps(data["pipeline"]), data.get("max_drift"), data.get("samples"))


def recipe_dict(pipeline: Pipeline, max_drift: str | None = None) -> dict:
    """The recipe form of a pipeline, for writing as YAML or JSON."""
    recipe: dict = {"pipeline": [{p.name: p.options.changed()} if p.options.changed() else p.name for p in pipeline.passes]}
    if max_drift:
        recipe["max_drift"] = max_drift
    return recipe
