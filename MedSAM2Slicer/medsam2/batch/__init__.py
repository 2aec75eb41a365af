"""Cohorts: `medsam2 batch` and `medsam2 evaluate --ray` run one case per task, the model loaded once
per worker, in this process or on Ray (manifest.py, case.py, runner.py, summary.py)."""
