"""sra-distill: cross-tokenizer knowledge distillation of LLMs (SRA, ACL 2026, and its baselines)."""

__version__ = "0.1.0"
