"""The package's import structure: every module imports on its own, the layers go one way (no cycles, lazy imports
included), and the Hub-facing model files import only torch, transformers and each other."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "modeling_sparse_moe"
HUB_FACING = ("configuration_sparse_moe", "moe_primitives", "quantization", "int8_experts", "moe_dispatch",
              "modeling_sparse_moe")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted(module_name(path) for path in PACKAGE.rglob("*.py"))


def imports_of(path: Path) -> set[str]:
    """Every package module that `path` imports, at module level or inside a function (lazy imports count)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)  # `from . import x`: x may be a module
    modules = set(MODULES)
    return {target for target in found if target in modules and target != name}


def import_graph() -> dict[str, set[str]]:
    graph = {module_name(path): imports_of(path) for path in PACKAGE.rglob("*.py")}
    # The package's __init__ runs before any submodule, so an edge *to* it is not an ordering constraint.
    return {name: {target for target in targets if target != "modeling_sparse_moe"} for name, targets in graph.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_sees_a_lazy_cycle():
    """The checker itself: a cycle closed by an import inside a function is found."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_hub_facing_files_import_only_torch_transformers_and_each_other():
    allowed_roots = {"torch", "transformers", "__future__", "math", "functools", "inspect", "collections", "dataclasses",
                     "contextlib", "importlib", "typing", "warnings", "copy", "json", "os", "re"}
    for name in HUB_FACING:
        tree = ast.parse((PACKAGE / f"{name}.py").read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level:
                roots = {(node.module or "").split(".")[0]}
            elif isinstance(node, ast.ImportFrom):
                assert node.module in HUB_FACING, f"{name}.py imports .{node.module}, which is not a Hub-facing file"
                continue
            else:
                continue
            assert roots <= allowed_roots, f"{name}.py imports {roots - allowed_roots}"


def test_model_files_import_in_layer_order():
    """configuration -> moe_primitives -> quantization, int8_experts -> moe_dispatch -> modeling: each imports only
    files before it, so each can be read and changed without the ones after it."""
    graph = import_graph()
    order = {f"modeling_sparse_moe.{name}": rank for rank, name in enumerate(HUB_FACING)}
    order["modeling_sparse_moe.int8_experts"] = order["modeling_sparse_moe.quantization"]  # same layer
    for name, rank in order.items():
        later = [target for target in graph[name] if order.get(target, -1) >= rank]
        assert not later, f"{name} imports {later}, which sit at or above it"


# Each module is imported in a child forked from an interpreter that holds only third-party libraries (importing torch
# and transformers afresh 45 times would cost minutes): no module of ours is loaded before the one under test.
FORK_IMPORTS = """
import os, sys, traceback
import torch, transformers, datasets, peft, safetensors, huggingface_hub  # third-party only, preloaded once
assert not [m for m in sys.modules if m.startswith("modeling_sparse_moe")]
failed = []
for module in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            __import__(module)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if status:
        failed.append(module)
print("FAILED", failed)
sys.exit(1 if failed else 0)
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_every_module_imports_alone_in_a_fresh_interpreter():
    done = subprocess.run([sys.executable, "-c", FORK_IMPORTS, *MODULES], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-500:] + done.stderr[-3000:]
    assert "FAILED []" in done.stdout


def test_moved_modules_keep_their_old_import_paths():
    code = ("import modeling_sparse_moe as p, importlib\n"
            "for old, new in p.MOVED_MODULES.items():\n"
            "    a = importlib.import_module('modeling_sparse_moe.' + old)\n"
            "    assert a is importlib.import_module('modeling_sparse_moe.' + new), old\n"
            "from modeling_sparse_moe.hub import save_for_hub\n"
            "from modeling_sparse_moe import pretraining\n"
            "assert pretraining.__name__ == 'modeling_sparse_moe.recipes.pretraining'\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
