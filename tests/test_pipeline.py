import json

import pytest
import yaml

import onnxshrink
from helpers import mlp_model
from onnxshrink import UsageError, parse_pipeline
from onnxshrink.fidelity import parse_drift
from onnxshrink.pipeline import load_recipe, recipe_dict

ROUND_TRIP = [
    "cleanup",
    "cleanup,dedup,fp16",
    "fp16(compute=storage,min_elements=32)",
    "cleanup(fold_constants=false),fp16(keep_io_types=false)",
    " cleanup ( remove_identity = no ) , dedup ",
    'fp16(provider="CUDAExecutionProvider")',
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_printed_pipeline_parses_to_the_same_pipeline(text):
    pipeline = parse_pipeline(text)
    printed = str(pipeline)
    assert parse_pipeline(printed) == pipeline
    assert str(parse_pipeline(printed)) == printed  # printing is canonical


def test_defaults_are_not_printed_and_values_are_typed():
    pipeline = parse_pipeline("fp16(min_elements=16,compute=storage)")
    assert str(pipeline) == "fp16(compute=storage)"
    assert pipeline.passes[0].options.min_elements == 16
    assert isinstance(parse_pipeline("fp16(min_elements=8)").passes[0].options.min_elements, int)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_recipes_give_the_same_pipeline_as_text(tmp_path, suffix):
    text = "cleanup(fold_constants=false),dedup,fp16(compute=storage)"
    recipe = recipe_dict(parse_pipeline(text), max_drift="cosine>=0.99")
    path = tmp_path / f"recipe{suffix}"
    path.write_text(json.dumps(recipe) if suffix == ".json" else yaml.safe_dump(recipe))
    loaded = load_recipe(path)
    assert loaded.pipeline == parse_pipeline(text)
    assert loaded.max_drift == "cosine>=0.99"


def test_recipe_long_form(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("pipeline:\n  - cleanup\n  - pass: fp16\n    options: {compute: storage}\nsamples: 4\n")
    recipe = load_recipe(path)
    assert str(recipe.pipeline) == "cleanup,fp16(compute=storage)" and recipe.samples == 4


@pytest.mark.parametrize("text, message", [
    ("prnue", "unknown pass 'prnue'"),
    ("fp16(bits=4)", "unknown option 'bits'"),
    ("fp16(min_elements=-1)", "must be >= 0"),
    ("fp16(min_elements=1.5)", "takes an integer"),
    ("fp16(compute=fast)", "must be one of auto, fp16, storage"),
    ("cleanup(fold_constants=maybe)", "takes true or false"),
    ("cleanup,,dedup", "empty pass"),
    ("fp16(compute=storage", "unbalanced"),
    ("fp16(compute)", "key=value"),
    ("Fp16", "kebab-case"),
    ("", "empty pipeline"),
])
def test_bad_pipelines_are_usage_errors(text, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        parse_pipeline(text)


def test_bad_recipes(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("pipeline: [cleanup]\nmax_drfit: cosine>=0.9\n")
    with pytest.raises(UsageError, match="unknown recipe keys max_drfit"):
        load_recipe(path)
    path.write_text("pipeline: [cleanup\n")
    with pytest.raises(UsageError, match="not valid YAML"):
        load_recipe(path)


def test_drift_specs():
    bounds = parse_drift("cosine>=0.99, top1>=0.98,max-abs<=1e-2")
    assert [str(b) for b in bounds] == ["cosine>=0.99", "top1>=0.98", "max-abs<=0.01"]
    assert bounds[0].holds({"cosine": 0.995}) and not bounds[0].holds({"cosine": 0.98})
    assert bounds[1].holds({"cosine": 1.0}) is None  # no class-score output: the bound does not apply
    for bad in ("cosine=0.9", "accuracy>=0.9", "cosine>=x"):
        with pytest.raises(UsageError):
            parse_drift(bad)


def test_every_pass_describes_its_options():
    for name, cls in onnxshrink.all_passes().items():
        described = cls.describe()
        assert described["name"] == name and described["summary"]
        for opt in described["options"]:
            assert opt["help"] and opt["type"]


def test_third_party_pass_registers_and_runs():
    from dataclasses import dataclass

    from onnxshrink import Pass, PassOptions, option, register_pass
    from onnxshrink.pass_base import PassOutput

    @register_pass("test-noop")
    class NoOp(Pass):
        summary = "does nothing"

        @dataclass(frozen=True)
        class Options(PassOptions):
            level: int = option(1, "how much nothing", low=0, high=3)

    assert str(parse_pipeline("test-noop(level=2)")) == "test-noop(level=2)"
    with pytest.raises(UsageError, match="must be <= 3"):
        parse_pipeline("test-noop(level=4)")
    NoOp.run = lambda self, model, context: PassOutput(model)
    result = onnxshrink.compress(mlp_model(), "test-noop,cleanup")
    assert [p.status for p in result.report.passes] == ["unchanged", "applied"]
