"""How the modules import each other, read from their source (nothing is imported): one way, the
algorithm without vLLM, the benchmarks without the tests."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("vllm_lookahead", "benchmarks")
VLLM_FACING = {"__init__", "cli", "metrics", "plugin", "proposer", "vllm_compat"}
"""The package's modules that may import vLLM; every other one (the drafting algorithm, its
simulated engine, and any module added later) must not."""


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
                             if (ROOT / node.module / f"{alias.name}.py").exists())
    return found


def project_graph() -> dict[str, set[str]]:
    modules = {f"{pkg}.{p.stem}": p for pkg in PACKAGES for p in (ROOT / pkg).glob("*.py")}
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


def test_the_graph_reader_sees_imports_inside_functions_and_from_packages(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import os\nfrom vllm_lookahead import kernels\n"
                      "def f():\n    from vllm.config import X\n")
    assert imported_modules(source) >= {"os", "vllm.config", "vllm_lookahead.kernels"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_modules_import_each_other_one_way():
    assert cycles(project_graph()) == []


def test_the_algorithm_never_imports_vllm():
    algorithm = sorted(p for p in (ROOT / "vllm_lookahead").glob("*.py")
                       if p.stem not in VLLM_FACING)
    assert {p.stem for p in algorithm} >= {"drafter", "kernels", "reference_drafter", "simulation"}
    for path in algorithm:
        imports = imported_modules(path)
        assert not {m for m in imports if m == "vllm" or m.startswith("vllm.")}, path.name


def test_the_benchmarks_never_import_the_tests():
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        imports = imported_modules(path)
        assert not {m for m in imports if m == "tests" or m.startswith("tests.")}, path.name
