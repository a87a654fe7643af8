"""The integrations keep the map of docs/architecture.md.

The table there names, for each package of ``integrations/``, the other packages it may
import; this test reads the table and every module's imports, so the map and the code cannot
drift apart. No integration imports a private (``_``-prefixed) core module.
"""

import ast
import functools
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
INTEGRATIONS = REPO / "integrations"
PREFIX = "tsm_surgery.integrations"


def _allowed() -> dict[str, set[str]]:
    """package -> packages it may import, read from the architecture map's table."""
    rows = {}
    for line in (REPO / "docs" / "architecture.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`") and cells[0] != "package":
            name = cells[0].strip("`").rstrip("/").removesuffix(".py")
            if (INTEGRATIONS / name).is_dir() or (INTEGRATIONS / f"{name}.py").is_file():
                allowed = cells[2]
                rows[name] = {"*"} if allowed == "anything" else set(re.findall(r"`(\w+)`", allowed))
    return rows


def _package(path: Path) -> str:
    rel = path.relative_to(INTEGRATIONS)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> set[str]:
    """Dotted names (relative to the integrations package, or absolute) that a module imports."""
    rel = path.relative_to(INTEGRATIONS)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(rel.parts[:-1])[: len(rel.parts) - node.level]
            found.add(PREFIX + "." + ".".join(base + ([node.module] if node.module else [])))
            found.update(f"{PREFIX}.{'.'.join(base)}.{a.name}" for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


MODULES = sorted(INTEGRATIONS.rglob("*.py"))


def test_every_package_is_on_the_map():
    packages = {_package(p) for p in MODULES if p.name != "__init__.py" or p.parent != INTEGRATIONS}
    assert packages - {"__init__"} == set(_allowed())


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(INTEGRATIONS)))
def test_imports_follow_the_map(path):
    allowed = _allowed()
    package = _package(path)
    if package == "__init__" or "*" in allowed[package]:
        return
    used = {name[len(PREFIX) + 1:].split(".")[0] for name in _imports(path) if name.startswith(PREFIX + ".")}
    stray = used - allowed[package] - {package} - {"*"}
    # `from tsm_surgery.integrations.x import y` also names `y` as a module; count packages only
    stray = {name for name in stray if name in allowed}
    assert not stray, f"{path.relative_to(REPO)} imports {sorted(stray)}; docs/architecture.md allows {package} " \
                      f"only {sorted(allowed[package]) or 'nothing'}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(INTEGRATIONS)))
def test_no_private_core_module_is_imported(path):
    private = sorted(n for n in _imports(path) if re.match(r"tsm_surgery\._", n) or (re.match(r"tsm_surgery\.\w+\._", n)
                     and not n.startswith(PREFIX)))
    assert not private, f"{path.relative_to(REPO)} imports private core names {private}: use `import tsm_surgery`"


@functools.cache
def _core_private_attributes() -> set[str]:
    """``_``-prefixed attributes and methods the core's classes define (``self._x = ...``, ``def _x``),
    less those torch's ``nn.Module``/``fx.GraphModule`` already have (an integration's own modules use them)."""
    import torch.fx

    names = set()
    for path in (REPO / "tsm_surgery").glob("*.py"):
        for cls in (n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ClassDef)):
            for node in ast.walk(cls):
                if isinstance(node, ast.FunctionDef) and node.name.startswith("_") and not node.name.endswith("__"):
                    names.add(node.name)
                elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"
                      and node.attr.startswith("_") and not node.attr.endswith("__")):
                    names.add(node.attr)
    torch_names = set(dir(torch.fx.GraphModule)) | set(vars(torch.nn.Module()))
    return names - torch_names


# What converting wrote into the graphs is the core's: integrations read them, never edit them.
_GRAPH_EDITS = {"create_node", "erase_node", "inserting_after", "inserting_before", "call_module", "call_function",
                "call_method", "placeholder", "output", "get_attr", "node_copy", "graph_copy", "eliminate_dead_code",
                "replace_all_uses_with", "replace_input_with", "lint"}


def test_core_private_attributes_exist():
    private = _core_private_attributes()
    assert {"_step_module", "_setting"} <= private  # OnlineTSM's step graph module, TSMNet's settings reader


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(INTEGRATIONS)))
def test_no_private_core_attribute_is_used(path):
    private = _core_private_attributes()
    tree = ast.parse(path.read_text())
    # an integration's own objects may have private attributes of the same names: only others' count
    used = sorted({n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr in private
                   and not (isinstance(n.value, ast.Name) and n.value.id in ("self", "cls"))})
    assert not used, f"{path.relative_to(REPO)} uses private core attributes {used}: use the public API"
    edits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            edits += [t.attr for t in node.targets if isinstance(t, ast.Attribute) and t.attr in ("train_graph",
                                                                                                  "eval_graph")]
        called = node.func if isinstance(node, ast.Call) else None  # an fx graph is edited by calling its methods
        if isinstance(called, ast.Attribute) and called.attr in _GRAPH_EDITS \
                and isinstance(called.value, ast.Attribute) \
                and called.value.attr in ("train_graph", "eval_graph", "graph"):
            edits.append(f"{called.value.attr}.{called.attr}")
        if isinstance(node, ast.Constant) and node.value in ("temporal_shifts", "online_shifts"):
            edits.append(node.value)
        if isinstance(node, ast.Attribute) and node.attr == "train_graph":
            edits.append("train_graph")  # only the core runs or edits it
        builders = ("TSMNet", "Tracer", "ShapeProp")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in builders:
            edits.append(node.func.attr)  # a converted network is built by convert, through the core tracer
    assert not edits, f"{path.relative_to(REPO)} edits a converted network's graphs or containers ({edits}): " \
                      "use tsm_surgery.insert_module or convert's settings"
