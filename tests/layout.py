"""The gateway's modules and their imports, read with `ast` (nothing is imported).

Used by tests/test_layout.py to check the layout rules, and to draw the picture in
docs/architecture.md: `python -m tests.layout` prints it.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gateway", "devices")


@dataclass(frozen=True)
class Import:
    """One import statement's target: `module` and, for `from m import n`, the names."""

    module: str
    names: tuple[str, ...]
    line: int


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the project's packages, by dotted name."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports(name: str, path: Path) -> Iterator[Import]:
    """Every import in a module: top level, under TYPE_CHECKING and inside functions."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(alias.name, (), node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            yield Import(base, tuple(a.name for a in node.names), node.lineno)


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Each project module and the project modules it imports."""
    known = modules(root)
    edges: dict[str, set[str]] = {m: set() for m in known}
    for name, path in known.items():
        for imp in imports(name, path):
            targets = [f"{imp.module}.{n}" for n in imp.names if f"{imp.module}.{n}" in known]
            if not targets and imp.module in known:
                targets = [imp.module]
            edges[name].update(t for t in targets if t != name)
    return edges


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other (strongly connected, more than one), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(found)


def under(name: str, *places: str) -> bool:
    """Whether module `name` is one of `places` or inside one of them (dotted names)."""
    return any(name == p or name.startswith(p + ".") for p in places)


XMPP_LIBS = ("slixmpp", "slixmpp_omemo", "omemo", "oldmemo", "twomemo")
MQTT_DRIVERS = ("devices.mqtt", "devices.discovery", "devices.tasmota", "devices.zigbee2mqtt")
MAX_LINES = 800


def broken_rules(root: Path = ROOT) -> list[str]:
    """Every import that breaks a rule of the layout (README, "How it fits together"), one line each."""
    known = modules(root)
    found = []
    for name, path in known.items():
        rel = path.relative_to(root)
        for imp in imports(name, path):
            where = f"{rel}:{imp.line}: imports {imp.module}"
            if under(imp.module, *XMPP_LIBS) and not under(name, "gateway.xmpp"):
                found.append(f"{where}: only the XMPP door (gateway/xmpp/) uses slixmpp and the OMEMO libraries")
            if under(imp.module, "paho") and not under(name, "gateway.mqtt", "gateway.demo", *MQTT_DRIVERS):
                found.append(f"{where}: only gateway/mqtt/, gateway/demo/ and the MQTT drivers use paho")
            if under(name, "devices") and under(imp.module, "gateway.xmpp", "gateway.mqtt.homeassistant"):
                found.append(f"{where}: a driver never imports a door")
            if under(name, "gateway.xmpp") and under(imp.module, "devices"):
                found.append(f"{where}: the XMPP door never imports a driver")
            private = [n for n in imp.names if n.startswith("_") and not n.startswith("__")]
            private += [p for p in imp.module.split(".") if p.startswith("_") and not p.startswith("__")]
            if private and under(imp.module, *PACKAGES):
                found.append(f"{where}: uses its underscore names {', '.join(private)}")
    for group in circles(graph(root)):
        found.append("import circle: " + " <-> ".join(group))
    for name, lines in sizes(root).items():
        if lines > MAX_LINES:
            found.append(f"{known[name].relative_to(root)}: {lines} lines, over {MAX_LINES}: split it by responsibility")
    return found


def sizes(root: Path = ROOT) -> dict[str, int]:
    """Lines per module."""
    return {name: len(path.read_text().splitlines()) for name, path in modules(root).items()}


def picture(root: Path = ROOT) -> str:
    """Each folder's modules with the project modules they import, as Markdown text."""
    edges = graph(root)
    lines = [sizes_line(root), ""]
    by_folder: dict[str, list[str]] = {}
    for name, path in modules(root).items():
        by_folder.setdefault(str(path.parent.relative_to(root)) + "/", []).append(name)
    for place in sorted(by_folder):
        lines.append(f"{place}")
        for name in sorted(by_folder[place]):
            used = ", ".join(sorted(edges[name])) or "-"
            lines.append(f"    {name:<34} -> {used}")
        lines.append("")
    found = circles(edges)
    lines.append(f"import circles: {len(found)}" + "".join(f"\n    {' <-> '.join(c)}" for c in found))
    return "\n".join(lines)


def sizes_line(root: Path = ROOT) -> str:
    """The five largest modules with their line counts."""
    largest = sorted(sizes(root).items(), key=lambda kv: -kv[1])[:5]
    return "largest modules: " + ", ".join(f"{n} {c}" for n, c in largest)


if __name__ == "__main__":
    print(picture(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT))
