"""The package's layering (README, "Layout"): dependencies point one way (FORBIDDEN below), with
no import cycles. Function-level imports count: they are still dependencies."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "segprompt"

# area -> areas it must never import. From the top: (cli, api) -> experiments -> measure -> serve
# (put runs to use) and training (the loop) -> evaluation -> runs (run directories, checkpoints, the
# loader) -> build (recipe -> objects) -> (config, tuning, models, data) -> (distributed, io, errors,
# progress). serve and training never import each other.
ABOVE_MODELS = {"build", "runs", "evaluation", "training", "serve", "measure", "experiments", "cli", "api"}
FORBIDDEN = {
    "io": {"config", "data", "models", "tuning", "progress", "distributed", *ABOVE_MODELS},
    "errors": {"config", "data", "models", "tuning", "progress", "distributed", *ABOVE_MODELS},
    "progress": {"config", "data", "models", "tuning", "distributed", *ABOVE_MODELS},
    "distributed": {"config", "data", "models", "tuning", "progress", *ABOVE_MODELS},
    "data": {"models", "tuning", *ABOVE_MODELS},
    "models": {"tuning", *ABOVE_MODELS},
    "tuning": ABOVE_MODELS,
    "config": ABOVE_MODELS,
    "build": ABOVE_MODELS - {"build"},
    "runs": ABOVE_MODELS - {"build", "runs"},
    "evaluation": ABOVE_MODELS - {"build", "runs", "evaluation"},
    "training": {"serve", "measure", "experiments", "cli", "api"},
    "serve": {"training", "measure", "experiments", "cli", "api"},
    "measure": {"experiments", "cli", "api"},
    "experiments": {"cli", "api"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "segprompt"


def imports(path: Path) -> set[str]:
    """Every segprompt module ``path`` imports, at any depth of the file."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("segprompt")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("segprompt"):
            for a in node.names:  # `from segprompt.x import y` may name the module segprompt.x.y
                sub = f"{node.module}.{a.name}"
                out.add(sub if MODULES.get(sub) else node.module)
    return out


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}
GRAPH = {m: imports(p) for m, p in MODULES.items()}


@pytest.mark.parametrize("source", sorted(FORBIDDEN))
def test_dependencies_point_one_way(source):
    wrong = sorted(f"{m} imports {t}" for m, targets in GRAPH.items() if area(m) == source
                   for t in targets if area(t) in FORBIDDEN[source])
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    # a submodule importing its own package's __init__ (to reach a sibling) is not a cycle of
    # design, so edges from a module up to an enclosing package are skipped; all others count
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(GRAPH.get(m, ())):
            if t not in MODULES or m.startswith(t + "."):
                continue
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m)
    assert not cycles, "\n".join(cycles)


def test_files_and_functions_stay_small():
    too_big = []
    for m, p in MODULES.items():
        text = p.read_text()
        if len(text.splitlines()) > 460:
            too_big.append(f"{p.relative_to(ROOT.parent)}: {len(text.splitlines())} lines (split it by purpose)")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 80:
                    too_big.append(f"{p.relative_to(ROOT.parent)}:{node.lineno} {node.name}: {n} lines")
    assert not too_big, "\n".join(too_big)


# Optional or slow-to-import libraries (docs/cli.md, "Start-up time"): importing torchvision or
# timm pulls in torch._dynamo (seconds at every CLI start), so each is imported inside the
# function that uses it. Only the modules whose classes subclass the library import it at the top.
HEAVY_LIBRARIES = ("torchvision", "timm", "open_clip", "peft", "onnx", "onnxruntime", "pandas", "tensorboard",
                   "matplotlib", "safetensors", "transformers", "torch._dynamo")
IMPORTS_HEAVY_BY_DESIGN = {"segprompt.models.text.clip_text", "segprompt.models.text.prompt_learner"}


def test_importing_segprompt_loads_no_heavy_library():
    import subprocess
    import sys

    mods = sorted(m for m in MODULES if m not in IMPORTS_HEAVY_BY_DESIGN)
    code = ("import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
            "from segprompt.config.schema import component_tables\ncomponent_tables()\n"
            f"print(','.join(h for h in {HEAVY_LIBRARIES!r} if h in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, *mods], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing segprompt loaded {out.stdout.strip()}"
