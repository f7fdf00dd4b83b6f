"""Evaluation: what a trained model answers, read against the target.

``sample`` (the Sampler: batched KV-cached steered sampling), ``evaluate`` (multi-round evaluation
of test versions), ``parsing`` (answers -> categories), ``judges`` (story judges), ``metrics``
(MAE / KL / JS, bootstrap intervals, the exact steering distribution) and ``report`` (tables and
plots of a run).
"""
