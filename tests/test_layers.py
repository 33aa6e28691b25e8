"""How the modules import each other, read from their source (nothing is imported): one way, the
algorithm without vLLM, the production path without the reference specification, the benchmarks
without the tests, and no module too large to read."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("vllm_lookahead", "vllm_lookahead.reference", "benchmarks")
VLLM_FACING = {"__init__", "cli", "cpu_workarounds", "engine_requests", "metrics", "plugin",
               "proposer", "runner_hooks", "vllm_boundary"}
"""The package's modules that may import vLLM; every other one (the drafting algorithm, its
simulated engine, and any module added later) must not."""
NAMED_CONCEPTS = {"jacobi_window", "ngram_cache", "context_index", "chain", "drafter", "step"}
"""The modules the production drafter is organised around (the algorithm's concepts)."""
MAX_LINES = 500


def module_path(name: str) -> Path:
    return ROOT / Path(*name.split(".")).with_suffix(".py")


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at its top or inside a function; `from pkg import mod`
    counts as `pkg.mod` where `mod` is one of the package's modules."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            if node.module in PACKAGES:
                found.update(f"{node.module}.{alias.name}" for alias in node.names
                             if module_path(f"{node.module}.{alias.name}").exists())
    return found


def project_graph() -> dict[str, set[str]]:
    modules = {f"{pkg}.{p.stem}": p for pkg in PACKAGES
               for p in module_path(pkg).with_suffix("").glob("*.py")}
    return {name: {m for m in imported_modules(path) if m in modules}
            for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, done = [], set()

    def visit(node: str, path: list[str]) -> None:
        for dep in sorted(graph[node]):
            if dep in path:
                found.append([*path[path.index(dep):], dep])
            elif dep not in done:
                visit(dep, [*path, dep])
        done.add(node)

    for node in sorted(graph):
        visit(node, [node])
    return found


def reachable(graph: dict[str, set[str]], roots: set[str]) -> set[str]:
    seen, todo = set(), list(roots)
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(graph[node])
    return seen


def test_the_graph_reader_sees_imports_inside_functions_and_from_packages(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import os\nfrom vllm_lookahead import step\n"
                      "from vllm_lookahead.reference import chain\n"
                      "def f():\n    from vllm.config import X\n")
    assert imported_modules(source) >= {"os", "vllm.config", "vllm_lookahead.step",
                                        "vllm_lookahead.reference.chain"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    assert reachable({"a": {"b"}, "b": set(), "c": {"a"}}, {"a"}) == {"a", "b"}


def test_modules_import_each_other_one_way():
    assert cycles(project_graph()) == []


def test_the_production_path_runs_the_named_concepts_and_never_the_reference():
    graph = project_graph()
    production = reachable(graph, {"vllm_lookahead.proposer", "vllm_lookahead.plugin",
                                   "vllm_lookahead.__init__"})
    assert {f"vllm_lookahead.{name}" for name in NAMED_CONCEPTS} <= production
    assert not {m for m in production if m.startswith("vllm_lookahead.reference")}


def test_the_algorithm_never_imports_vllm():
    algorithm = sorted(p for p in (ROOT / "vllm_lookahead").rglob("*.py")
                       if p.stem not in VLLM_FACING or p.parent.name == "reference")
    assert {p.stem for p in algorithm} >= NAMED_CONCEPTS | {"simulation"}
    for path in algorithm:
        imports = imported_modules(path)
        assert not {m for m in imports if m == "vllm" or m.startswith("vllm.")}, path.name


def test_the_benchmarks_never_import_the_tests():
    for path in sorted((ROOT / "benchmarks").rglob("*.py")):
        imports = imported_modules(path)
        assert not {m for m in imports if m == "tests" or m.startswith("tests.")}, path.name


def test_no_module_is_too_long_to_read():
    for folder in ("vllm_lookahead", "benchmarks", "tests", "scripts"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            assert len(path.read_text().splitlines()) <= MAX_LINES, path
