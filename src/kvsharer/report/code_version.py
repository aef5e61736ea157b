"""The version of one table's or one figure's code, so that the DAG reruns exactly the jobs whose code changed.

A table is built by its entry in ``tables.build_tables`` (``"table1": lambda: table1(results, ...)``), a figure
by its entry in ``figures.build_figures``. Its version is a hash of that entry, of the stage's ``main``
(``kvsharer.stages.tables`` or ``figures``, which reads the inputs and writes the files; the other entries left
out) and of every module-level
function, class or constant it reaches, followed through relative imports (``from .x import y``, ``from ..report.x import y``) into the other
report and stage modules
(``collect.py`` for reading the results, ``tables.py`` for the figures drawn from a table). The hash is
taken over the syntax tree (``ast.dump``): comments, docstrings' layout and blank lines do not count; a
changed line of ``fig_passkey`` changes the passkey figure's version only, a changed line of
``collect.results_frame`` every table and figure built from it. Standard library only: the Snakefile calls
this while it builds the DAG.
"""

from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILDERS = {"table": ("tables.py", "build_tables"), "figure": ("figures.py", "build_figures")}
STAGES = "stages"  # the stage that writes them: a sibling package of the report, file of the same name


def _module(path: Path) -> tuple[dict[str, ast.AST], dict[str, tuple[Path, str]]]:
    """``(top-level definitions by name, names imported from sibling modules -> (file, name))``."""
    return _parse(path, path.read_text())


@lru_cache(maxsize=None)
def _parse(path: Path, text: str) -> tuple[dict[str, ast.AST], dict[str, tuple[Path, str]]]:
    tree = ast.parse(text, filename=str(path))
    defs: dict[str, ast.AST] = {}
    imports: dict[str, tuple[Path, str]] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defs[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        defs[name.id] = node
        elif isinstance(node, ast.ImportFrom) and node.level >= 1 and node.module:
            base = path.parent.joinpath(*[".."] * (node.level - 1), *node.module.split("."))
            source = base.with_suffix(".py") if base.with_suffix(".py").exists() else base / "__init__.py"
            for alias in node.names:
                imports[alias.asname or alias.name] = (source.resolve(), alias.name)
    return defs, imports


def _names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _entry(path: Path, builder: str, name: str) -> ast.AST:
    """The value of ``name``'s key in the dict that ``builder`` returns."""
    defs, _ = _module(path)
    for node in ast.walk(defs[builder]):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == name:
                    return value
    raise ValueError(f"{builder} in {path.name} has no entry {name!r}")


def code_version(kind: str, name: str, root: Path = HERE) -> str:
    """12 hex digits of the code that builds table or figure ``name`` (``kind``: table or figure; ``root``:
    the report package's folder)."""
    file, builder = BUILDERS[kind]
    start = Path(root).resolve() / file
    entry = _entry(start, builder, name)
    parts = [ast.dump(entry)]
    # the entry's code, and the stage's own (reading the inputs, writing the files) except the other entries
    seen: set[tuple[Path, str]] = {(start, builder)}
    todo = [(start, n) for n in _names(entry)] + [(start.parent.parent / STAGES / file, "main")]
    while todo:
        path, symbol = todo.pop()
        if (path, symbol) in seen:
            continue
        seen.add((path, symbol))
        defs, imports = _module(path)
        if symbol in imports:
            todo.append(imports[symbol])
        elif symbol in defs:
            node = defs[symbol]
            parts.append(f"{path.name}:{symbol}:{ast.dump(node)}")
            todo += [(path, n) for n in _names(node)]
    # a definition reached in two files of one name (the report's tables.py and the stage's) counts once
    digest = hashlib.sha256("\n".join(sorted(set(parts))).encode())
    return digest.hexdigest()[:12]
