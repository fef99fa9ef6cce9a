"""Evaluation: measuring edits, running and resuming evaluations and sweeps, reporting them.

The metrics, the results folders and the report only read saved files and never import torch;
the probability passes, generation diagnostics, downstream tasks, runs and tuning drive the
engine. Importing ``rrome.eval`` itself imports nothing.
"""
