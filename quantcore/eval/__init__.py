"""Evaluation: perplexity (and, later, KL divergence and agreement against the base model)."""
