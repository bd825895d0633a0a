"""The registry of methods: each method declares itself in its module; the registry refuses what would be ambiguous,
and the README's methods and model_args tables are the registry's own."""

import dataclasses
import inspect
import subprocess
import sys

import pytest

from lmms_simignore.methods.base import COMMON_ARGUMENTS, IN_LLM, PLACES, POSITION_RULES, PRE_LLM, Method
from lmms_simignore.methods.registry import METHODS, register
from lmms_simignore.models.llava_simignore import LOADER_ARGUMENTS, LlavaSimignore
from lmms_simignore.models.qwen_vl_simignore import LOADER_ARGUMENTS as QWEN_LOADER_ARGUMENTS
from lmms_simignore.models.qwen_vl_simignore import QwenVLSimignore
from lmms_simignore.models.reference import readme_with_tables, update_readme
from lmms_simignore.settings import COMMON_HELP

README = __import__("pathlib").Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_declares_its_place_budget_positions_needs_and_sourced_defaults(name):
    method = METHODS[name]
    assert method.name == name and set(method.places) <= set(PLACES) and method.budget and method.needs
    assert all(rule in POSITION_RULES for rule in method.positions.split(" then "))
    defaults = method.arguments()  # its defaults are valid arguments
    for field in dataclasses.fields(defaults):
        assert field.metadata.get("help"), f"{name}.{field.name} has no help text"
    assert all(argument in method.argument_names for argument in method.own_budget)


def small_method(**changes):
    fields = dict(name="tiny", title="t", summary="s", places=(PRE_LLM,), arguments=dict, budget="b",
                  positions="original", needs=("x",), plan=lambda args, request: ())
    return Method(**{**fields, **changes})


def test_a_method_name_or_argument_taken_is_refused_and_places_must_be_in_order():
    @dataclasses.dataclass(frozen=True)
    class Arguments:
        fastv_layer: int = 2

    registry = dict(METHODS)
    with pytest.raises(ValueError, match="a method named 'fastv' is already registered"):
        register(registry, METHODS["fastv"])
    with pytest.raises(ValueError, match="argument fastv_layer is already fastv's"):
        register(registry, dataclasses.replace(METHODS["fastv"], name="fastv2", arguments=Arguments))
    with pytest.raises(ValueError, match="places must be some of vision, pre-LLM, in-LLM in that order"):
        dataclasses.replace(METHODS["visiondrop"], places=(IN_LLM, PRE_LLM))
    with pytest.raises(ValueError, match="arguments must be a frozen dataclass"):
        small_method()
    assert not set(COMMON_ARGUMENTS) & {name for method in METHODS.values() for name in method.argument_names}


def test_the_readme_tables_are_the_registry_s():
    assert readme_with_tables(README.read_text()) == README.read_text(), "run: python -m lmms_simignore docs"


def own_model_args(model_class) -> set[str]:
    return {name for name in inspect.signature(model_class._setup).parameters if name not in ("self", "reduction_args")}


def test_every_model_arg_of_the_model_class_is_documented_once():
    loader = own_model_args(LlavaSimignore)
    documented = set(LOADER_ARGUMENTS) | set(COMMON_HELP)
    assert loader | {"preset"} <= documented
    assert set(LOADER_ARGUMENTS) - {"preset"} <= loader and set(LOADER_ARGUMENTS).isdisjoint(COMMON_HELP)


def test_every_model_arg_of_the_qwen_classes_is_documented_once():
    """Their own arguments in their table; those they share with llava_simignore in its rows (not both)."""
    qwen = own_model_args(QwenVLSimignore)
    own = qwen - own_model_args(LlavaSimignore)
    assert own == set(QWEN_LOADER_ARGUMENTS) - {"pretrained", "dtype"}
    assert qwen - own <= set(LOADER_ARGUMENTS) | set(COMMON_HELP) and QWEN_LOADER_ARGUMENTS.keys() <= qwen
    assert own_model_args(LlavaSimignore) - qwen == {"quantization", "chat_template"}


def test_every_model_arg_of_the_internvl_class_is_documented_once():
    from lmms_simignore.models.internvl_simignore import LOADER_ARGUMENTS as INTERNVL_LOADER_ARGUMENTS
    from lmms_simignore.models.internvl_simignore import InternVLSimignoreChat

    args = own_model_args(InternVLSimignoreChat)
    own = args - own_model_args(LlavaSimignore)
    assert own == set(INTERNVL_LOADER_ARGUMENTS) == {"min_patches", "max_patches"}
    assert args - own <= set(LOADER_ARGUMENTS) | set(COMMON_HELP)


def test_the_docs_command_finds_and_mends_a_stale_table(tmp_path):
    stale = tmp_path / "README.md"
    stale.write_text(README.read_text().replace("| `dart_pivots` | `dart` | `8` |", "| `dart_pivots` | `dart` | `4` |"))
    lines = []
    assert update_readme(stale, check=True, echo=lines.append) == 1 and "differ from the registry" in lines[-1]
    command = [sys.executable, "-m", "lmms_simignore", "docs", "--readme", str(stale)]
    assert subprocess.run(command, capture_output=True, text=True).returncode == 0
    assert stale.read_text() == README.read_text()
    assert subprocess.run([*command, "--check"], capture_output=True, text=True).returncode == 0
