"""Distillation losses: one module per method, each a pure function of tensors (see `base.py` for the contract)."""
