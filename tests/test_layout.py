"""The package layout: hf_mlrs's modules import each other one way (no cycle), the core needs no transformers, and
the package needs nothing beyond its install_requires (what only the recipes need lives in recipes/)."""

import ast
import re
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hf_mlrs"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> dict[str, set[str]]:
    """Every hf_mlrs module `path` imports, at module level or inside a function (a lazy import is still a
    dependency of the design), and every external top-level package, as {"internal": ..., "external": ...}."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    internal, external = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from . import pretrained` imports a module; `from . import __version__` imports the package itself.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] == "hf_mlrs":
                internal.add(target)
            else:
                external.add(target.split(".")[0])
    return {"internal": internal - {name}, "external": external}


def import_graph() -> dict[str, dict[str, set[str]]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): imports_of(f, modules) for f in files}


def test_no_import_cycle_between_modules():
    # The package's __init__ only re-exports, and modules may read `__version__` from it: it is left out.
    graph = {m: {t for t in v["internal"] if t != "hf_mlrs"} for m, v in import_graph().items() if m != "hf_mlrs"}
    done, path = set(), []

    def visit(module):
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        path.append(module)
        for target in sorted(graph.get(module, ())):
            visit(target)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_modeling_hub_and_card_depend_one_way():
    graph = import_graph()
    assert {"hf_mlrs.hub", "hf_mlrs.card"} <= graph["hf_mlrs.modeling"]["internal"]
    assert "hf_mlrs.modeling" not in graph["hf_mlrs.hub"]["internal"] | graph["hf_mlrs.card"]["internal"]


def test_the_core_needs_no_transformers():
    graph = import_graph()
    for module in ("hf_mlrs.modeling", "hf_mlrs.scheduler", "hf_mlrs.hub", "hf_mlrs.card", "hf_mlrs.pretrained"):
        assert "transformers" not in graph[module]["external"], module


def test_the_package_imports_only_what_it_requires():
    setup = (ROOT / "setup.py").read_text()
    requires = re.search(r"install_requires=\[(.*?)\]", setup, flags=re.S).group(1)
    allowed = {re.match(r"[\w-]+", r).group(0).replace("-", "_") for r in re.findall(r'"([^"]+)"', requires)}
    for module, deps in import_graph().items():
        extra = deps["external"] - allowed - sys.stdlib_module_names
        assert not extra, f"{module} imports {sorted(extra)}, which `pip install hf_mlrs` does not install"
