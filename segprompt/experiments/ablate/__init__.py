"""`segprompt ablate`: a paper's table as a grid of runs, planned, run, collected and exported.

A table (``recipes/tables/*.yaml``, :mod:`segprompt.experiments.tables`) names the recipe and overrides of
each cell and the paper's value. Each cell becomes one run per seed. A run's directory is named by
the SHA-256 of its resolved config (overrides, seed and smoke transform applied):
``results/ablate/<paper>_table<N>/<recipe>[-<seed>]-<hash12>/``. Re-running ``ablate`` therefore
skips finished runs (``eval.json`` present), resumes interrupted ones (``checkpoints/last.pt``
without ``eval.json``) and never mixes runs of different configs; a finished run of the same config
in another table's folder is reused. A cell whose directory another process holds locked (a run
in progress, see ``segprompt/runs/runlock.py``) is left to it, so two ``ablate`` never run one cell twice.

Runs are launched sequentially in this process (``local``), each under ``torchrun`` (``torchrun``)
or as Slurm jobs through submitit (``slurm``). Collection reads the run directories and gives, per
cell, the mean ± sample standard deviation (ddof = 1) over seeds beside the paper's value and the
difference; it writes CSV, Markdown and LaTeX (and a PNG where the table has a ``plot``).

``--scale smoke`` shrinks every cell with ``recipes/tables/smoke/profile.yaml`` (synthetic data,
small networks of the same family, 60 iterations) so the machinery runs on a CPU in minutes.

The package follows those steps: :mod:`.plan` (cells, runs, states), :mod:`.smoke` (the smoke
transform), :mod:`.launch` (local, torchrun, Slurm), :mod:`.collect` (values over seeds) and
:mod:`.export` (console, CSV, Markdown, LaTeX, PNG).
"""

from segprompt.experiments.ablate.collect import (
           Collected,
           collect,
           metric_value,
           parse_paper,
)
from segprompt.experiments.ablate.export import (
           TABLES_OUT,
           export,
           ours_text,
           render,
           render_plan,
)
from segprompt.experiments.ablate.launch import RunReport, command, log_path, run_plan
from segprompt.experiments.ablate.plan import (
           ABLATE_ROOT,
           Plan,
           Run,
           build_plan,
           config_hash,
           select_tables,
)
from segprompt.experiments.ablate.smoke import SMOKE_BANNER

__all__ = ["ABLATE_ROOT", "SMOKE_BANNER", "TABLES_OUT", "Collected", "Plan", "Run", "RunReport", "build_plan", "collect",
           "command", "config_hash", "export", "log_path", "metric_value", "ours_text", "parse_paper", "render",
           "render_plan", "run_plan", "select_tables"]
