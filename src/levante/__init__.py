"""Levante: run, serve, tune, evaluate and cost out Mistral Small 3 and its architecture family."""
