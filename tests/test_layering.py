"""The import-layering contract of ARCHITECTURE.md, checked on the source (every import, also inside functions).

Layers, lowest first: errors -> events -> config, prompts -> backends -> pipeline -> front ends (cli, console,
app, widgets, screenshots). A layer imports only downward; the engine (backends, pipeline) knows nothing of
Textual, Typer or Rich's progress bars; widgets show data and hold no model logic.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "detox_tui"

FRONT_ENDS = (
    "detox_tui.cli",
    "detox_tui.console",
    "detox_tui.app",
    "detox_tui.widgets",
    "detox_tui.screenshots",
)
UI_LIBRARIES = ("textual", "typer", "rich.progress")
# What a widget may import from the package: the engine's data (typed records, table columns and export
# formats, preset data, prompt items, settings, events, errors) and other widgets; never model logic
# (models, editors, statistics, tracing, scorers, experiment, generation, the store...).
WIDGET_MAY_IMPORT = (
    "detox_tui.widgets",
    "detox_tui.errors",
    "detox_tui.events",
    "detox_tui.config",
    "detox_tui.prompts.base",
    "detox_tui.text",
    "detox_tui.pipeline.records",
    "detox_tui.pipeline.tables",
    "detox_tui.pipeline.results",
    "detox_tui.backends.editing.presets",
)


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path = PACKAGE) -> list[tuple[int, list[str]]]:
    """(line, modules) for every import statement in the file, relative ones resolved.

    ``from a.b import c`` names both a.b and a.b.c (c may be a submodule: ``from detox_tui import cli``).
    """
    module = module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: list[tuple[int, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, [alias.name]) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((node.lineno, [name] + [f"{name}.{alias.name}" for alias in node.names]))
    return out


def within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _is_stdlib(name: str) -> bool:
    top = name.split(".")[0]
    return top in sys.stdlib_module_names or top == "__future__"


def _widget_may_import(name: str) -> bool:
    if within(name, ("torch", "transformers")):
        return False
    return not within(name, ("detox_tui",)) or name == "detox_tui" or within(name, WIDGET_MAY_IMPORT)


def rules_for(module: str):
    """(rule, the test an imported module must fail to break it) for a module of the package."""
    engine = within(module, ("detox_tui.backends", "detox_tui.pipeline"))
    lower = within(
        module,
        ("detox_tui.errors", "detox_tui.events", "detox_tui.config", "detox_tui.prompts", "detox_tui.text"),
    )
    rules = []
    if within(module, ("detox_tui.backends",)):
        rules.append(("backends must not import the pipeline", lambda n: within(n, ("detox_tui.pipeline",))))
    if engine or lower:
        rules.append(("the engine must not import a front end", lambda n: within(n, FRONT_ENDS)))
        rules.append(("the engine must not import a UI library", lambda n: within(n, UI_LIBRARIES)))
    if lower:
        rules.append(
            (
                "errors, events, config, prompts and text sit below the engine",
                lambda n: within(n, ("detox_tui.backends", "detox_tui.pipeline")),
            )
        )
    if module == "detox_tui.events":
        rules.append(
            (
                "events may import only the standard library and detox_tui.errors",
                lambda n: not (_is_stdlib(n) or n == "detox_tui" or within(n, ("detox_tui.errors",))),
            )
        )
    if module == "detox_tui.errors":
        rules.append(("errors is the bottom layer", lambda n: within(n, ("detox_tui",))))
    if within(module, ("detox_tui.widgets",)):
        rules.append(("widgets hold no model logic", lambda n: not _widget_may_import(n)))
    return rules


def violations(root: Path = PACKAGE) -> list[str]:
    """One line per import statement that breaks a rule."""
    found: list[str] = []
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        rel = path.relative_to(root.parent)
        rules = rules_for(module)
        for line, names in imports_of(path, root):
            for rule, breaks in rules:
                bad = [n for n in names if breaks(n)]
                if bad:
                    found.append(f"{rel}:{line} imports {bad[0]}: {rule}")
    return found


def test_the_package_keeps_its_import_layers():
    assert violations() == []


def test_events_live_below_the_pipeline():
    assert (PACKAGE / "events.py").is_file()
    assert not (PACKAGE / "pipeline" / "events.py").exists()  # no compatibility shim the backends could use


@pytest.mark.parametrize(
    "file, source, rule",
    [
        (
            "backends/editing/x.py",
            "from detox_tui.pipeline.events import Progress\n",
            "must not import the pipeline",
        ),
        (
            "backends/x.py",
            "def f():\n    from detox_tui.pipeline import store\n",
            "must not import the pipeline",
        ),
        ("backends/x.py", "from ..pipeline import records\n", "must not import the pipeline"),
        ("pipeline/x.py", "import textual.app\n", "UI library"),
        ("pipeline/x.py", "from rich.progress import Progress\n", "UI library"),
        ("backends/x.py", "import typer\n", "UI library"),
        ("pipeline/x.py", "from detox_tui import console\n", "front end"),
        ("pipeline/x.py", "from detox_tui.widgets.run_log import RunLog\n", "front end"),
        ("config.py", "from detox_tui.backends.models import load_model\n", "below the engine"),
        ("events.py", "import numpy\n", "only the standard library"),
        ("events.py", "from detox_tui.config import Paths\n", "only the standard library"),
        ("widgets/x.py", "from detox_tui.pipeline.experiment import run_edit\n", "no model logic"),
        ("widgets/x.py", "from detox_tui.backends.models import load_model\n", "no model logic"),
        ("widgets/x.py", "import torch\n", "no model logic"),
    ],
)
def test_a_forbidden_import_is_caught(tmp_path, file, source, rule):
    root = tmp_path / "detox_tui"
    path = root / file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    # Allowed imports in the same places pass: rich tables in the engine, records in a widget, errors in events.
    (root / "pipeline").mkdir(exist_ok=True)
    (root / "pipeline" / "ok.py").write_text(
        "from rich.table import Table\nfrom detox_tui.backends import stats\n"
    )
    (root / "widgets").mkdir(exist_ok=True)
    (root / "widgets" / "ok.py").write_text(
        "import textual\nfrom detox_tui.pipeline.records import EditRow\n"
    )
    found = violations(root)
    assert len(found) == 1 and rule in found[0] and file in found[0], found
