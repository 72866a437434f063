"""A fingerprint of the library code a workflow stage runs, so that code changes rerun it.

Snakemake does not track the code of an installed package. Each rule therefore gets,
as a param, the fingerprint of its entry module: a short hex digest over

- every module of the package that the entry imports, transitively (its *import
  closure*, found statically from the source, see :func:`import_closure`), each hashed
  on its normalised syntax tree: no docstrings or other bare string statements, no
  line or column numbers. Comments, docstrings, blank lines and formatting do not
  count; any change to the code does, including type hints and default values;
- the installed versions of the runtime dependencies (:func:`runtime_dependencies`:
  fedmia's declared dependencies but the workflow's own tools, not the test tools),
  without their build's local label (``+cpu``, ``+cu128``);
- with ``plugins`` (the config's plugin modules, which every job imports), each plugin
  module and what it imports of its own package (or the file alone, for a plugin that
  is a single module), hashed the same way, and the package modules it imports (with
  their closure). A code change in a plugin reruns every stage, since every stage
  imports it.

A code change in a module a stage imports changes that stage's fingerprint, and
Snakemake reruns its jobs (and everything downstream); a change elsewhere in the
package does not. Use from the workflow (runs at parse time, in a small fraction of
a second, and imports nothing but the standard library and ``fedmia/__init__.py``,
which must stay free of heavy imports)::

    from fedmia.core.fingerprint import fingerprint

    rule train:
        params:
            code=fingerprint("fedmia.stages.train"),

From a shell, to see what a stage's fingerprint covers (for example before deciding
that an edit was cosmetic and ``snakemake --touch`` is safe)::

    python -m fedmia.core.fingerprint fedmia.pipeline

Scope and choices:

- A kind registered by a dotted path (``impl="module:attr"``, a network that needs torch
  at import) counts as an import of that module.
- Imports are found by reading the source with :mod:`ast`, never by importing it:
  ``import pkg.x``, ``from pkg import x``, ``from pkg.x import y``, relative
  imports, and imports anywhere in a file (inside functions, ``try``, ``if``), since
  they may run. Imports inside ``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``)
  are left out: they never run, so they cannot change a result.
- Importing ``pkg.a.b`` runs ``pkg/__init__.py`` and ``pkg/a/__init__.py``; both are
  in the closure.
- ``from pkg.m import x`` (absolute or relative, ``pkg.m`` may be ``pkg``) follows
  ``pkg.m`` and, when ``pkg.m`` is a package with a submodule ``x``, that submodule,
  even if ``pkg/m/__init__.py`` also binds ``x`` (over-inclusion only costs a rerun;
  a miss would leave results stale). Otherwise ``x`` must be a name that ``pkg.m``
  binds at module level, else :class:`ClosureError`. ``from pkg import *`` follows
  the submodules named in a literal ``__all__``.
- Not seen: imports by computed name (``importlib.import_module(name)``), attribute
  access to a submodule nobody imported, data files, and libraries other than the
  runtime dependencies.
- Only regular packages (directories with ``__init__.py``) are supported.

The digest does not depend on the process (no :func:`hash`, sorted inputs) or the
machine (module names, not paths), nor on the Python version for code that parses
to the same tree: the tree is written out without its empty fields, which newer
Pythons add.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.metadata
import importlib.util
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

#: Declared dependencies that run the workflow but compute nothing of its results: their
#: versions are left out of the fingerprints (a new Snakemake reruns nothing).
WORKFLOW_TOOLS = ("snakemake", "jsonschema", "pyyaml")
#: The runtime dependencies where fedmia's distribution metadata cannot be read (a copy of
#: the source on ``PYTHONPATH`` without an install): the compute libraries.
FALLBACK_DEPENDENCIES = (
    "dp-accounting",
    "matplotlib",
    "numpy",
    "pandas",
    "pillow",
    "pyarrow",
    "safetensors",
    "scikit-learn",
    "scipy",
    "torch",
)


@lru_cache(maxsize=1)
def runtime_dependencies() -> tuple[str, ...]:
    """The distributions whose installed versions every fingerprint holds.

    fedmia's declared dependencies (its installed metadata, i.e. ``pyproject.toml``'s
    ``[project.dependencies]``, no extras) but :data:`WORKFLOW_TOOLS`; sorted, normalised
    names. Where fedmia is not installed, :data:`FALLBACK_DEPENDENCIES`.
    """
    try:
        requires = importlib.metadata.requires("fedmia") or []
    except importlib.metadata.PackageNotFoundError:
        return FALLBACK_DEPENDENCIES
    names = set()
    for req in requires:
        if "extra ==" in req.replace('"', "").replace("'", ""):
            continue
        name = req.split(";")[0].strip()
        for stop in "[<>=!~ (":
            name = name.split(stop)[0]
        names.add(name.strip().lower().replace("_", "-"))
    return tuple(sorted(names - set(WORKFLOW_TOOLS)))


#: Hex digits of a fingerprint (64 bits).
LENGTH = 16

#: Bumped whenever the normalisation or the digest composition changes.
FORMAT = "fedmia-fingerprint 1"


class ClosureError(ImportError):
    """An import of the package that cannot be resolved statically; names file and line."""


@dataclass(frozen=True)
class _Import:
    """One imported name: ``import module`` (``name`` None) or ``from module import name``."""

    level: int  # 0 = absolute, n = n leading dots
    module: str  # "" for ``from . import name``
    name: str | None
    lineno: int


@dataclass(frozen=True)
class _ModuleInfo:
    """What the closure and the digest need from one source file."""

    digest: str  # sha256 of the normalised tree
    imports: tuple[_Import, ...]  # those that may run (not under ``if TYPE_CHECKING:``)
    names: frozenset[str]  # bound by module-level statements (to check ``from m import name``)
    dynamic: bool  # binds names we cannot list (module ``__getattr__``, star import)
    all_names: tuple[str, ...]  # a literal ``__all__``, else ()


def package_dir(package: str = "fedmia") -> Path:
    """The directory of the installed ``package``, found without importing it.

    Uses :func:`importlib.util.find_spec` on the top-level name, which works for
    editable and regular installs alike.

    Raises:
        ClosureError: ``package`` is not found, or is not a regular package.
    """
    try:
        spec = importlib.util.find_spec(package)
    except ValueError as e:  # in sys.modules without a __spec__
        raise ClosureError(f"cannot locate package '{package}': {e}") from e
    if spec is None:
        raise ClosureError(f"package '{package}' is not installed (not found on sys.path)")
    locations = list(spec.submodule_search_locations or [])
    if spec.origin is None or Path(spec.origin).name != "__init__.py" or len(locations) != 1:
        raise ClosureError(
            f"'{package}' is not a regular package (a directory with "
            f"__init__.py): origin {spec.origin}, locations {locations}"
        )
    return Path(locations[0])


def import_closure(entry: str | Iterable[str], *, root: str | Path | None = None) -> set[str]:
    """The package modules that importing ``entry`` (one module name or several) may run.

    Args:
        entry: dotted module name(s) inside one top-level package, e.g.
            ``"fedmia.pipeline"``.
        root: the package's directory; by default found with :func:`package_dir`
            (tests pass a fake package here).

    Returns:
        Dotted names of the entries, every package module they import transitively
        (see the module docstring for what counts) and the package ``__init__`` of each.

    Raises:
        ClosureError: an entry or an import inside the package cannot be resolved.
        ValueError: no entry, or entries from different top-level packages.
    """
    return set(_closure(*_resolve_entries(entry, root)))


def fingerprint(
    entry: str | Iterable[str],
    *,
    root: str | Path | None = None,
    dependencies: Iterable[str] | None = None,
    plugins: Iterable[str] = (),
) -> str:
    """A short hex digest of the code ``entry`` runs (see the module docstring).

    Args:
        entry: dotted module name(s) inside one top-level package; the fingerprint
            covers the union of their import closures.
        root: the package's directory; by default found with :func:`package_dir`.
        dependencies: distributions whose installed versions are included (read with
            :func:`importlib.metadata.version`, nothing is imported; default:
            :func:`runtime_dependencies`); one that is not installed counts as ``-``.
        plugins: importable modules outside the package that the code imports too (the
            workflow's plugins; found with :func:`importlib.util.find_spec`).

    Returns:
        :data:`LENGTH` lowercase hex digits.
    """
    entries, package, pkg_root = _resolve_entries(entry, root)
    sources = plugin_sources(plugins)
    for name, path in sources.items():
        entries += list(_imported_modules(name, path, _info(path), pkg_root, package))
    lines = [FORMAT]
    for name, path in sorted(_closure(entries, package, pkg_root).items()):
        lines.append(f"module {name} {_info(path).digest}")
    for name, path in sorted(sources.items()):
        lines.append(f"plugin {name} {_info(path).digest}")
    for dist, version in sorted(dependency_versions(dependencies).items()):
        lines.append(f"dist {dist} {version or '-'}")
    text = "\n".join(lines) + "\n"
    return hashlib.sha256(text.encode()).hexdigest()[:LENGTH]


def plugin_sources(plugins: Iterable[str]) -> dict[str, Path]:
    """Module name → source file of each plugin module and of what it imports of its package.

    A plugin that is a single top-level module is its file alone.

    Raises:
        ClosureError: a plugin that cannot be found, or that is no Python source file.
    """
    out: dict[str, Path] = {}
    for name in plugins:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError) as e:
            raise ClosureError(f"plugin '{name}' cannot be found: {e}") from e
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            raise ClosureError(
                f"plugin '{name}' is not a Python source module on sys.path "
                f"(found {spec.origin if spec else None})"
            )
        top = name.partition(".")[0]
        if "." in name or Path(spec.origin).name == "__init__.py":
            out.update(_closure([name], top, package_dir(top)))
        else:
            out[name] = Path(spec.origin)
    return out


def dependency_versions(dependencies: Iterable[str] | None = None) -> dict[str, str | None]:
    """Installed version of each distribution (``None`` if absent), without importing it.

    The local label of a build is dropped (``2.13.0+cpu`` and ``2.13.0+cu128`` are both
    ``2.13.0``), so that a CPU login node and GPU compute nodes agree on the fingerprint.
    Read once per process and distribution (a process is shorter than a ``pip install``).
    """
    deps = runtime_dependencies() if dependencies is None else dependencies
    return {dist: _version(dist) for dist in deps}


@lru_cache(maxsize=64)
def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist).partition("+")[0]
    except importlib.metadata.PackageNotFoundError:
        return None


def normalised_dump(source: str | bytes, filename: str = "<source>") -> str:
    """The syntax tree of ``source`` as text, blind to comments, docstrings and layout.

    Every statement that is a bare string literal (module, class and function
    docstrings, attribute docstrings; all no-ops) is removed, a body left empty
    becomes ``pass``, and the tree is written like :func:`ast.dump` without line and
    column attributes and without empty fields (``None``, ``[]``), so that the text
    is the same on every Python version that parses the code to the same tree.
    """
    tree = ast.parse(source, filename=filename)
    _scan(tree, [], runs=False)
    return _dump(tree)


# --- entries and module files ---------------------------------------------------------


def _entries(entry: str | Iterable[str]) -> list[str]:
    entries = [entry] if isinstance(entry, str) else list(entry)
    if not entries:
        raise ValueError("no entry module given")
    return entries


def _package_of(entry: str | Iterable[str]) -> str:
    packages = {e.partition(".")[0] for e in _entries(entry)}
    if len(packages) != 1:
        raise ValueError(
            f"entries {_entries(entry)} span several packages {sorted(packages)}; "
            "a fingerprint covers one package"
        )
    return packages.pop()


def _resolve_entries(
    entry: str | Iterable[str], root: str | Path | None
) -> tuple[list[str], str, Path]:
    """(entries, top-level package, package directory)."""
    package = _package_of(entry)
    pkg_root = package_dir(package) if root is None else Path(root)
    if pkg_root.name != package:
        raise ValueError(f"root {pkg_root} is not a directory named after package '{package}'")
    return _entries(entry), package, pkg_root


def _locate(pkg_root: Path, package: str, name: str) -> Path | None:
    """The source file of module ``name`` (a package's ``__init__.py`` first), or None."""
    if name != package and not name.startswith(package + "."):
        return None
    parts = name.split(".")[1:]
    if any(not p.isidentifier() for p in parts):
        return None
    init = pkg_root.joinpath(*parts, "__init__.py")
    if init.is_file():
        return init
    if parts:
        module = pkg_root.joinpath(*parts[:-1], parts[-1] + ".py")
        if module.is_file():
            return module
    return None


def _closure(entries: list[str], package: str, pkg_root: Path) -> dict[str, Path]:
    """Module name → source file, for the import closure of ``entries``."""
    closure: dict[str, Path] = {}
    todo = list(entries)
    while todo:
        name = todo.pop()
        if name in closure:
            continue
        path = _locate(pkg_root, package, name)
        if path is None:
            raise ClosureError(f"no module '{name}' in package '{package}' ({pkg_root})")
        closure[name] = path
        todo.extend(_parents(name))
        todo.extend(_imported_modules(name, path, _info(path), pkg_root, package))
    return closure


def _parents(name: str) -> Iterator[str]:
    """``a.b.c`` → ``a``, ``a.b``: the packages whose ``__init__`` runs first."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        yield ".".join(parts[:i])


def _info(path: Path) -> _ModuleInfo:
    return _analyse(path.read_bytes(), str(path))


# --- resolving the imports of one module ----------------------------------------------


def _imported_modules(
    name: str, path: Path, info: _ModuleInfo, pkg_root: Path, package: str
) -> Iterator[str]:
    """The package modules that the imports of module ``name`` (file ``path``) load."""
    is_package = path.name == "__init__.py"
    for imp in info.imports:
        where = f"{path}:{imp.lineno}"
        if imp.level:
            base = _absolute(name, is_package, imp.level, imp.module, where)
        else:
            base = imp.module
        if base != package and not base.startswith(package + "."):
            continue  # another library
        base_path = _locate(pkg_root, package, base)
        if base_path is None:
            raise ClosureError(
                f"{where}: cannot resolve module '{base}': no such module in "
                f"package '{package}' ({pkg_root})"
            )
        yield base
        if imp.name is None:  # import pkg.x
            continue
        base_is_package = base_path.name == "__init__.py"
        if imp.name == "*":
            if base_is_package:
                for sub in _info(base_path).all_names:
                    if _locate(pkg_root, package, f"{base}.{sub}") is not None:
                        yield f"{base}.{sub}"
            continue
        sub = f"{base}.{imp.name}"
        if base_is_package and _locate(pkg_root, package, sub) is not None:
            yield sub
            continue
        bound = _info(base_path)
        if (
            imp.name not in bound.names
            and not bound.dynamic
            and not _declares_global(base_path.read_bytes(), str(base_path), imp.name)
        ):
            raise ClosureError(
                f"{where}: cannot resolve 'from {base} import {imp.name}': "
                f"'{base}' has no submodule '{imp.name}' and binds no such name"
            )


def _absolute(name: str, is_package: bool, level: int, module: str, where: str) -> str:
    """The absolute name of a relative import ``from {'.' * level}{module} import ...``."""
    parts = name.split(".") if is_package else name.split(".")[:-1]
    if level - 1 >= len(parts):
        raise ClosureError(
            f"{where}: relative import with {level} dots goes above the "
            f"top-level package of '{name}'"
        )
    base = parts[: len(parts) - (level - 1)]
    return ".".join(base + ([module] if module else []))


# --- reading one source file ----------------------------------------------------------


@lru_cache(maxsize=512)
def _analyse(source: bytes, filename: str) -> _ModuleInfo:
    """Imports, module-level names and digest of one source file (cached on its bytes)."""
    tree = ast.parse(source, filename=filename)
    names, dynamic = _module_names(tree)
    all_names = _literal_all(tree)
    imports: list[_Import] = []
    _scan(tree, imports, runs=True)
    imports += _registered_impls(tree)
    digest = hashlib.sha256(_dump(tree).encode()).hexdigest()
    return _ModuleInfo(
        digest=digest,
        imports=tuple(imports),
        names=frozenset(names),
        dynamic=dynamic,
        all_names=all_names,
    )


def _registered_impls(tree: ast.Module) -> list[_Import]:
    """The modules named by ``impl="module:attr"`` in a call (a kind's registration).

    A kind whose implementation needs torch at import is registered by a dotted path
    (:mod:`fedmia.core.registry`), loaded by the jobs; to the fingerprint that is an import.
    """
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            for kw in node.keywords:
                if (
                    kw.arg == "impl"
                    and isinstance(kw.value, ast.Constant)
                    and isinstance(kw.value.value, str)
                    and ":" in kw.value.value
                ):
                    out.append(_Import(0, kw.value.value.partition(":")[0], None, node.lineno))
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _is_string_statement(stmt: ast.stmt) -> bool:
    return (
        isinstance(stmt, ast.Expr)
        and isinstance(stmt.value, ast.Constant)
        and isinstance(stmt.value.value, str)
    )


def _scan(node: ast.AST, imports: list[_Import], *, runs: bool) -> None:
    """Strip the bare string statements under ``node`` in place and collect its imports.

    Recurses through statement lists only (expressions hold no statements). Imports are
    collected where ``runs``; an ``if TYPE_CHECKING:`` body never runs (its ``else``
    does). A body left empty by the stripping becomes ``pass``.
    """
    for field in ("body", "orelse", "finalbody", "handlers", "cases"):
        children = getattr(node, field, None)
        if not isinstance(children, list):
            continue  # absent, or the expression body of a lambda / conditional expression
        if field != "handlers" and field != "cases":
            kept = [s for s in children if not _is_string_statement(s)]
            if not kept and field == "body" and not isinstance(node, ast.Module):
                kept = [ast.Pass()]  # a body of only a docstring is a body of ``pass``
            setattr(node, field, kept)
            children = kept
        child_runs = runs and not (
            field == "body" and isinstance(node, ast.If) and _is_type_checking(node.test)
        )
        for child in children:
            if child_runs and isinstance(child, ast.Import):
                imports.extend(_Import(0, a.name, None, child.lineno) for a in child.names)
            elif child_runs and isinstance(child, ast.ImportFrom):
                imports.extend(
                    _Import(child.level, child.module or "", a.name, child.lineno)
                    for a in child.names
                )
            else:
                _scan(child, imports, runs=child_runs)


def _module_names(tree: ast.Module) -> tuple[set[str], bool]:
    """Names bound at module level, and whether some are bound in ways we cannot list."""
    names: set[str] = set()
    dynamic = False
    todo: list[ast.AST] = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
            dynamic |= node.name == "__getattr__"
            continue
        if isinstance(
            node, ast.Lambda | ast.ListComp | ast.SetComp | ast.DictComp | ast.GeneratorExp
        ):  # own scopes
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:
                if alias.name == "*":
                    dynamic = True
                else:
                    names.add(alias.asname or alias.name.partition(".")[0])
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
        elif isinstance(node, ast.MatchAs | ast.MatchStar) and node.name:
            names.add(node.name)
        elif isinstance(node, ast.MatchMapping) and node.rest:
            names.add(node.rest)
        todo.extend(ast.iter_child_nodes(node))
    return names, dynamic


def _declares_global(source: bytes, filename: str, name: str) -> bool:
    """Whether some function declares ``global name`` (binding it at module level)."""
    return any(
        isinstance(node, ast.Global) and name in node.names
        for node in ast.walk(ast.parse(source, filename=filename))
    )


def _literal_all(tree: ast.Module) -> tuple[str, ...]:
    """The strings of a module-level ``__all__ = [...]`` or ``(...)``, else ()."""
    for stmt in tree.body:
        if (
            isinstance(stmt, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "__all__" for t in stmt.targets)
            and isinstance(stmt.value, ast.List | ast.Tuple)
        ):
            return tuple(
                e.value
                for e in stmt.value.elts
                if isinstance(e, ast.Constant) and isinstance(e.value, str)
            )
    return ()


def _dump(node: ast.AST) -> str:
    """Like ``ast.dump(node, include_attributes=False)``, without ``None``/``[]`` fields."""
    out: list[str] = []
    _write(node, out.append)
    return "".join(out)


def _write(node: object, emit: Callable[[str], object]) -> None:
    if isinstance(node, ast.AST):
        emit(type(node).__name__ + "(")
        sep = ""
        for field in node._fields:
            value = getattr(node, field, None)
            if value is None or value == []:
                continue
            emit(f"{sep}{field}=")
            _write(value, emit)
            sep = ", "
        emit(")")
    elif isinstance(node, list):
        emit("[")
        for i, item in enumerate(node):
            if i:
                emit(", ")
            _write(item, emit)
        emit("]")
    else:
        emit(repr(node))


# --- command line ---------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fedmia.core.fingerprint ENTRY...``: each entry's fingerprint and closure."""
    parser = argparse.ArgumentParser(
        prog="python -m fedmia.core.fingerprint",
        description="Print the fingerprint of the library code each entry module runs, "
        "and the modules it covers (its import closure).",
    )
    parser.add_argument(
        "entries",
        nargs="+",
        metavar="ENTRY",
        help="dotted module name of fedmia, e.g. fedmia.pipeline (with "
        "--root: of the package there)",
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=None,
        help="the package directory to read (default: the installed package)",
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="print only 'ENTRY FINGERPRINT' lines"
    )
    args = parser.parse_args(argv)
    hint = (
        "name modules of the installed fedmia, e.g. fedmia.pipeline or fedmia.stages.train"
        " (another package's modules need --root, its directory)"
        if args.root is None
        else f"name modules of the package in {args.root}"
    )
    try:
        if args.root is None:
            foreign = [e for e in args.entries if e.split(".")[0] != "fedmia"]
            if foreign:
                raise ValueError(f"{foreign} are not modules of fedmia")
        for entry in args.entries:
            print(f"{entry} {fingerprint(entry, root=args.root)}")
            if not args.quiet:
                for module in sorted(import_closure(entry, root=args.root)):
                    print(f"  {module}")
    except (ClosureError, ValueError, SyntaxError) as e:
        print(f"error: {e}; {hint}", file=sys.stderr)
        return 2
    if not args.quiet:
        deps = ", ".join(f"{d} {v or '-'}" for d, v in sorted(dependency_versions().items()))
        print(f"dependencies: {deps}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
