"""Evaluation: perplexity, multiple choice, generation tasks."""
