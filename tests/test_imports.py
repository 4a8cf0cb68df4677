"""No import cycles between the modules of `curation` and `train`, and imports only run down the layers.

The layers (docs/architecture.md), lowest first: core -> models -> the rest of
`curation` -> `train` -> the CLI entry point, which alone sees everything.

Every import statement counts, at module level or inside a function (a lazy
import only hides a cycle, it does not remove it), except those under
`if TYPE_CHECKING:`, which never run. An edge goes to the module an import
statement names (`from curation.sources.base import Shard` -> curation.sources.base);
a package's `__init__` is a node like any other module.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO

PACKAGES = ("curation", "train")


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_graph() -> dict[str, set[str]]:
    return {m: {target for target, _ in names} for m, names in imported_names().items()}


def imported_names() -> dict[str, set[tuple[str, str | None]]]:
    """Per module, (module imported, name taken from it or None) for every import statement."""
    modules = _modules()
    graph: dict[str, set[tuple[str, str | None]]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]

        def visit(node: ast.AST, name: str = name, package: str = package) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and _is_type_checking(child):
                    for other in child.orelse:
                        visit(ast.Module(body=[other], type_ignores=[]))
                    continue
                if isinstance(child, ast.Import):
                    graph[name] |= {(a.name, None) for a in child.names if a.name in modules}
                elif isinstance(child, ast.ImportFrom):
                    base = child.module or ""
                    if child.level:
                        up = package.split(".")[: len(package.split(".")) - child.level + 1]
                        base = ".".join([*up, base] if base else up)
                    for alias in child.names:
                        full = f"{base}.{alias.name}"
                        if full in modules:
                            graph[name].add((full, None))
                        elif base in modules:
                            graph[name].add((base, alias.name))
                visit(child)

        visit(ast.parse(path.read_text(), filename=str(path)))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"a"}}) == [["a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_curation_and_train():
    graph = import_graph()
    assert "curation.validation" in graph["curation.cli.pipeline"]  # the walker sees lazy imports too
    assert cycles(graph) == []


def test_stage_modules_never_import_the_config():
    graph = import_graph()
    for module, imports in graph.items():
        if module.startswith("curation.stages") or module.startswith("curation.sources"):
            assert "curation.validation" not in imports, module
        if module.startswith("curation.stages"):
            assert "curation.config" not in imports, module


def test_validate_imports_neither_torch_nor_spacy():
    """`curate validate` stays instant: the registry and the checks load no model library."""
    code = (
        "import sys; from curation.cli import main; "
        "rc = main(['validate', 'pipelines/demo.yaml']); "
        "print(rc, sorted(m for m in ('torch', 'spacy', 'img2dataset', 'easyocr') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "0 []"


# --------------------------------------------------------------------------- layers

LAYERS = ("core", "models", "curation", "train", "cli")
# A layer is a package: every module inside it belongs to it. The rest of `curation` is the curation
# layer, all of `train` the train layer.
LAYER_PACKAGES = {"curation.core": "core", "curation.models": "models", "curation.cli": "cli"}


def layer(module: str) -> str:
    if module.endswith(".__main__"):
        # the entry points (`curate`, `python -m train`): they register `train`'s commands, so they
        # alone see everything, like the CLI package
        return "cli"
    if module.split(".")[0] == "train":
        return "train"
    return LAYER_PACKAGES.get(".".join(module.split(".")[:2]), "curation")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{module} ({layer(module)}) imports {target} ({layer(target)})"
        for module, targets in graph.items()
        for target in targets
        if LAYERS.index(layer(target)) > LAYERS.index(layer(module))
    )


def test_the_layer_checker_finds_an_upward_import():
    assert upward_imports({"curation.models.clip": {"curation.core.imageio", "train.model"}}) == [
        "curation.models.clip (models) imports train.model (train)"
    ]
    assert upward_imports({"curation.core.imageio": {"curation.stages.base"}}) != []
    assert upward_imports({"curation.cli": {"train.cli"}, "train.loop": {"curation.models.clip"}}) == []


def test_layers_are_packages():
    assert layer("curation.core.imageio") == "core" and layer("curation.core") == "core"
    assert layer("curation.cli.argtypes") == "cli" and layer("curation.models.ocr") == "models"
    assert layer("curation.stages.base") == "curation" and layer("curation.corex") == "curation"
    assert layer("train.loop") == "train" and layer("train.__main__") == "cli"


def test_imports_run_down_the_layers():
    """core -> models -> curation -> train -> cli: no module imports one of a higher layer."""
    graph = import_graph()
    assert {layer(m) for m in graph} == set(LAYERS)  # every layer is populated, so the test can fail
    assert upward_imports(graph) == []


def test_curation_never_imports_train():
    graph = import_graph()
    offenders = [
        f"{module} imports {target}"
        for module, targets in graph.items()
        if module.startswith("curation") and layer(module) != "cli"
        for target in targets
        if target.startswith("train")
    ]
    assert offenders == []


def test_train_uses_only_the_public_surface_of_curation():
    """No `from curation.x import _private` (nor a private module) in `train`."""
    offenders = [
        f"{module}: {target}{'.' + name if name else ''}"
        for module, names in imported_names().items()
        if module.startswith("train")
        for target, name in names
        if target.startswith("curation")
        and (any(part.startswith("_") for part in target.split(".")) or (name or "").startswith("_"))
    ]
    assert offenders == []


def test_reading_training_and_mining_configs_loads_no_stage():
    """train's configs reuse curation's YAML reader, which must not import the stage registry."""
    code = (
        "import sys, train.config, train.mining.config; "
        "print(sorted(m for m in sys.modules if m.startswith('curation.stages')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- rules inside the layers

# (rule, who is bound by it, what it may not import). Each was broken once by a few lines; what both
# sides share lives lower down instead (curation/core: cluster, outputs, phash, text).
RULES = [
    (
        "reading a config loads no stage: the registry is passed in (`stages=STAGES`)",
        lambda m: m == "curation.config",
        lambda t: t.startswith("curation.stages"),
    ),
    (
        "readers load no stage: the manifest's stage columns are passed in",
        lambda m: m.startswith("curation.sources"),
        lambda t: t.startswith("curation.stages"),
    ),
    (
        "the trainer joins Ray through curation.core.cluster, not the pipeline's engine",
        lambda m: m.startswith("train"),
        lambda t: t.startswith("curation.engine"),
    ),
    (
        "the trainer locks its outputs through curation.core.outputs, not the run directory",
        lambda m: m.startswith("train"),
        lambda t: t == "curation.rundir",
    ),
    (
        "outside the stages (and the CLI listing them) only the registry is imported, never a stage's module",
        lambda m: not m.startswith("curation.stages") and layer(m) != "cli",
        lambda t: t.startswith("curation.stages."),
    ),
    (
        "train's config readers read text; model files are checked in train.validation",
        lambda m: m in ("train.config", "train.mining.config"),
        lambda t: t in ("curation.models.files", "curation.models.clip", "curation.models.teachers"),
    ),
]


def broken_rules(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{module} imports {target}: {rule}"
        for rule, bound, forbidden in RULES
        for module, targets in graph.items()
        if bound(module)
        for target in targets
        if forbidden(target)
    )


def test_the_rule_checker_finds_a_broken_rule():
    graph = {
        "curation.config": {"curation.stages"},
        "curation.sources.base": {"curation.stages"},
        "train.mining.run": {"curation.engine.ray", "curation.rundir"},
        "curation.near_duplicates": {"curation.stages.caption"},
        "train.config": {"curation.models.files"},
        "curation.validation": {"curation.stages", "curation.models.files"},  # allowed
        "curation.cli.pipeline": {"curation.stages.base"},  # allowed
    }
    assert len(broken_rules(graph)) == 6


def test_rules_inside_the_layers_hold():
    assert broken_rules(import_graph()) == []
