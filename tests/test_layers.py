"""The project's layers: no import cycles anywhere, and the engine's packages import only downwards.

Every import counts, also the ones inside functions: a lazy import hides a cycle, it does not remove it.
"""

from __future__ import annotations

import functools

import import_graph as graphs
from import_graph import cycles

# The engine's layers, lowest first; a module may import its own layer and the ones before it.
ENGINE_LAYERS = ["core", "files", "models", "data", "networks", "training"]
ENTRY_POINTS = "sd_scripts"  # sd_scripts/train_network.py and the other kohya command lines
FRONT = ("frontend", "popups", "scripts", "main", "ArgsList")


@functools.lru_cache(maxsize=1)
def import_graph(root: str = graphs.ROOT) -> dict[str, set[str]]:
    return graphs.import_graph(root)


def _layer(module: str) -> int:
    parts = module.split(".")
    if parts[0] in FRONT:
        return len(ENGINE_LAYERS) + 1
    if len(parts) > 2 or (len(parts) == 2 and parts[1] in ENGINE_LAYERS + ["testing"]):
        package = parts[1]
        if package == "testing":
            return len(ENGINE_LAYERS) + 1  # used by tests, benchmarks and examples only
        return ENGINE_LAYERS.index(package)
    return len(ENGINE_LAYERS)  # the entry points and the package itself


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_engine_imports_only_downwards():
    graph = import_graph()
    upward = sorted(f"{module} -> {target}" for module, targets in graph.items() for target in targets
                    if _layer(target) > _layer(module))
    assert upward == []


def test_engine_never_imports_the_front_end_or_test_helpers():
    graph = import_graph()
    engine = [m for m in graph if m.startswith("sd_scripts") and not m.startswith("sd_scripts.testing")]
    leaks = sorted(f"{m} -> {t}" for m in engine for t in graph[m]
                   if t.split(".")[0] in FRONT or t.startswith("sd_scripts.testing"))
    assert leaks == []


def test_layers_cover_every_engine_package():
    graph = import_graph()
    packages = {m.split(".")[1] for m in graph if m.startswith("sd_scripts.") and m.count(".") >= 2}
    assert packages <= set(ENGINE_LAYERS) | {"testing"}


def test_the_graph_sees_lazy_imports(tmp_path):
    (tmp_path / "sd_scripts" / "core").mkdir(parents=True)
    (tmp_path / "sd_scripts" / "__init__.py").write_text("")
    (tmp_path / "sd_scripts" / "core" / "__init__.py").write_text("")
    (tmp_path / "sd_scripts" / "core" / "a.py").write_text("def f():\n    from sd_scripts.core import b\n")
    (tmp_path / "sd_scripts" / "core" / "b.py").write_text("from . import a\n")
    for name in ("main", "ArgsList"):
        (tmp_path / f"{name}.py").write_text("")
    assert cycles(graphs.import_graph(str(tmp_path))) == [["sd_scripts.core.a", "sd_scripts.core.b"]]
