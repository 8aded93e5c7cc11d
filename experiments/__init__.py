"""Experiments: one module per experiment, run with `python -m experiments.run NAME`."""
