"""Start-up time of the CLI against importing torch, measured side by side in one run.

Every command that touches a model imports torch, so ``python -c "import torch"`` is the floor;
the goal (docs/cli.md, "Start-up time") is that ``segprompt --help`` and a one-line recipe error
answer within 1.3x of it. Timed, in rounds that alternate the commands so that all see the same
machine conditions:

- ``import torch``: ``python -c "import torch"``, the reference;
- ``--help``: ``segprompt --help``;
- ``recipe error``: ``segprompt train smoke --set data.root=<missing folder>``, refused with one line;
- ``count-params``: ``segprompt count-params smoke`` on a tiny prepared synthetic set.

The median of each command's rounds is printed with its ratio to the reference, and the
heavy libraries each command imported (none but torch is the point).

    python benchmarks/startup.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL = 1.3  # --help and a recipe error within this factor of `import torch`
HEAVY = ("torchvision", "timm", "open_clip", "peft", "onnx", "onnxruntime", "pandas", "torch._dynamo")


def segprompt_command() -> list[str]:
    """The installed console script beside this interpreter (what a user runs), else ``-m``."""
    script = Path(sys.executable).with_name("segprompt")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "segprompt"]


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, int]:
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
    return time.perf_counter() - t0, rc


def heavy_imports(args: list[str], env: dict[str, str]) -> list[str]:
    """The heavy libraries the CLI imports for ``args`` (run in-process under a sys.modules probe)."""
    probe = ("import sys\nfrom segprompt.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             f"print('HEAVY:' + ','.join(m for m in {HEAVY!r} if m in sys.modules), file=sys.__stderr__)")
    err = subprocess.run([sys.executable, "-c", probe, *args], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True).stderr
    line = next((x for x in reversed(err.splitlines()) if x.startswith("HEAVY:")), None)
    if line is None:
        raise SystemExit(f"the import probe of {' '.join(args)} failed:\n{err}")
    return [m for m in line.removeprefix("HEAVY:").split(",") if m]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="segprompt-startup-"))
    env = {**os.environ, "COLUMNS": "200"}
    try:
        cli = segprompt_command()
        data = work / "synthetic"
        subprocess.run([*cli, "prepare", "synthetic", "--out", str(data), "--train", "4", "--val", "2", "--test",
                        "2"], env=env, check=True, stdout=subprocess.DEVNULL)
        cases = {
            "import torch": ([sys.executable, "-c", "import torch"], 0),
            "--help": ([*cli, "--help"], 0),
            "recipe error": ([*cli, "train", "smoke", "--set", f"data.root={work / 'missing'}"], 2),
            "count-params": ([*cli, "count-params", "smoke", "--set", f"data.root={data}"], 0),
        }
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, (cmd, want) in cases.items():
                seconds, rc = timed(cmd, env)
                if rc != want:
                    raise SystemExit(f"{name}: exit status {rc}, expected {want}: {' '.join(cmd)}")
                times[name].append(seconds)
        base = statistics.median(times["import torch"])
        print(f"{'command':<14} {'median s':>9} {'x import torch':>15}  heavy imports   ({args.rounds} rounds, "
              f"{os.cpu_count()} cores)")
        for name, (cmd, _) in cases.items():
            t = statistics.median(times[name])
            heavy = "" if name == "import torch" else ", ".join(heavy_imports(cmd[len(cli):], env)) or "none"
            goal = f"  (goal <= {GOAL})" if name in ("--help", "recipe error") else ""
            print(f"{name:<14} {t:>9.2f} {t / base:>15.2f}  {heavy}{goal}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
