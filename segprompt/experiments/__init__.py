"""Paper reproduction on top of training, evaluation and the builder: the papers' tables (``tables``, ``paper_counts``),
their grids of runs (``ablate``) and the synthetic miniature of the SPM claim (``demo``)."""
