"""The package's wings import one way: admin -> provider/consumer -> registry/stores -> vocabulary.

Every import of every module is read from its source (those inside functions too), so an arrow
that runs back up fails here before it reaches a reader.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, Set, Tuple

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "thriftprobe"

VOCABULARY = {"_version", "errors", "config", "node", "idl", "metrics", "limits", "cooperative"}
LEVEL = {"registry": 1, "stores": 1, "provider": 2, "consumer": 2, "aio": 3, "admin": 3}


def _modules() -> Dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _wing(module: str) -> Tuple[str, int]:
    """(wing, level) of a module of the package; the root package is the public API."""
    parts = module.split(".")
    if len(parts) == 1:
        return "api", 4
    top = parts[1]
    if top in VOCABULARY:
        return "vocabulary", 0
    return top, LEVEL[top]


# The client libraries of the backends belong to the wing that wraps them: the rest of the
# package reaches ZooKeeper through the registry interface and Redis and MySQL through stores.
BACKEND_LIBRARIES = {"kazoo": "registry", "redis": "stores", "pymysql": "stores"}


def _imports(module: str, path: Path, package_only: bool = True) -> Iterator[str]:
    """The modules that ``module`` imports (the package's own only, unless ``package_only`` is
    false), relative imports resolved; ``importlib.import_module("...")`` and ``__import__("...")``
    with a literal name count too."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                target = node.args[0].value
                if not package_only or target.split(".")[0] == "thriftprobe":
                    yield target
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if not package_only or alias.name.split(".")[0] == "thriftprobe":
                    yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != "thriftprobe":
                if not package_only and not node.level:
                    yield base
                continue
            for alias in node.names:
                target = base + "." + alias.name
                yield target if target in MODULES else base


def _arrows() -> Set[Tuple[str, str]]:
    return {(module, target) for module, path in MODULES.items() for target in _imports(module, path)}


def test_every_module_belongs_to_a_known_wing() -> None:
    for module in MODULES:
        _wing(module)  # KeyError names a module outside the wings


def test_imports_run_one_way() -> None:
    wrong = []
    for module, target in sorted(_arrows()):
        wing, level = _wing(module)
        target_wing, target_level = _wing(target)
        if target == "thriftprobe":
            wrong.append("%s imports the package root (the public API)" % module)
        elif wing == target_wing:
            continue
        elif target_level >= level:
            wrong.append("%s (%s) imports %s (%s)" % (module, wing, target, target_wing))
    assert not wrong, "imports that run against the wings:\n" + "\n".join(wrong)


def test_backend_libraries_are_used_only_by_the_wing_that_wraps_them() -> None:
    wrong = []
    for module, path in sorted(MODULES.items()):
        for target in _imports(module, path, package_only=False):
            owner = BACKEND_LIBRARIES.get(target.split(".")[0])
            if owner is not None and _wing(module)[0] != owner:
                wrong.append("%s imports %s (only %s/ may)" % (module, target, owner))
    assert not wrong, "\n".join(wrong)


# Optional libraries, each wrapped by one module: the rest of the package goes through it, so
# that without the library installed nothing else fails to import.
OPTIONAL_LIBRARIES = {"prometheus_client": {"thriftprobe.metrics"}}


def test_optional_libraries_are_imported_only_by_the_module_that_wraps_them() -> None:
    wrong = []
    for module, path in sorted(MODULES.items()):
        for target in _imports(module, path, package_only=False):
            allowed = OPTIONAL_LIBRARIES.get(target.split(".")[0])
            if allowed is not None and module not in allowed:
                wrong.append("%s imports %s (only %s may)" % (module, target, ", ".join(sorted(allowed))))
    assert not wrong, "\n".join(wrong)


def test_the_public_api_imports_no_operator_tool() -> None:
    arrows = [target for module, target in _arrows() if module == "thriftprobe"]
    assert arrows and not [t for t in arrows if _wing(t)[0] == "admin"]


def test_the_checker_sees_a_backward_arrow(tmp_path: Path) -> None:
    # The check must be able to fail: a registry module importing the consumer's table is caught.
    bad = tmp_path / "zookeeper.py"
    bad.write_text(
        "from ..consumer.table import NodeTable\nfrom . import Registry\n"
        "import importlib\nimportlib.import_module('thriftprobe.admin.cli')\nimport redis\n"
    )
    targets = set(_imports("thriftprobe.registry.zookeeper", bad))
    assert targets == {"thriftprobe.consumer.table", "thriftprobe.registry", "thriftprobe.admin.cli"}
    assert "redis" in set(_imports("thriftprobe.registry.zookeeper", bad, package_only=False))
    assert _wing("thriftprobe.consumer.table")[1] > _wing("thriftprobe.registry.zookeeper")[1]


@pytest.mark.parametrize("statement", ["import thriftprobe", "from thriftprobe import start_service, build_client"])
def test_importing_the_package_loads_no_admin_module_and_no_flask(statement: str) -> None:
    code = (
        statement + "\nimport sys\n"
        "print(','.join(sorted(m for m in sys.modules if m.startswith('thriftprobe.admin') or m == 'flask')))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == ""
