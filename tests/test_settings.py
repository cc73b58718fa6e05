"""Settings are written once (``concept_influence.settings``): a field added to a settings class reaches the
method's options and the CLI's ``--help``; old option names still work, with a ``DeprecationWarning``; no public
function or method (outside the generated CLI) takes more than 15 parameters."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
import warnings
from dataclasses import dataclass
from typing import Literal

import pytest
from typer.testing import CliRunner

import concept_influence
from concept_influence.attribution.gradient import GradientAttributionConfig
from concept_influence.attribution.methods import (
    GRADIENT_OPTIONS,
    METHODS,
    get_method,
    gradient_config,
    register_method,
)
from concept_influence.attribution.scoring import InfluenceConfig
from concept_influence.concepts.answers import AnswerConfig
from concept_influence.curvature.config import Damping
from concept_influence.settings import build_settings, choices, help_text, option, option_defaults


@dataclass(frozen=True)
class WithNewOption(GradientAttributionConfig):
    sharpness: Literal["soft", "hard"] = option("soft", help="A new option, added in one place.")


def test_new_field_reaches_method_options_and_cli_help():
    import typer

    from concept_influence.cli.attribute import build_attribute

    name = "test-new-option-method"
    try:
        register_method(name, kind="gradient", needs_queries=True, settings=WithNewOption, extra={"store": None})(
            lambda session, concept, queries, **options: None
        )
        assert get_method(name).options["sharpness"] == "soft"
        assert set(GRADIENT_OPTIONS) < set(get_method(name).options)
    finally:
        METHODS.pop(name, None)
    app = typer.Typer()
    app.command("attribute")(build_attribute(WithNewOption))
    app.command("other")(lambda: None)
    out = (
        CliRunner().invoke(app, ["attribute", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}).output
    )
    assert "--sharpness" in out and "A new option, added in one place." in out and "soft | hard" in out


def test_cli_flags_and_method_options_come_from_the_settings():
    import typer

    from concept_influence.cli.attribute import attribute

    app = typer.Typer()
    app.command("attribute")(attribute)
    app.command("other")(lambda: None)
    out = (
        CliRunner().invoke(app, ["attribute", "--help"], env={"COLUMNS": "400", "NO_COLOR": "1", "TERM": "dumb"}).output
    )
    for name in ("preconditioner", "row_loss", "keep_k", "token_aggregation", "max_memory"):
        assert "--" + name.replace("_", "-") in out
        assert (
            help_text(GradientAttributionConfig, name).split(":")[-1].strip()[:30].lower()
            in " ".join(out.split()).lower()
        )
    assert "--factor-dtype" in out and "--n-samples" in out
    # the method's options are the settings' fields (the session's max_length and seed aside)
    options = METHODS["concept-influence"].options
    assert set(GRADIENT_OPTIONS) <= set(options)
    assert {k: options[k] for k in ("row_loss", "window", "keep")} == option_defaults(
        GradientAttributionConfig, ["row_loss", "window", "keep"]
    )
    assert METHODS["projection-difference"].options["max_new_tokens"] == 64  # its own default over AnswerConfig's
    assert set(option_defaults(AnswerConfig)) <= set(METHODS["projection-difference"].options)
    assert choices(InfluenceConfig, "normalization") == ("none", "length", "unit")


def test_shared_options_are_defined_once():
    """GradientAttributionConfig takes InfluenceConfig's fields (inherited) and AnswerConfig's (same default and
    help)."""
    gac = dataclasses.fields(GradientAttributionConfig)
    by_name = {f.name: f for f in gac}
    for f in dataclasses.fields(InfluenceConfig):
        assert by_name[f.name].metadata is f.metadata or by_name[f.name].metadata == f.metadata
    for f in dataclasses.fields(AnswerConfig):
        assert by_name[f.name].metadata["help"] == f.metadata["help"] and by_name[f.name].default == f.default
    config = GradientAttributionConfig(row_loss="mean", absolute_damping=0.5)
    assert config.influence_config().row_loss == "mean" and config.influence_config().damping == Damping(absolute=0.5)


def test_deprecated_names_still_work():
    with pytest.warns(DeprecationWarning, match="factor_dtype"):
        config = GradientAttributionConfig(factor_dtype="float64")
    assert config.dtype == "float64"
    with pytest.warns(DeprecationWarning):
        assert config.factor_dtype == "float64"
    assert config.to_dict()["factor_dtype"] == "float64"  # scores files keep the old field
    with pytest.warns(DeprecationWarning, match="factor_dtype"):
        renamed = METHODS["concept-influence"].check_options({"factor_dtype": "float64"})
    assert renamed == {"dtype": "float64"}
    with pytest.raises(TypeError, match="not both"), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        GradientAttributionConfig(factor_dtype="float64", dtype="float32")


class _Session:
    max_length, batch_size, seed, answer_cache = 32, 4, 7, None


def test_unknown_option_is_a_type_error_naming_it():
    assert gradient_config(_Session(), row_loss="mean").row_loss == "mean"
    config = gradient_config(_Session())
    assert (config.batch_size, config.seed, config.max_length) == (4, 7, 32)
    with pytest.raises(TypeError, match="'row_los'"):
        gradient_config(_Session(), row_los="mean")
    with pytest.raises(TypeError, match="'windw'"):
        build_settings(InfluenceConfig, {"windw": 3}, where="InfluenceConfig")


MAX_PARAMETERS = 15


def _public_callables():
    """Every public function, class and method defined in the package, the CLI's commands (generated flags) aside.
    Dataclass constructors are settings (their fields are the one definition of the options) and are not counted."""
    for info in pkgutil.walk_packages(concept_influence.__path__, "concept_influence."):
        if info.name.startswith("concept_influence.cli"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isclass(obj):
                if not dataclasses.is_dataclass(obj):
                    yield f"{info.name}.{name}", obj
                for attr, member in vars(obj).items():
                    if attr.startswith("_") and attr != "__init__":
                        continue
                    if attr == "__init__" and dataclasses.is_dataclass(obj):
                        continue
                    if isinstance(member, (staticmethod, classmethod)):
                        member = member.__func__
                    if inspect.isfunction(member):
                        yield f"{info.name}.{name}.{attr}", member
            elif inspect.isfunction(obj):
                yield f"{info.name}.{name}", obj


def test_no_public_callable_takes_more_than_15_parameters():
    offenders = []
    for where, fn in _public_callables():
        try:
            params = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):
            continue
        named = [
            p
            for p in params
            if p.name not in ("self", "cls")
            and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        ]
        if len(named) > MAX_PARAMETERS:
            offenders.append(f"{where}: {len(named)}")
    assert not offenders, "take a settings object instead: " + ", ".join(offenders)


def test_fit_factors_keeps_its_old_keyword(tiny_tok):
    import torch

    from concept_influence import Attributor
    from concept_influence.models.hf import HFAdapter
    from concept_influence.testing.chats import TINY_PAIRS, chat_rows
    from concept_influence.testing.tiny_models import tiny_llama

    adapter = HFAdapter(tiny_llama(len(tiny_tok), layers=1, dtype=torch.float64, seed=2), tiny_tok)
    att = Attributor(adapter, chat_rows(TINY_PAIRS[:4]), None, batch_size=4, max_length=32, progress=False)
    with pytest.warns(DeprecationWarning, match="stats_dtype"):
        factors = att.fit_factors(stats_dtype="float64", preconditioner="diagonal")
    assert factors is not None and factors.config.dtype == "float64"
    with pytest.raises(TypeError, match="'stats_dtyp'"):
        att.fit_factors(stats_dtyp="float64")


def test_session_flags_are_written_once_for_every_command():
    """``--device`` and ``--dtype`` (the model's) mean the same in every command that loads a model: one definition
    (``cli.common``), so their help is the same everywhere."""
    import typer.main

    from concept_influence.cli import app
    from concept_influence.cli.common import SESSION_HELP

    group = typer.main.get_command(app)
    seen = {"--device": 0, "--model-dtype or --dtype": 0}
    for name, command in group.commands.items():
        for param in command.params:
            if "--device" in param.opts:
                assert param.help == SESSION_HELP["device"], name
                seen["--device"] += 1
            if param.help == SESSION_HELP["dtype"]:
                seen["--model-dtype or --dtype"] += 1
    assert seen["--device"] >= 8 and seen["--model-dtype or --dtype"] >= 8, seen
