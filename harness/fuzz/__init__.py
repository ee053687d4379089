"""Differential testing: random socket programs run on the live kernels and on the model, shrunk when they disagree."""
