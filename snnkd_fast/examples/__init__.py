"""Runnable examples: ``python -m snnkd_fast.examples.distill`` (ANN -> SNN distillation on real data)."""
