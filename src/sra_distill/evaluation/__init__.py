"""Evaluation: generation, ROUGE-L, the run report, model cards and plots."""
