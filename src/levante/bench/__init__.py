"""Benchmarks against any OpenAI-compatible endpoint: scenarios, load generator, report and plot."""
