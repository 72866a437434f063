"""The code fingerprint: import closure, normalisation, digest, CLI, installs.

References: the modules Python itself loads when it imports an entry (``sys.modules``
in a fresh interpreter), :func:`ast.dump` for what distinguishes two syntax trees,
:func:`importlib.metadata.version` for dependency versions.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import itertools
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import pytest

import fedmia
from fedmia.core.fingerprint import (
    ClosureError,
    dependency_versions,
    fingerprint,
    import_closure,
    main,
    normalised_dump,
    package_dir,
)

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "fedmia"

# A fake package with every import form. Comments say which modules the closure of
# ``fakepkg.main`` must contain (in) and which it must not (out).
FAKE = {
    "__init__.py": '''
        """A fake package."""
        NAME = "fake"
    ''',
    "main.py": '''
        """The entry module."""
        from __future__ import annotations

        import os
        from typing import TYPE_CHECKING

        import fakepkg.a  # in, and a's own import of chain
        from fakepkg import NAME, b  # b: in (submodule); NAME: a name in __init__
        from fakepkg.sub import c  # in: sub (package __init__) and sub.c
        from fakepkg.star import *  # in: star, and star.s1 named in its __all__
        from .d import thing  # in: relative ``from .x import name``
        from . import e  # in: relative ``from . import submodule``

        if TYPE_CHECKING:
            from fakepkg import typeonly  # out: never runs
        else:
            from fakepkg import runtime  # in: the else branch runs


        def run(x: int) -> int:
            """Use the lazily imported module."""
            from fakepkg.lazy import g  # in: function-level import

            return g(x) + thing + len(os.sep)
    ''',
    "a.py": "from . import chain\n\nA = 1\n",
    "chain.py": "CHAIN = 2\n",
    "b.py": "B = 3\n",
    "sub/__init__.py": "SUB = 0\n",
    "sub/c.py": "from ..deep.inner import z  # in: two dots, from a subpackage\n",
    "sub/c2.py": "C2 = 1\n",
    "deep/__init__.py": "",
    "deep/inner.py": "z = 1\n",
    "star/__init__.py": '__all__ = ["s1", "S"]\nS = 1\n',
    "star/s1.py": "S1 = 1\n",
    "star/s2.py": "S2 = 1  # out: not in __all__\n",
    "d.py": "thing = 4\n",
    "e.py": "from .sub import c2  # in: relative ``from .pkg import submodule``\n",
    "lazy.py": "def g(x):\n    return x + 5\n",
    "typeonly.py": "T = 6\n",
    "runtime.py": "R = 7\n",
    "outside.py": "import fakepkg.main\n\nO = 8\n",
}
CLOSURE = {
    f"fakepkg{m}"
    for m in (
        "",
        ".main",
        ".a",
        ".chain",
        ".b",
        ".sub",
        ".sub.c",
        ".sub.c2",
        ".deep",
        ".deep.inner",
        ".star",
        ".star.s1",
        ".d",
        ".e",
        ".lazy",
        ".runtime",
    )
}


def write_pkg(base: Path, files: dict[str, str], name: str = "fakepkg") -> Path:
    """Write ``files`` (relative path → source) as package ``name`` under ``base``."""
    root = base / name
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"))
    return root


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, (path, old)
    path.write_text(text.replace(old, new))


def python(code: str, *, path: Sequence[Path] = (), **env: str) -> str:
    """Run ``code`` in a fresh interpreter with ``path`` first on sys.path; its stdout."""
    prelude = f"import sys; sys.path[:0] = {[str(p) for p in path]!r}\n"
    r = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture
def fake(tmp_path) -> Path:
    return write_pkg(tmp_path, FAKE)


# --- import closure ---------------------------------------------------------------------


def test_closure_follows_every_import_form(fake):
    assert import_closure("fakepkg.main", root=fake) == CLOSURE


def test_closure_is_what_python_imports(fake):
    """Reference: the fakepkg modules in sys.modules after importing main and calling it."""
    out = python(
        """
        import json, sys
        import fakepkg.main
        fakepkg.main.run(1)  # runs the function-level import
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] == "fakepkg")))
    """,
        path=[fake.parent],
    )
    assert set(json.loads(out)) == import_closure("fakepkg.main", root=fake)


def test_closure_of_several_entries_is_the_union(fake):
    both = import_closure(["fakepkg.a", "fakepkg.e"], root=fake)
    assert both == import_closure("fakepkg.a", root=fake) | import_closure("fakepkg.e", root=fake)
    assert both == {
        "fakepkg",
        "fakepkg.a",
        "fakepkg.chain",
        "fakepkg.e",
        "fakepkg.sub",
        "fakepkg.sub.c2",
    }
    assert import_closure("fakepkg", root=fake) == {"fakepkg"}


def test_submodule_wins_over_a_name_bound_in_init(tmp_path):
    # ``from pkg import x`` may give __init__'s x or the submodule: include the submodule.
    root = write_pkg(
        tmp_path, {"__init__.py": "x = 1\n", "m.py": "from fakepkg import x\n", "x.py": "X = 2\n"}
    )
    assert import_closure("fakepkg.m", root=root) == {"fakepkg", "fakepkg.m", "fakepkg.x"}


@pytest.mark.parametrize(
    "init",
    [
        "NAME = 1\n",
        "NAME: int = 1\n",
        "if True:\n    NAME, OTHER = 1, 2\n",
        "def NAME():\n    pass\n",
        "class NAME:\n    pass\n",
        "import os as NAME\n",
        "from os import sep as NAME\n",
        "try:\n    pass\nexcept ImportError:\n    NAME = None\n",
        "for NAME in range(1):\n    pass\n",
        "def _set():\n    global NAME\n    NAME = 1\n",
        "def __getattr__(name):\n    return name\n",
        "from os.path import *\n",
    ],
)
def test_from_package_import_name_bound_in_init(tmp_path, init):
    root = write_pkg(tmp_path, {"__init__.py": init, "m.py": "from fakepkg import NAME\n"})
    assert import_closure("fakepkg.m", root=root) == {"fakepkg", "fakepkg.m"}


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (
            {"m.py": "from fakepkg import missing\n"},
            "m.py:1: cannot resolve 'from fakepkg import missing'",
        ),
        (
            {
                "m.py": "import os\n\ndef f():\n    from fakepkg.n import nothing\n",
                "n.py": "y = 1\n",
            },
            "m.py:4: cannot resolve 'from fakepkg.n import nothing'",
        ),
        ({"m.py": "import fakepkg.nothere\n"}, "m.py:1: cannot resolve module 'fakepkg.nothere'"),
        ({"m.py": "from .nothere import x\n"}, "m.py:1: cannot resolve module 'fakepkg.nothere'"),
        ({"m.py": "from .. import x\n"}, "m.py:1: relative import with 2 dots goes above"),
        (
            {
                "m.py": "from fakepkg import TYPE_ONLY\n",
                "__init__.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    pass\n",
            },
            "cannot resolve 'from fakepkg import TYPE_ONLY'",
        ),
    ],
)
def test_unresolvable_imports_raise_with_file_and_line(tmp_path, files, message):
    root = write_pkg(tmp_path, {"__init__.py": "", **files})
    with pytest.raises(ClosureError, match=message.replace(".", r"\.").replace("(", r"\(")):
        import_closure("fakepkg.m", root=root)


def test_bad_entries_raise(fake, tmp_path):
    with pytest.raises(ClosureError, match="no module 'fakepkg.nope' in package 'fakepkg'"):
        import_closure("fakepkg.nope", root=fake)
    with pytest.raises(ValueError, match="span several packages"):
        import_closure(["fakepkg.a", "other.b"], root=fake)
    with pytest.raises(ValueError, match="no entry module"):
        import_closure([], root=fake)
    with pytest.raises(ValueError, match="not a directory named after package 'other'"):
        import_closure("other.a", root=fake)
    with pytest.raises(ClosureError, match="'fedmia_no_such_pkg' is not installed"):
        package_dir("fedmia_no_such_pkg")
    with pytest.raises(ClosureError, match="not a regular package"):
        package_dir("textwrap")  # a module, not a package


# --- normalisation ----------------------------------------------------------------------

# Sources without docstrings: two of them must normalise alike exactly when ast.dump
# (the reference, which shows every field) says their trees are equal.
VARIANTS = [
    "x = 1",
    "x = 1  # comment",
    "x=1",
    "\n\nx = 1\n\n",
    "x = (1)",
    "x = 2",
    "x = 1.0",
    "y = 1",
    "x = None",
    "x = 'a'",
    'x = "a"',
    "x = []",
    "x = ()",
    "x = [1, 2]",
    "x = [1, 2,]",
    "x = [\n    1,\n    2,\n]",
    "def f(a, b=2):\n    return a * b",
    "def f(a, b=2):\n    return (a\n            * b)",
    "def f(a, b=3):\n    return a * b",
    "def f(a: int, b=2):\n    return a * b",
    "def f(a, b=2) -> int:\n    return a * b",
    "async def f(a, b=2):\n    return a * b",
    "import os",
    "import os as o",
    "from a import b",
    "from .a import b",
    "from . import a",
    "f(x)",
    "f(x, )",
    "f(x=x)",
    "lambda: 0",
    "x: int = 1",
    "x: int",
    "if x:\n    pass",
    "if x:\n    pass\nelse:\n    y = 1",
    "...",
    "x = ...",
    "try:\n    f()\nexcept E:\n    pass",
    "try:\n    f()\nexcept E as e:\n    pass",
]


def test_normalised_dump_distinguishes_exactly_what_ast_dump_does():
    for a, b in itertools.combinations(VARIANTS, 2):
        ours = normalised_dump(a) == normalised_dump(b)
        reference = ast.dump(ast.parse(a), include_attributes=False) == ast.dump(
            ast.parse(b), include_attributes=False
        )
        assert ours == reference, (a, b)


def test_normalised_dump_drops_docstrings():
    with_docs = textwrap.dedent('''
        """Module docstring."""
        X = 1
        """Attribute docstring of X."""


        class C:
            """Class docstring."""

            def m(self):
                """Method docstring."""
                if self:
                    "a string statement in a branch"
                    return 1

            def only_doc(self):
                """A body of only a docstring."""
    ''')
    without = textwrap.dedent("""
        X = 1
        class C:
            def m(self):
                if self:
                    return 1
            def only_doc(self):
                pass
    """)
    assert normalised_dump(with_docs) == normalised_dump(without)
    assert normalised_dump(with_docs) == normalised_dump(with_docs.encode())  # bytes alike
    # A string that is not a statement of its own is code; so is an f-string statement.
    assert normalised_dump('X = "doc"') != normalised_dump("X = 'other'")
    assert normalised_dump('f"{g()}"\nX = 1') != normalised_dump("X = 1")


# --- fingerprint of a fake package ------------------------------------------------------


@pytest.mark.parametrize(
    ("rel", "old", "new"),
    [
        ("main.py", "import os\n", "import os  # a comment\n# and one more line\n"),
        ("main.py", '"""The entry module."""', '"""The entry module,\n\nrewritten at length."""'),
        ("main.py", '    """Use the lazily imported module."""\n', ""),
        ("main.py", "def run(x: int) -> int:", "def run(\n    x: int,\n) -> int:"),
        (
            "main.py",
            "return g(x) + thing + len(os.sep)",
            "return (g(x)\n            + thing\n            + len(os.sep))",
        ),
        ("main.py", "\n\ndef run", "\n\n\n\n\ndef run"),
        ("main.py", "from .d import thing", "from .d import (\n    thing,\n)"),
        (
            "lazy.py",
            "def g(x):\n",
            '"""A docstring added."""\n\n\ndef g(x):\n    """Now documented."""\n',
        ),
        ("sub/__init__.py", "SUB = 0\n", "SUB = 0  # comment in a package __init__\n"),
        ("__init__.py", '"""A fake package."""', '"""A fake package, docstring changed."""'),
        ("__init__.py", 'NAME = "fake"', "NAME = 'fake'"),
    ],
)
def test_cosmetic_edit_keeps_fingerprint(fake, rel, old, new):
    before = fingerprint("fakepkg.main", root=fake)
    edit(fake / rel, old, new)
    assert fingerprint("fakepkg.main", root=fake) == before


@pytest.mark.parametrize(
    ("rel", "old", "new"),
    [
        ("main.py", "len(os.sep)", "len(os.linesep)"),  # the entry itself
        ("main.py", "def run(x: int)", "def run(x: float)"),  # type hints are code
        ("d.py", "thing = 4", "thing = 5"),  # relative ``from .d import thing``
        ("chain.py", "CHAIN = 2", "CHAIN = 3"),  # transitive
        ("lazy.py", "x + 5", "x + 6"),  # function-level import
        ("sub/__init__.py", "SUB = 0", "SUB = 1"),  # the __init__ of an imported submodule
        ("deep/inner.py", "z = 1", "z = 2"),  # two-dot relative import
        ("sub/c2.py", "C2 = 1", "C2 = 2"),  # ``from .sub import c2``
        ("star/s1.py", "S1 = 1", "S1 = 2"),  # star import of a name in __all__
        ("runtime.py", "R = 7", "R = 8"),  # else branch of TYPE_CHECKING
        ("__init__.py", 'NAME = "fake"', 'NAME = "real"'),  # the package __init__
    ],
)
def test_code_edit_in_closure_changes_fingerprint(fake, rel, old, new):
    before = fingerprint("fakepkg.main", root=fake)
    edit(fake / rel, old, new)
    assert fingerprint("fakepkg.main", root=fake) != before


@pytest.mark.parametrize(
    ("rel", "old", "new"),
    [
        ("outside.py", "O = 8", "O = 9"),  # imports main, but main does not import it
        ("typeonly.py", "T = 6", "T = 60"),  # only under TYPE_CHECKING
        ("star/s2.py", "S2 = 1", "S2 = 2"),  # in star/, not in its __all__
    ],
)
def test_code_edit_outside_closure_keeps_fingerprint(fake, rel, old, new):
    before = fingerprint("fakepkg.main", root=fake)
    edit(fake / rel, old, new)
    (fake / "new_module.py").write_text("N = 1\n")
    assert fingerprint("fakepkg.main", root=fake) == before


def test_plugins_count_with_what_they_import_of_the_package(fake, monkeypatch):
    """A plugin (a single module, or a module of its own package) is hashed with the
    modules of its package it imports and the closure of what it imports of ours."""
    base = fake.parent
    (base / "fakeplug.py").write_text("from fakepkg import b\n\nPLUG = 1\n")
    write_pkg(
        base,
        {"__init__.py": "", "defs.py": "from .util import U\n", "util.py": "U = 1\n"},
        name="plugpkg",
    )
    monkeypatch.syspath_prepend(str(base))
    entry = "fakepkg.chain"  # its closure holds neither fakepkg.b nor fakepkg.e
    base_fp = fingerprint(entry, root=fake)
    with_plug = fingerprint(entry, root=fake, plugins=["fakeplug"])
    assert with_plug != base_fp
    assert fingerprint(entry, root=fake, plugins=["fakeplug", "plugpkg.defs"]) != with_plug
    edit(fake / "d.py", "thing = 4", "thing = 40")  # imported by nobody here
    assert fingerprint(entry, root=fake, plugins=["fakeplug"]) == with_plug
    edit(base / "fakeplug.py", "PLUG = 1", "# a comment\nPLUG = 1")  # cosmetic
    assert fingerprint(entry, root=fake, plugins=["fakeplug"]) == with_plug
    edit(fake / "b.py", "B = 3", "B = 30")  # a package module the plugin imports
    edited_b = fingerprint(entry, root=fake, plugins=["fakeplug"])
    assert edited_b != with_plug
    edit(base / "fakeplug.py", "PLUG = 1", "PLUG = 2")  # the plugin's code
    assert fingerprint(entry, root=fake, plugins=["fakeplug"]) != edited_b
    both = fingerprint(entry, root=fake, plugins=["plugpkg.defs"])
    edit(base / "plugpkg" / "util.py", "U = 1", "U = 2")  # imported by the plugin module
    assert fingerprint(entry, root=fake, plugins=["plugpkg.defs"]) != both
    with pytest.raises(ClosureError, match="plugin 'no_such_plugin'"):
        fingerprint(entry, root=fake, plugins=["no_such_plugin"])


def test_fingerprint_is_a_short_hex_digest_of_closure_and_dependencies(fake):
    fp = fingerprint("fakepkg.main", root=fake, dependencies=())
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert fingerprint("fakepkg.main", root=fake, dependencies=("pytest",)) != fp
    absent = fingerprint("fakepkg.main", root=fake, dependencies=("no-such-distribution-x",))
    assert absent != fp
    assert fingerprint("fakepkg.a", root=fake, dependencies=()) != fp
    # The same closure gives the same fingerprint, whichever entries name it.
    assert fingerprint(["fakepkg.main", "fakepkg.a"], root=fake, dependencies=()) == fp


def test_dependency_versions_are_installed_versions_without_local_label():
    versions = dependency_versions(["pytest", "torch", "no-such-distribution-x"])
    assert versions == {
        "pytest": importlib.metadata.version("pytest"),
        "torch": importlib.metadata.version("torch").split("+")[0],
        "no-such-distribution-x": None,
    }
    # every runtime dependency (pyproject's [project.dependencies]) but the workflow's tools
    deps = set(dependency_versions())
    assert {
        "torch",
        "numpy",
        "pandas",
        "scipy",
        "scikit-learn",
        "pyarrow",
        "matplotlib",
        "dp-accounting",
        "safetensors",
        "pillow",
    } <= deps
    assert not deps & {"snakemake", "jsonschema", "pyyaml", "pytest", "ruff"}


def test_fingerprint_is_pinned(tmp_path):
    """A known answer, worked by hand from the documented composition."""
    sources = {
        "__init__.py": "X = 1\n",
        "m.py": "from . import n\n",
        "n.py": "def f(a):\n    return a + 1\n",
    }
    dumps = {  # ast.dump without line/column attributes and empty fields
        "fakepkg": "Module(body=[Assign(targets=[Name(id='X', ctx=Store())], "
        "value=Constant(value=1))])",
        "fakepkg.m": "Module(body=[ImportFrom(names=[alias(name='n')], level=1)])",
        "fakepkg.n": "Module(body=[FunctionDef(name='f', args=arguments(args=[arg(arg='a')]), "
        "body=[Return(value=BinOp(left=Name(id='a', ctx=Load()), op=Add(), "
        "right=Constant(value=1)))])])",
    }
    for (module, dump), source in zip(dumps.items(), sources.values(), strict=True):
        assert normalised_dump(source) == dump, module
    text = "fedmia-fingerprint 1\n" + "".join(
        f"module {m} {hashlib.sha256(d.encode()).hexdigest()}\n" for m, d in dumps.items()
    )
    root = write_pkg(tmp_path, sources)
    fp = fingerprint("fakepkg.m", root=root, dependencies=())
    assert fp == hashlib.sha256(text.encode()).hexdigest()[:16] == "2d3156afae131237"
    with_deps = text + "dist no-such-distribution-x -\ndist pytest " + pytest.__version__ + "\n"
    assert (
        fingerprint("fakepkg.m", root=root, dependencies=["pytest", "no-such-distribution-x"])
        == hashlib.sha256(with_deps.encode()).hexdigest()[:16]
    )


def test_fingerprint_is_stable_across_processes_and_imports_nothing(fake):
    """A fresh interpreter finds fakepkg on sys.path (find_spec) without importing it."""
    code = """
        import json, sys
        from fedmia.core.fingerprint import fingerprint, import_closure, package_dir
        print(json.dumps([fingerprint("fakepkg.main"), str(package_dir("fakepkg")),
                          "fakepkg" in sys.modules]))
    """
    runs = [
        json.loads(python(code, path=[fake.parent], PYTHONHASHSEED=seed)) for seed in ("1", "2")
    ]
    assert runs[0] == runs[1] == [fingerprint("fakepkg.main", root=fake), str(fake), False]


# --- the CLI ----------------------------------------------------------------------------


def test_cli_prints_fingerprint_closure_and_dependencies(fake, capsys):
    assert main(["--root", str(fake), "fakepkg.main", "fakepkg.b"]) == 0
    lines = capsys.readouterr().out.splitlines()
    b = 1 + len(CLOSURE)
    assert lines[0] == f"fakepkg.main {fingerprint('fakepkg.main', root=fake)}"
    assert lines[1:b] == [f"  {m}" for m in sorted(CLOSURE)]
    assert lines[b : b + 3] == [
        f"fakepkg.b {fingerprint('fakepkg.b', root=fake)}",
        "  fakepkg",
        "  fakepkg.b",
    ]
    assert lines[b + 3].startswith("dependencies: dp-accounting ") and len(lines) == b + 4


def test_cli_error_exits_2(fake, capsys):
    assert main(["--root", str(fake), "fakepkg.nope"]) == 2
    assert "error: no module 'fakepkg.nope'" in capsys.readouterr().err


def test_cli_as_module_on_the_real_package():
    r = subprocess.run(
        [sys.executable, "-m", "fedmia.core.fingerprint", "-q", "fedmia.pipeline"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"fedmia.pipeline {fingerprint('fedmia.pipeline')}\n"


# --- the real fedmia --------------------------------------------------------------------


def test_package_dir_is_the_imported_package():
    assert package_dir("fedmia") == Path(fedmia.__file__).parent
    assert package_dir() == package_dir("fedmia")


def real_modules(root: Path) -> list[str]:
    return sorted(
        "fedmia" if p.name == "__init__.py" else f"fedmia.{p.stem}" for p in root.glob("*.py")
    )


def test_real_pipeline_closure_covers_what_python_imports():
    out = python("""
        import json, sys
        import fedmia.pipeline
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] == "fedmia")))
    """)
    runtime = set(json.loads(out))
    closure = import_closure("fedmia.pipeline")
    assert runtime <= closure
    assert "fedmia.core.fingerprint" in closure  # the train stage keys its checkpoints with it


def test_real_fingerprints_import_no_heavy_library():
    """Fingerprint every fedmia module in a fresh interpreter: torch & co. stay unloaded."""
    out = python("""
        import json, sys, time
        start = time.perf_counter()
        from fedmia.core.fingerprint import fingerprint, import_closure, package_dir
        closure = import_closure("fedmia.pipeline")
        pipeline = fingerprint("fedmia.pipeline")
        first = time.perf_counter() - start
        root = package_dir()
        modules = ["fedmia." + p.stem for p in root.glob("*.py") if p.stem != "__init__"]
        fps = {m: fingerprint(m) for m in modules}
        total = time.perf_counter() - start
        heavy = sorted(m for m in ("torch", "numpy", "pandas", "scipy", "sklearn", "matplotlib")
                       if m in sys.modules)
        print(json.dumps({"pipeline": pipeline, "closure": sorted(closure), "fps": fps,
                          "heavy": heavy, "first_s": first, "total_s": total}))
    """)
    result = json.loads(out)
    print(
        f"import + pipeline fingerprint {result['first_s'] * 1e3:.0f} ms, "
        f"all {len(result['fps'])} modules {result['total_s'] * 1e3:.0f} ms"
    )
    assert result["heavy"] == []
    assert result["pipeline"] == fingerprint("fedmia.pipeline")
    assert len(result["closure"]) > len(real_modules(package_dir())) // 2


@pytest.fixture
def fedmia_copy(tmp_path) -> Path:
    """A copy of the package sources (as this checkout has them), to edit."""
    copy = tmp_path / "fedmia"
    shutil.copytree(SRC, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def test_real_package_edits(fedmia_copy):
    fp = fingerprint("fedmia.pipeline", root=SRC)
    assert fingerprint("fedmia.pipeline", root=fedmia_copy) == fp  # paths do not count
    closure = import_closure("fedmia.pipeline", root=fedmia_copy)
    metrics = fedmia_copy / "attacker" / "metrics.py"
    assert "fedmia.attacker.metrics" in closure and metrics.read_text().startswith('"""')

    # Cosmetic: a comment, blank lines, and a docstring rewritten.
    metrics.write_text("# A comment.\n\n" + metrics.read_text().replace('"""', '"""Edited. ', 1))
    assert fingerprint("fedmia.pipeline", root=fedmia_copy) == fp
    # Code in a module outside the closure.
    outside = sorted(set(real_modules(fedmia_copy)) - closure)
    assert outside, "every module is in the pipeline's closure; pick another entry"
    for module in outside:
        path = fedmia_copy.joinpath(*module.split(".")[1:]).with_suffix(".py")
        if not path.exists():  # a package: its __init__
            path = path.with_suffix("") / "__init__.py"
        path.write_text(path.read_text() + "\n_EDITED = 1\n")
    assert fingerprint("fedmia.pipeline", root=fedmia_copy) == fp
    # Code in the closure.
    metrics.write_text(metrics.read_text() + "\n_EDITED = 1\n")
    assert fingerprint("fedmia.pipeline", root=fedmia_copy) != fp


def test_non_editable_install(tmp_path):
    """``pip install --target`` a regular (wheel) copy; a fresh interpreter uses it."""
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    shutil.copytree(SRC, project / "src" / "fedmia", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, project / name)
    site = tmp_path / "site"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(site),
            str(project),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (site / "fedmia" / "__init__.py").is_symlink()
    out = python(
        """
        import json, sys
        import fedmia.core.fingerprint as fp
        print(json.dumps([fp.__file__, str(fp.package_dir()),
                          fp.fingerprint("fedmia.pipeline"), fp.fingerprint("fedmia.workflow"),
                          "torch" in sys.modules]))
    """,
        path=[site],
    )
    file, root, pipeline, workflow, torch_loaded = json.loads(out)
    assert Path(file).is_relative_to(site) and Path(root) == site / "fedmia"
    assert pipeline == fingerprint("fedmia.pipeline", root=SRC)
    assert workflow == fingerprint("fedmia.workflow", root=SRC)
    assert not torch_loaded
