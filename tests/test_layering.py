"""The package's layering: model code, schedules and quantization depend on nothing above them.

The import graph is read from the source (every `import` and `from ... import`, also those inside functions),
and every module is imported in a fresh interpreter, so a new arrow the wrong way fails here.
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed import REPO

PACKAGE = REPO / "megatron_dsv3"
CLIS = {"megatron_dsv3.training.pretrain", "megatron_dsv3.checkpoint.convert", "megatron_dsv3.inference.cli",
        "megatron_dsv3.inference.eplb_cli",
        "megatron_dsv3.megatron_lm"}
ABOVE_MODEL_PIECES = ("megatron_dsv3.training", "megatron_dsv3.inference", "megatron_dsv3.tracking",
                      "megatron_dsv3.cli", *CLIS)


def _module_name(path: Path, root: Path = REPO) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, root: Path = REPO) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import statement in the file."""
    tree = ast.parse(path.read_text())
    name = _module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.append((base, [alias.name for alias in node.names]))
            found += [(f"{base}.{alias.name}", []) for alias in node.names]  # `from pkg import module`
    return found


def import_graph(root: Path) -> dict[str, list[tuple[str, list[str]]]]:
    return {_module_name(p, root): _imports(p, root) for p in sorted((root / "megatron_dsv3").rglob("*.py"))}


GRAPH = import_graph(REPO)
MODULES = set(GRAPH)


def _ours(imported: str) -> bool:
    return imported in MODULES


def _within(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def wrong_arrows(graph, sources, targets) -> set[tuple[str, str]]:
    """(module, imported) pairs where a module under `sources` imports one of ours under `targets`."""
    ours = set(graph)
    return {(module, imported) for module, imports in graph.items() if _within(module, sources)
            for imported, _ in imports if imported in ours and _within(imported, targets)}


def test_config_imports_nothing_of_ours():
    assert [m for m, _ in GRAPH["megatron_dsv3.config"] if _ours(m)] == []


def test_presets_import_only_the_config():
    assert {m for m, _ in GRAPH["megatron_dsv3.presets"] if _ours(m)} <= {"megatron_dsv3.config"}


@pytest.mark.parametrize("piece", ["attention", "moe", "fp8", "pipeline"])
def test_model_pieces_and_schedules_import_nothing_above_them(piece):
    assert wrong_arrows(GRAPH, [f"megatron_dsv3.{piece}"], ABOVE_MODEL_PIECES) == set()


def test_model_pieces_do_not_import_the_model_that_assembles_them():
    pieces = ["megatron_dsv3.attention", "megatron_dsv3.moe", "megatron_dsv3.fp8"]
    assert wrong_arrows(GRAPH, pieces, ["megatron_dsv3.model"]) == set()


def test_no_cli_takes_another_clis_names():
    wrong = {(module, imported, name) for module, imports in GRAPH.items() if module in CLIS
             for imported, names in imports if imported in CLIS - {module} for name in names}
    assert wrong == set()
    private = {(module, imported, name) for module, imports in GRAPH.items()
               for imported, names in imports if _ours(imported) and imported.rpartition(".")[0] !=
               module.rpartition(".")[0] and imported != module for name in names
               if name.startswith("_") and not name.startswith("__")}
    assert private == set()


def test_the_checker_sees_a_lazy_and_a_relative_wrong_arrow(tmp_path):
    for path, text in {"moe/__init__.py": "", "moe/x.py": "def f():\n    from ..training import step\n",
                       "fp8/__init__.py": "", "fp8/y.py": "import megatron_dsv3.tracking.moe_metrics\n",
                       "training/__init__.py": "", "training/step.py": "", "tracking/__init__.py": "",
                       "tracking/moe_metrics.py": "", "__init__.py": ""}.items():
        (tmp_path / "megatron_dsv3" / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "megatron_dsv3" / path).write_text(text)
    graph = import_graph(tmp_path)
    assert wrong_arrows(graph, ["megatron_dsv3.moe", "megatron_dsv3.fp8"], ABOVE_MODEL_PIECES) == {
        ("megatron_dsv3.moe.x", "megatron_dsv3.training.step"), ("megatron_dsv3.moe.x", "megatron_dsv3.training"),
        ("megatron_dsv3.fp8.y", "megatron_dsv3.tracking.moe_metrics")}


def test_every_module_imports_in_a_fresh_interpreter():
    """Import each module (a CLI's `__main__` guard keeps it from running) and check that importing the model
    pieces alone does not pull in the trainer, inference or tracking."""
    names = sorted(m for m in MODULES if not m.endswith("__main__"))
    code = (
        "import importlib, sys\n"
        "import megatron_dsv3.attention.mla, megatron_dsv3.moe.router, megatron_dsv3.fp8, megatron_dsv3.pipeline.dual\n"
        "above = sorted(m for m in sys.modules if m.startswith(('megatron_dsv3.training', 'megatron_dsv3.inference',"
        " 'megatron_dsv3.tracking', 'megatron_dsv3.cli', 'megatron_dsv3.megatron_lm')))\n"
        "assert not above, above\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "print('ok', len(sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok")
