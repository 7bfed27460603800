"""The package's rooms and their one-way doors (STYLE.md §2b), read from the source with `ast`.

On top: ``brainmri/__init__.py`` (create_app), ``config.py``, ``cli.py``, ``preflight.py``. Below:
web -> inference -> imaging, and training -> inference, imaging. Nothing points back up, nothing
imports in a circle (imports inside functions count too: they run sooner or later), another
room is entered through its ``__init__.py`` (only names in its ``__all__``), and Flask and
TensorFlow stay in the rooms that own them. The last test runs the same checks on a small
package that breaks each rule, so none of them passes by looking at nothing.
"""

from __future__ import annotations

import ast
import importlib
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from brainmri.config import PROJECT_ROOT

ROOMS = ("web", "inference", "imaging", "training")
# A room -> the rooms it may import besides itself; "top" is the package's own top level.
DOORS = {
    "top": {"web", "inference", "imaging", "training"},
    "web": {"inference", "imaging"},
    "training": {"inference", "imaging"},
    "inference": {"imaging"},
    "imaging": set(),
}
# Libraries only some rooms may import.
LIBRARY_ROOMS = {
    "flask": {"top", "web"},
    "werkzeug": {"top", "web"},
    "itsdangerous": {"web"},
    "flask_limiter": {"web"},
    "limits": {"web"},
    "prometheus_client": {"web"},  # /metrics; gunicorn.conf.py (outside the package) uses it too
    "click": {"top"},
    "tensorflow": {"inference", "training"},
    "keras": {"inference", "training"},
}


