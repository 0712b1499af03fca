"""Sweeps: specs (spec.py), the Tune run (tune_run.py), callbacks, and what MLflow knows of a sweep (best, report)."""
