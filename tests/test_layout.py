"""The layout is the architecture: the runtime (nanojet/{llm,tokenizer}.py, engine/, model/, kernels/) never
imports the extras (serve/, train/, bench/, tools/, the embedded model's build recipe), and no two modules of the
package import each other, directly or around a cycle, at any depth (imports inside functions count too)."""
import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "nanojet"
RUNTIME = ("nanojet", "nanojet.llm", "nanojet.tokenizer", "nanojet.engine", "nanojet.model", "nanojet.kernels")
EXTRAS = ("nanojet.serve", "nanojet.train", "nanojet.bench", "nanojet.tools", "nanojet.weights")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that `path` imports anywhere in its body (`from a.b import c` counts a.b.c when that
    is a module, else a.b)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imported_modules(p, modules) for p in paths}


def in_group(module: str, groups: tuple[str, ...]) -> bool:
    return any(module == g or module.startswith(g + ".") for g in groups)


def is_runtime(module: str) -> bool:
    return module in RUNTIME[:3] or in_group(module, RUNTIME[3:])


def test_the_runtime_never_imports_the_extras():
    graph = import_graph()
    assert is_runtime("nanojet.engine.round") and not is_runtime("nanojet.serve.server")
    crossings = {(m, d) for m, deps in graph.items() if is_runtime(m) for d in deps if in_group(d, EXTRAS)}
    assert not crossings


def test_no_import_cycles():
    graph = import_graph()
    assert graph["nanojet.llm"] >= {"nanojet.engine.engine", "nanojet.model.qwen3"}  # the graph sees imports
    state: dict[str, str] = {}

    def visit(module: str, stack: list[str]) -> None:
        state[module] = "open"
        for dependency in sorted(graph[module]):
            if dependency.rpartition(".")[0] == module or module == "nanojet":
                continue  # a package importing its own submodules is how packages work, not a cycle
            assert state.get(dependency) != "open", " -> ".join(stack + [dependency])
            if dependency not in state:
                visit(dependency, stack + [dependency])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