@dataclass(frozen=True)
class Import:
    """One import statement of one module, resolved to absolute names."""

    source: str  # the importing module, e.g. "brainmri.web.api"
    target: str  # the module imported from, e.g. "brainmri.inference"
    names: tuple[str, ...]  # the names taken from it ("*" for a plain `import`)
    line: int


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Every module of `package` (under `root`) by dotted name; packages by their own name."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def read_imports(root: Path, package: str) -> list[Import]:
    """All imports of `package`'s own modules, at module level and inside functions."""
    modules = module_names(root, package)
    found = []
    for name, path in modules.items():
        base = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found += [Import(name, alias.name, ("*",), node.lineno) for alias in node.names
                          if alias.name.split(".")[0] == package]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parent = base.split(".")[: len(base.split(".")) - node.level + 1]
                    target = ".".join(parent + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != package:
                    continue
                for alias in node.names:  # `from . import views` imports the module views
                    submodule = f"{target}.{alias.name}"
                    if submodule in modules:
                        found.append(Import(name, submodule, ("*",), node.lineno))
                    else:
                        found.append(Import(name, target, (alias.name,), node.lineno))
    return found


def room_of(module: str) -> str:
    """The room a module belongs to ("top" for the package's own top-level modules)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ROOMS else "top"


def upward_imports(imports: list[Import]) -> list[str]:
    """Imports that go through no door: a room importing one above it, or the top level."""
    return [f"{i.source}:{i.line} imports {i.target}" for i in imports
            if room_of(i.source) != room_of(i.target)
            and room_of(i.target) not in DOORS[room_of(i.source)]]


def cycles(imports: list[Import]) -> list[list[str]]:
    """Groups of modules that import each other, directly or round a circle (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for i in imports:
        if i.source != i.target:
            graph.setdefault(i.source, set()).add(i.target)
            graph.setdefault(i.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def public_names(root: Path, package: str, room: str) -> set[str]:
    """The names in a room's ``__all__`` (its public face), read without importing it."""
    tree = ast.parse((root / package / room / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__"
                                                 for t in node.targets):
            return {element.value for element in node.value.elts}
    return set()


def behind_the_face(root: Path, package: str, imports: list[Import]) -> list[str]:
    """Imports from another room that reach past its ``__init__`` or take a name not in __all__."""
    faces = {room: public_names(root, package, room) for room in ROOMS}
    problems = []
    for i in imports:
        room = room_of(i.target)
        if room == "top" or room == room_of(i.source):
            continue
        face = f"{package}.{room}"
        if i.target == face:
            problems += [f"{i.source}:{i.line} takes {name} from {face}, not in its __all__"
                         for name in i.names if name != "*" and name not in faces[room]]
        elif i.target.rpartition(".")[0] != face or i.target.rpartition(".")[2] not in faces[room]:
            problems.append(f"{i.source}:{i.line} imports {i.target} past {face}/__init__.py")
    return problems


def misplaced_libraries(root: Path, package: str) -> list[str]:
    """Imports of Flask, TensorFlow and friends outside the rooms that own them."""
    problems = []
    for name, path in module_names(root, package).items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                libraries = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                libraries = [node.module or ""]
            else:
                continue
            for library in libraries:
                allowed = LIBRARY_ROOMS.get(library.split(".")[0])
                if allowed is not None and room_of(name) not in allowed:
                    problems.append(f"{name}:{node.lineno} imports {library}")
    return problems


@pytest.fixture(scope="module")
def imports() -> list[Import]:
    """Every import inside brainmri/."""
    return read_imports(PROJECT_ROOT, "brainmri")


def test_every_module_sits_in_a_room_or_on_top():
    on_top = {name for name in module_names(PROJECT_ROOT, "brainmri") if room_of(name) == "top"}
    assert on_top == {"brainmri", "brainmri.cli", "brainmri.config", "brainmri.preflight"}


def test_no_room_imports_a_room_above_it(imports):
    assert upward_imports(imports) == []


def test_no_import_cycles(imports):
    assert cycles(imports) == []


def test_other_rooms_are_entered_through_their_face(imports):
    assert behind_the_face(PROJECT_ROOT, "brainmri", imports) == []


def test_flask_and_tensorflow_stay_in_their_rooms():
    assert misplaced_libraries(PROJECT_ROOT, "brainmri") == []


@pytest.mark.parametrize("room", ROOMS)
def test_each_face_says_what_it_is_and_exports_what_it_lists(room):
    face = importlib.import_module(f"brainmri.{room}")
    assert face.__doc__ and face.__doc__.strip()
    for name in face.__all__:  # a name, or a submodule imported on first use
        assert hasattr(face, name) or importlib.import_module(f"brainmri.{room}.{name}")


def test_module_paths_named_in_the_shipped_metadata_still_resolve():
    """model/*.json names its preprocessing function by dotted path; it must stay importable."""
    from brainmri.imaging import load_scan

    metadata = sorted((PROJECT_ROOT / "model").glob("*.json"))
    named = {json.loads(path.read_text())["preprocessing"]["function"] for path in metadata
             if not path.name.endswith((".history.json", ".splits.json"))}
    assert named == {"brainmri.imaging.load_scan"}
    for dotted in named:
        module, _, attribute = dotted.rpartition(".")
        assert getattr(importlib.import_module(module), attribute) is load_scan

def test_the_checks_find_what_they_look_for(tmp_path):
    """A package that breaks every rule once: each check reports it."""
    files = {
        "pkg/__init__.py": "",
        "pkg/imaging/__init__.py": '__all__ = ["decode"]\nfrom .decode import decode\n',
        "pkg/imaging/decode.py": "def decode():\n    from ..web import forms\n",  # up two rooms
        "pkg/inference/__init__.py": '__all__ = ["Predictor"]\n',
        "pkg/inference/predictor.py": "from .registry import Registry\nclass Predictor: ...\n",
        "pkg/inference/registry.py": "def make():\n    from .predictor import Predictor\n",
        "pkg/web/__init__.py": '__all__ = ["forms", "views"]\n',
        "pkg/web/forms.py": "",
        "pkg/web/views.py": "from ..inference.predictor import Predictor\n"  # past the face
                            "from ..imaging import secret\n",  # not in imaging's __all__
        "pkg/training/__init__.py": "__all__ = []\n",
        "pkg/training/fit.py": "import flask\n",  # Flask outside web
    }
    for relative, text in files.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(text, encoding="utf-8")
    found = read_imports(tmp_path, "pkg")
    assert upward_imports(found) == ["pkg.imaging.decode:2 imports pkg.web.forms"]
    assert cycles(found) == [["pkg.inference.predictor", "pkg.inference.registry"]]
    assert behind_the_face(tmp_path, "pkg", found) == [
        "pkg.web.views:1 imports pkg.inference.predictor past pkg.inference/__init__.py",
        "pkg.web.views:2 takes secret from pkg.imaging, not in its __all__",
    ]
    assert misplaced_libraries(tmp_path, "pkg") == ["pkg.training.fit:1 imports flask"]
