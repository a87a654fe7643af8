"""The core depends one way and on torch only.

Each module of ``tsm_surgery/`` imports on its own (without the package ``__init__`` pulling
in the others first), the core's internal imports form no cycle, and no core module imports
an integration or a package other than torch and the standard library.
"""

import ast
import subprocess
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "tsm_surgery"
MODULES = sorted(p.stem for p in CORE.glob("*.py") if p.stem != "__init__")


def _imports(name: str) -> set[str]:
    """Absolute names this module imports; relative imports are resolved inside the package."""
    tree = ast.parse((CORE / f"{name}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                found.add("tsm_surgery." + node.module if node.module else "tsm_surgery")
            else:
                found.add(node.module)
    return found


def _internal_graph() -> dict[str, set[str]]:
    return {name: {i.split(".")[1] for i in _imports(name) if i.startswith("tsm_surgery.")} for name in MODULES}


def test_core_imports_only_torch_and_the_standard_library():
    for name in MODULES + ["__init__"]:
        for imported in _imports(name):
            top = imported.split(".")[0]
            assert not imported.startswith("tsm_surgery.integrations"), (name, imported)
            assert top in ("torch", "tsm_surgery") or top in sys.stdlib_module_names, (name, imported)


def test_core_has_no_import_cycle():
    graph = _internal_graph()
    assert set().union(*graph.values()) <= set(MODULES)
    done: set[str] = set()

    def visit(name, path):
        assert name not in path, f"import cycle: {' -> '.join(path + [name])}"
        if name in done:
            return
        for dep in graph[name]:
            visit(dep, path + [name])
        done.add(name)

    for name in MODULES:
        visit(name, [])


def test_private_fx_api_is_used_in_one_module():
    users = [name for name in MODULES if "torch.fx.graph_module" in _imports(name)]
    assert users == ["_graph_module"]


def test_each_module_imports_on_its_own():
    # A bare package object stands in for tsm_surgery, so its __init__ does not import the
    # other modules first: only the module and what it imports itself are loaded. One
    # interpreter for all (torch loads once); the core's modules are dropped between them.
    code = (
        "import importlib, sys, types\n"
        f"for name in {MODULES!r}:\n"
        "    for m in [m for m in sys.modules if m.startswith('tsm_surgery')]:\n"
        "        del sys.modules[m]\n"
        f"    pkg = types.ModuleType('tsm_surgery'); pkg.__path__ = [{str(CORE)!r}]\n"
        "    sys.modules['tsm_surgery'] = pkg\n"
        "    importlib.import_module('tsm_surgery.' + name)\n"
        "    print(name, *sorted(m for m in sys.modules if m.startswith('tsm_surgery.')))\n"
        "banned = [m for m in ('timm', 'torchvision', 'mmaction', 'mmengine', 'onnx') if m in sys.modules]\n"
        "assert not banned, banned\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [line.split() for line in proc.stdout.splitlines()]
    assert [line[0] for line in lines] == MODULES
    for name, *loaded in lines:
        assert f"tsm_surgery.{name}" in loaded
        assert not any(m.startswith("tsm_surgery.integrations") for m in loaded)
