"""The HTTP server: OpenAI-compatible routes over the AsyncEngine, with metrics."""
