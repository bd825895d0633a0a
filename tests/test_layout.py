"""The package layout: every module is reachable from the tree's parts, and no two modules import each other in a circle."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lmms_simignore"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def our_modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Our modules that `path` imports anywhere (functions included): `from a.b import c` counts as a.b.c when that is
    a module, else as a.b; a parent package that is only passed through is not counted."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lmms_simignore"):
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                found.add(name if name in modules else node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in modules}
    return found & modules


def test_no_module_imports_itself_through_others():
    modules = our_modules()
    graph = {name: imports_of(path, set(modules)) - {name} for name, path in modules.items()}
    circles = []

    def visit(name, trail):
        for target in graph[name]:
            if target in trail:
                circles.append(trail[trail.index(target):] + [target])
            elif target not in done:
                visit(target, trail + [target])
        done.add(name)

    done: set[str] = set()
    for name in sorted(graph):
        if name not in done:
            visit(name, [name])
    assert circles == []


def test_the_tree_has_its_parts_and_no_leftover_flat_modules():
    top = sorted(path.name for path in PACKAGE.iterdir() if path.name != "__pycache__")
    assert top == ["__init__.py", "__main__.py", "bench", "cli.py", "engine", "evaluation", "families", "local_data.py",
                   "lockfile.py", "markdown.py", "methods", "models", "settings.py", "shipped.py", "testbed"]
    methods = sorted(path.stem for path in (PACKAGE / "methods").glob("*.py"))
    assert methods == ["__init__", "arguments", "base", "dart", "divprune", "fastv", "pdrop", "pool", "prumerge_plus", "random_tokens",
                       "registry", "selection", "simignore", "sparsevlm", "visiondrop", "visionzip", "vispruner"]


def test_the_settings_the_engine_and_the_families_name_no_method():
    """Methods declare themselves in methods/; the settings and the engine apply them through the registry and one
    interface per place, and a family adapter says what its model is, so none of them names one (in code, strings,
    docstrings or comments). The control: the methods' own modules do."""
    import re

    from lmms_simignore.methods.registry import METHODS

    def named(path: Path) -> set[str]:
        text = path.read_text()
        words = {name for name in METHODS if name != "random" and re.search(rf"\b{name}\b", text, re.IGNORECASE)}
        return words | ({"random"} if re.search(r"[\"']random[\"']", text) else set())

    files = [PACKAGE / "settings.py", *sorted((PACKAGE / "engine").glob("*.py")), *sorted((PACKAGE / "families").glob("*.py"))]
    assert {path.name: named(path) for path in files if named(path)} == {}
    assert named(PACKAGE / "methods" / "dart.py") >= {"dart"} and named(PACKAGE / "methods" / "random_tokens.py") >= {"random"}
