"""The shape of the code (docs/design.md, "Module map"), checked on the source: no import
circles, no module using another's private names, zarr internals in one module, every
error raised a ProbeEngineError, and the import name ``kernels`` left to whoever owns it."""

from __future__ import annotations

import ast
import builtins
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: the package's modules, by dotted name (kernels/ installs as engine.kernels)
SOURCES = {
    **{"engine." + p.relative_to(ROOT / "engine").with_suffix("").as_posix().replace("/", "."):
       p for p in (ROOT / "engine").rglob("*.py")},
    **{"engine.kernels." + p.stem: p for p in (ROOT / "kernels").glob("*.py")},
}
SOURCES = {name.removesuffix(".__init__"): path for name, path in SOURCES.items()}
#: every Python file whose use of private names and zarr internals is checked
CHECKED = sorted({*SOURCES.values(), *(ROOT / "tests").rglob("*.py"),
                  *(ROOT / "benchmarks").rglob("*.py"), *(ROOT / "examples").rglob("*.py")})


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _module_of(path: Path) -> str | None:
    return next((name for name, p in SOURCES.items() if p == path), None)


def _absolute(module: str | None, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` reads from (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if module else []
    if module and not SOURCES[module].name == "__init__.py":
        package = package[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, names imported from it, line) of every import, lazy ones included."""
    module = _module_of(path)
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((_absolute(module, node), [a.name for a in node.names], node.lineno))
    return out


def _engine_targets(source: str, names: list[str]) -> list[str]:
    """The engine modules an import reaches: the module itself, or the submodules named."""
    hits = [f"{source}.{n}" for n in names if f"{source}.{n}" in SOURCES]
    if source in SOURCES and len(hits) < len(names):
        hits.append(source)
    return hits


def test_no_import_circles():
    graph = {name: set() for name in SOURCES if name != "engine"}
    for name in graph:
        for source, names, _ in _imports(SOURCES[name]):
            graph[name] |= {t for t in _engine_targets(source, names)
                            if t != name and t != "engine"}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def _private_uses(path: Path) -> list[str]:
    """Uses of another module's ``_private`` names: ``from m import _x``, ``m._x``,
    ``setattr(m, "_x", ...)`` (monkeypatch included), where ``m`` is an engine module."""
    tree = ast.parse(path.read_text(), str(path))
    own = _module_of(path)
    aliases: dict[str, str] = {}  # local name -> engine module
    found = []

    def private(name: str) -> bool:
        return name.startswith("_") and not name.startswith("__")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "engine":
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else "engine"
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(own, node)
            for a in node.names:
                if f"{source}.{a.name}" in SOURCES:
                    aliases[a.asname or a.name] = f"{source}.{a.name}"
                elif source in SOURCES and source != own and private(a.name):
                    found.append(f"{_rel(path)}:{node.lineno}: from {source} import {a.name}")
        elif (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
              and getattr(node.value.func, "attr", "") == "import_module"
              and node.value.args and isinstance(node.value.args[0], ast.Constant)):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    aliases[target.id] = node.value.args[0].value

    def module_of(expr: ast.expr) -> str | None:
        if isinstance(expr, ast.Name):
            return aliases.get(expr.id)
        if (isinstance(expr, ast.Call) and getattr(expr.func, "attr", "") == "import_module"
                and expr.args and isinstance(expr.args[0], ast.Constant)):
            return expr.args[0].value
        if isinstance(expr, ast.Attribute):
            parent = module_of(expr.value)
            if parent and f"{parent}.{expr.attr}" in SOURCES:
                return f"{parent}.{expr.attr}"
        return None

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and private(node.attr):
            target = module_of(node.value)
            if target and target != own and f"{target}.{node.attr}" not in SOURCES:
                found.append(f"{_rel(path)}:{node.lineno}: {target}.{node.attr}")
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(
                node.func, "id", "")) == "setattr" and len(node.args) >= 2
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
              and private(node.args[1].value)):
            target = module_of(node.args[0])
            if target and target != own:
                found.append(f"{_rel(path)}:{node.lineno}: setattr({target}, "
                             f"{node.args[1].value!r})")
    return found


def test_no_module_uses_another_modules_private_names():
    found = [use for path in CHECKED for use in _private_uses(path)]
    assert not found, "private names used outside their module:\n" + "\n".join(found)


def test_zarr_internals_live_in_one_module():
    allowed = {ROOT / "engine" / "_zarr.py", ROOT / "tests" / "test_zarr_compat.py",
               Path(__file__).resolve()}
    found = []
    for path in CHECKED:
        if path in allowed:
            continue
        for source, _names, line in _imports(path):
            if source.startswith(("zarr.core", "zarr.abc")) or any(
                    part.startswith("_") for part in source.split(".")[1:]
                    if source.startswith("zarr")):
                found.append(f"{_rel(path)}:{line}: {source}")
        text = path.read_text()
        for word in ("._put", "_atomic_write", "_encode_single", ".partial\""):
            if word in text:
                found.append(f"{_rel(path)}: {word}")
    assert not found, "zarr internals outside engine/_zarr.py:\n" + "\n".join(found)


def test_every_raised_error_is_a_probe_engine_error():
    """``raise ValueError(...)`` and friends: the public paths raise engine.errors classes
    (which also derive from the builtins), so one ``except ProbeEngineError`` catches all."""
    builtin_errors = {name for name, obj in vars(builtins).items()
                      if isinstance(obj, type) and issubclass(obj, BaseException)}
    found = []
    for path in SOURCES.values():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                func = node.exc.func
                called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
                # kernels/_shadow.py stands in for an absent module: the import system's own
                if called in builtin_errors and (path.name, called) != ("_shadow.py",
                                                                        "ModuleNotFoundError"):
                    found.append(f"{_rel(path)}:{node.lineno}: raise {called}")
    assert not found, "builtin errors raised:\n" + "\n".join(found)


def test_the_import_name_kernels_is_not_ours():
    """kernels/ installs as engine.kernels: PyPI's `kernels` stays importable beside us."""
    from importlib.machinery import PathFinder

    import engine.kernels

    assert engine.kernels.__spec__.name == "engine.kernels"
    assert (Path(engine.kernels.__file__).parent / "softmax_xent.cu").exists()
    # every way `import kernels` could resolve, but this checkout's root on sys.path
    paths = [p for p in sys.path if p and Path(p).resolve() != ROOT]
    specs = [PathFinder.find_spec("kernels", paths)]
    specs += [finder.find_spec("kernels", None) for finder in sys.meta_path
              if finder is not PathFinder and hasattr(finder, "find_spec")]
    assert not [s for s in specs if s is not None
                and Path(str(s.origin)).parent == ROOT / "kernels"]


def _module_map() -> dict[str, int]:
    """docs/design.md's module map: module -> its row (imports must point to rows above or
    to their own)."""
    text = (ROOT / "docs" / "design.md").read_text()
    table = text[text.index("## 8. Module map"):]
    rank = {}
    for row, line in enumerate(x for x in table.splitlines() if x.startswith("| `")):
        for name in line.split("|")[1].replace("`", "").replace(" ", "").split(","):
            if name.startswith("kernels/"):
                rank.update({m: row for m in SOURCES if m.startswith("engine.kernels")})
            else:
                rank["engine." + name.removesuffix(".py")] = row
    return rank


def test_imports_follow_the_module_map():
    rank = _module_map()
    modules = set(SOURCES) - {"engine"}
    assert modules <= set(rank), f"not in docs/design.md's module map: {modules - set(rank)}"
    assert set(rank) <= modules, f"in the module map, not in engine/: {set(rank) - modules}"
    upward = []
    for name in sorted(modules):
        for source, names, line in _imports(SOURCES[name]):
            for target in _engine_targets(source, names):
                if target in rank and rank[target] > rank[name]:
                    upward.append(f"{_rel(SOURCES[name])}:{line}: imports {target}, listed "
                                  f"below it")
    assert not upward, "imports up the module map:\n" + "\n".join(upward)


def test_import_kernels_from_the_checkout_root_is_the_installed_distribution():
    """With the checkout's root on sys.path (python -m pytest, python -m benchmarks), `import
    kernels` (transformers does) gets PyPI's `kernels`, or fails as an absent module does;
    never this folder, whose relative imports would break."""
    import subprocess

    code = ("import sys, importlib.util\n"
            "try:\n    import kernels\nexcept ModuleNotFoundError as e:\n"
            "    print('absent', e.name); sys.exit(0)\n"
            "print('origin', kernels.__spec__.origin)\n"
            "import engine.kernels\nprint('ours', engine.kernels.__spec__.origin)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split("\n")
    if out[0].startswith("absent"):
        assert out[0] == "absent kernels"
        return
    assert Path(out[0].removeprefix("origin ")).parent != ROOT / "kernels", out
    assert out[1] == f"ours {ROOT / 'kernels' / '__init__.py'}"
