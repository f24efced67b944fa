"""Core's rooms (DESIGN §4): each imports only the rooms below it.

app > tools > dispatch > engine > ssh > queue > plugin > agent > ground.  Ground is the loose
modules (model, names, units, runtime, config, defaults, spend, costs, ...); ``herder.testing``
is a toolbox for tests and may use any room.  The public contract names (``herder.cloud``,
``herder.executor``, ``herder.hookspecs``, ``herder.plugins``) re-export :mod:`herder.plugin`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import herder

SRC = Path(herder.__file__).parent
ORDER = ["app", "tools", "dispatch", "engine", "ssh", "queue", "plugin", "agent", "ground"]
FACADES = {"herder.cloud", "herder.executor", "herder.hookspecs", "herder.plugins"}
#: The registry checks the class a plugin registers against its contract when it is loaded,
#: importing those two contracts then; every other use of them is by type only.
ALLOWED = {
    ("herder.plugin.registry", "herder.dispatch.backend"),
    ("herder.plugin.registry", "herder.queue.backend"),
}


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ORDER else "ground"


def _imports(path: Path) -> list[tuple[str, int]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "herder":
                found += [(f"herder.{a.name}", node.lineno) for a in node.names]
            elif node.module.startswith("herder."):
                found.append((node.module, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.startswith("herder.")]
    return found


def _module_name(path: Path) -> str:
    name = ".".join(("herder", *path.relative_to(SRC).with_suffix("").parts))
    return name.removesuffix(".__init__")


def test_each_room_imports_only_rooms_below_it() -> None:
    upward = []
    for path in sorted(SRC.rglob("*.py")):
        module = _module_name(path)
        if module.startswith("herder.testing") or module in FACADES:
            continue
        here = ORDER.index(_room(module))
        for target, line in _imports(path):
            if target.startswith("herder.testing"):
                continue
            if (module, target) in ALLOWED:
                continue
            if ORDER.index(_room(target)) < here:
                upward.append(f"{path.relative_to(SRC)}:{line} imports {target}")
    assert upward == []


def test_core_uses_the_plugin_room_not_the_public_names() -> None:
    """Inside core the contracts are imported from where they live, so that the public names
    stay thin re-exports that nothing but plugins depends on."""
    users = [
        f"{path.relative_to(SRC)}:{line} imports {target}"
        for path in sorted(SRC.rglob("*.py"))
        if _module_name(path) not in FACADES
        for target, line in _imports(path)
        if target in FACADES
    ]
    assert users == []


def test_no_loose_modules_beyond_ground_and_the_public_names() -> None:
    """The top level holds ground (imports nothing above itself) and the public names only."""
    loose = {p.stem for p in SRC.glob("*.py")} - {"__init__"}
    rooms = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert rooms == {*ORDER[:-1], "testing"}
    for name in loose:
        module = f"herder.{name}"
        if module in FACADES:
            continue
        above = [t for t, _ in _imports(SRC / f"{name}.py") if _room(t) != "ground"]
        assert above == [], f"{module} is ground but imports {above}"
