"""The layering the code promises (docs/architecture.md): a linear import order
state -> models -> samplers -> caches -> generate -> lm, no import hidden inside a function to dodge a cycle, and
the registries every message is derived from."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

import lmeval_dllm

PACKAGE = os.path.dirname(lmeval_dllm.__file__)
LAYERS = ["lmeval_dllm.state", "lmeval_dllm.models", "lmeval_dllm.samplers", "lmeval_dllm.caches",
          "lmeval_dllm.generate", "lmeval_dllm.lm"]


def _loaded_after_import(module: str) -> set[str]:
    code = (f"import sys, importlib; importlib.import_module({module!r}); "
            "print('\\n'.join(m for m in sys.modules if m.startswith('lmeval_dllm')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


@pytest.mark.parametrize("i", range(len(LAYERS) - 1))
def test_a_layer_imports_nothing_above_it(i):
    loaded = _loaded_after_import(LAYERS[i])
    above = [m for m in loaded for layer in LAYERS[i + 1:] if m == layer or m.startswith(layer + ".")]
    assert above == [], f"importing {LAYERS[i]} loaded {sorted(above)}"


def test_state_imports_nothing_of_the_package():
    assert _loaded_after_import("lmeval_dllm.state") <= {"lmeval_dllm", "lmeval_dllm._hook", "lmeval_dllm.state"}


def _core_files():
    for sub in ("state.py", "generate.py"):
        yield os.path.join(PACKAGE, sub)
    for sub in ("models", "samplers", "caches"):
        for name in sorted(os.listdir(os.path.join(PACKAGE, sub))):
            if name.endswith(".py"):
                yield os.path.join(PACKAGE, sub, name)


# A function-local import with a reason other than a cycle: ``python -m lmeval_dllm.samplers.frequency_table``
# must not find the module already imported by the package.
ALLOWED_LOCAL = {("pc_sampler.py", "lmeval_dllm.samplers.frequency_table")}


def test_no_function_local_imports_of_the_package_in_the_core():
    found = []
    for path in _core_files():
        tree = ast.parse(open(path, encoding="utf-8").read())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lmeval_dllm"):
                    if (os.path.basename(path), node.module) not in ALLOWED_LOCAL:
                        found.append(f"{os.path.relpath(path, PACKAGE)}:{node.lineno} {node.module}")
    assert found == []


def test_no_type_checking_imports_of_higher_layers():
    """``if TYPE_CHECKING:`` imports are how a cycle hides: only a lower layer's names may appear there."""
    order = {name: i for i, name in enumerate(LAYERS)}

    def layer_of(module: str) -> int:
        return max((i for name, i in order.items() if module == name or module.startswith(name + ".")), default=-1)

    found = []
    for path in _core_files():
        rel = "lmeval_dllm." + os.path.relpath(path, PACKAGE)[:-3].replace(os.sep, ".").removesuffix(".__init__")
        tree = ast.parse(open(path, encoding="utf-8").read())
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
                for sub in ast.walk(node):
                    if isinstance(sub, ast.ImportFrom) and layer_of(sub.module or "") > layer_of(rel):
                        found.append(f"{rel}: {sub.module}")
    assert found == []
