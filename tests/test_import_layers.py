"""The modules of ``magnet_dist/train`` import downward only (no cycle, not even one hidden in
a function): the driver above the worker loop, the loop above its pieces, the pieces above
the leaves. Every import, at the top of a module or inside a function, is checked."""

from __future__ import annotations

import ast
from pathlib import Path

TRAIN = Path(__file__).resolve().parents[1] / "magnet_dist" / "train"

# top first; a module may import only modules of a later layer
LAYERS = [
    ["run"],
    ["pipeline", "distributed"],
    ["worker"],
    ["step", "sharded_eval", "worker_checkpoint"],
    ["worker_state"],
    ["cluster", "faults", "history"],
    ["reference"],
    ["checkpoint", "common", "worker_info", "library_output", "ray_auth", "batches"],
    ["plots", "run_folder", "ray_env", "step_clock"],
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def train_imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every import of a ``magnet_dist.train`` module in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x / from .x import y
                base = "magnet_dist.train" + (f".{node.module}" if node.module else "")
            else:
                base = node.module or ""
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[:2] == ["magnet_dist", "train"] and len(parts) > 2:
                if (TRAIN / f"{parts[2]}.py").exists():
                    found.append((node.lineno, parts[2]))
    return found


def test_every_train_module_has_a_layer():
    modules = {p.stem for p in TRAIN.glob("*.py")} - {"__init__"}
    assert modules - LAYER.keys() == set(), "place the new module in LAYERS"
    assert LAYER.keys() - modules == set(), "LAYERS names a module that is gone"


def test_train_modules_import_downward_only():
    upward = []
    for path in sorted(TRAIN.glob("*.py")):
        if path.stem == "__init__":
            continue
        for line, target in train_imports(path):
            if target != path.stem and LAYER[target] <= LAYER[path.stem]:
                upward.append(f"{path.name}:{line} imports {target} (layer {LAYER[target]})")
    assert upward == [], "\n".join(upward)


def test_ray_env_is_a_leaf():
    text = (TRAIN / "ray_env.py").read_text()
    tree = ast.parse(text)
    project = [
        n.lineno
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom)
        and (n.level or (n.module or "").startswith("magnet_dist"))
        or isinstance(n, ast.Import)
        and any(a.name.startswith("magnet_dist") for a in n.names)
    ]
    assert project == []
