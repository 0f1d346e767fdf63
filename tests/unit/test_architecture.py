"""The shape of the tree, checked: sizes in agent/, the import contracts, and test hygiene.

- No module in agent/ over 500 lines, no class over 300, no function over 60 (data tables listed in
  EXCEPTIONS with a reason).
- The import-linter contracts in pyproject.toml (run by `make lint`) can fail: a copy of the
  package with one planted violation per contract must be reported.
- Tests import neither benchmarks (benchmarks may import tests/kits, never the reverse) nor other
  test modules (shared helpers live in tests/kits or a conftest).
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "agent"
TESTS = ROOT / "tests"

MAX_MODULE_LINES = 500
MAX_CLASS_LINES = 300
MAX_FUNCTION_LINES = 60

# "path/relative/to/root.py:Qualified.name" -> why it may be longer than the limit. Only data
# tables (declarations read top to bottom, no logic) belong here.
EXCEPTIONS: dict[str, str] = {
    "agent/obs/metrics.py:Metrics.__init__": (
        "the metric declarations: one Counter/Gauge per attribute, a table with no logic"
    ),
}


def _python_files(top: Path) -> Iterator[Path]:
    for path in sorted(top.rglob("*.py")):
        if "node_modules" not in path.parts:
            yield path


def _definitions(
    node: ast.AST, prefix: str = ""
) -> Iterator[tuple[str, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Every class and function under `node`, nested ones included, with its qualified name."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            qualname = f"{prefix}{child.name}"
            yield qualname, child
            yield from _definitions(child, f"{qualname}.")
        else:
            yield from _definitions(child, prefix)


def size_offenders(package: Path = PACKAGE, exceptions: dict[str, str] = EXCEPTIONS) -> list[str]:
    offenders: list[str] = []
    for path in _python_files(package):
        rel = path.relative_to(package.parent).as_posix()
        text = path.read_text(encoding="utf-8")
        lines = len(text.splitlines())
        if lines > MAX_MODULE_LINES and rel not in exceptions:
            offenders.append(f"{rel}: module {lines} lines > {MAX_MODULE_LINES}")
        for qualname, node in _definitions(ast.parse(text, filename=str(path))):
            assert node.end_lineno is not None
            length = node.end_lineno - node.lineno + 1
            kind, limit = (
                ("class", MAX_CLASS_LINES)
                if isinstance(node, ast.ClassDef)
                else ("function", MAX_FUNCTION_LINES)
            )
            if length > limit and f"{rel}:{qualname}" not in exceptions:
                offenders.append(f"{rel}:{qualname}: {kind} {length} lines > {limit}")
    return offenders


def test_agent_modules_classes_and_functions_stay_small() -> None:
    offenders = size_offenders()
    assert not offenders, f"{len(offenders)} over the size limits:\n" + "\n".join(offenders)


def test_exceptions_name_definitions_that_exist() -> None:
    known: set[str] = set()
    for path in _python_files(PACKAGE):
        rel = path.relative_to(ROOT).as_posix()
        known.add(rel)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        known.update(f"{rel}:{qualname}" for qualname, _ in _definitions(tree))
    stale = sorted(set(EXCEPTIONS) - known)
    assert not stale, f"EXCEPTIONS name things that no longer exist: {stale}"


def test_size_check_catches_an_oversized_function(tmp_path: Path) -> None:
    package = tmp_path / "agent"
    package.mkdir()
    body = "".join(f"        x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    (package / "big.py").write_text(f"class C:\n    def f(self) -> None:\n{body}")
    assert size_offenders(package, {}) == [
        f"agent/big.py:C.f: function {MAX_FUNCTION_LINES + 1} lines > {MAX_FUNCTION_LINES}"
    ]


# --- import contracts -----------------------------------------------------------------------

# One planted violation per contract in pyproject.toml, each in a module of its own so that the
# check does not depend on today's file names: (new module, its source, what the report must
# then contain).
HOST_CYCLE = "No cycles are allowed in agent.host."
PLANTED = [
    # layers: the bottom row importing the top.
    ("agent/host/planted_up.py", "import agent.cli", "agent.host.planted_up -> agent.cli"),
    # cloud: the restore side loading the edge store.
    ("agent/cloud/planted_store.py", "import agent.store",
     "agent.cloud.planted_store -> agent.store"),
    # acyclic: two modules of one room importing each other.
    ("agent/host/planted_a.py", "import agent.host.planted_b", HOST_CYCLE),
    ("agent/host/planted_b.py", "import agent.host.planted_a", HOST_CYCLE),
]


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    executable = Path(sys.executable).parent / "lint-imports"
    assert executable.exists(), "import-linter is missing: install the dev extra"
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(executable), "--no-cache", "--config", str(root / "pyproject.toml")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_import_contracts_report_planted_violations(tmp_path: Path) -> None:
    shutil.copytree(PACKAGE, tmp_path / "agent", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    for rel, source, _ in PLANTED:
        (tmp_path / rel).write_text(f"{source}  # planted by test_architecture\n")

    result = _lint_imports(tmp_path)

    report = result.stdout + result.stderr
    assert result.returncode != 0, report
    # The planted modules exist only in the copy: their names in the report also show that the
    # copy, not an installed agent package, was analysed.
    missing = [expected for _, _, expected in PLANTED if expected not in report]
    assert not missing, f"lint-imports did not report {missing}:\n{report}"


# --- test hygiene ---------------------------------------------------------------------------


def _imported_modules(path: Path) -> Iterator[tuple[int, str]]:
    """Absolute names of every module `path` imports (nested and relative imports included,
    and importlib.import_module("...") with a literal name)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            yield node.lineno, module
            for alias in node.names:
                yield node.lineno, f"{module}.{alias.name}"
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id)
            == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.lineno, node.args[0].value


def _importers_of(prefixes: tuple[str, ...]) -> list[str]:
    found: dict[str, str] = {}
    for path in _python_files(TESTS):
        for lineno, module in _imported_modules(path):
            if any(module == p or module.startswith(f"{p}.") for p in prefixes):
                found.setdefault(f"{path.relative_to(ROOT)}:{lineno}", module)
    return [f"{where}: imports {module}" for where, module in sorted(found.items())]


def test_tests_do_not_import_benchmarks() -> None:
    found = _importers_of(("benchmarks",))
    assert not found, (
        "tests run benchmarks as users do (python -m benchmarks.X) or share code through "
        "tests/kits:\n" + "\n".join(found)
    )


def test_tests_do_not_import_other_test_modules() -> None:
    found = _importers_of(("tests.unit", "tests.system"))
    assert not found, "shared test code belongs in tests/kits or a conftest:\n" + "\n".join(found)
