"""The layering the folders promise, checked on the source: no import cycle among
first-party modules (top-level, lazy or TYPE_CHECKING imports alike), and no layer that
reaches up into the one above it."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "translator": PROJECT / "translator",
    "addrmap": PROJECT / "addrmap",
    "netnslab": PROJECT / "netns-lab" / "netnslab",
}


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for name, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            parts = [name, *path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imported(module: str, path: Path) -> Iterator[str]:
    """Every module ``module`` imports, wherever the import statement stands."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:  # ``from pkg import module`` imports that module
                submodule = f"{source}.{alias.name}"
                yield submodule if submodule in MODULES else source


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        edges = graph.setdefault(module, set())
        for name in _imported(module, path):
            while name and name not in MODULES:  # a name inside a module: the module
                name = name.rpartition(".")[0]
            if name and name != module:
                edges.add(name)
    return graph


GRAPH = _graph()


def _external(module: str) -> set[str]:
    return {name.split(".")[0] for name in _imported(module, MODULES[module])}


def test_no_import_cycle() -> None:
    cycles: list[list[str]] = []
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycles.append([*path[path.index(module) :], module])
            return
        if module in done:
            return
        for target in sorted(GRAPH[module]):
            visit(target, [*path, module])
        done.add(module)

    for module in sorted(GRAPH):
        visit(module, [])
    assert cycles == []


@pytest.mark.parametrize(
    ("layer", "must_not_import"),
    [
        ("translator.wire", ("translator.", "addrmap")),  # the codec stands alone
        ("addrmap", ("translator",)),
        ("translator.net", ("translator.relay", "translator.gateway", "translator.wire")),
        ("translator.relay", ("translator.gateway", "translator.client")),
        ("translator.client", ("translator.gateway", "translator.relay", "translator.net")),
        # the service layer (runner, notify, privileges) sits above the gateway
        ("translator.gateway", ("translator.service", "translator.cli")),
        # the transparent front builds on the gateway's context and relays, below the service
        ("translator.transparent", ("translator.service", "translator.cli", "translator.client")),
        ("translator.metrics", ("translator.", "addrmap")),  # names and exposition only
    ],
)
def test_no_layer_reaches_up(layer: str, must_not_import: tuple[str, ...]) -> None:
    offending = sorted(
        f"{module} -> {target}"
        for module, targets in GRAPH.items()
        if module == layer or module.startswith(layer + ".")
        for target in targets
        if target.startswith(must_not_import) and not target.startswith(layer)
    )
    assert offending == []


@pytest.mark.parametrize(
    "module", sorted(m for m in MODULES if m.startswith(("translator.wire", "addrmap")))
)
def test_sans_io_cores_import_no_io(module: str) -> None:
    io = {"asyncio", "socket", "logging", "aiodns", "pycares", "pyroute2", "selectors"}
    assert _external(module) & io == set()


def test_translator_top_level_holds_only_a_handful_of_modules() -> None:
    top = sorted(p.name for p in PACKAGES["translator"].glob("*.py") if p.name != "__init__.py")
    assert len(top) <= 10, top
