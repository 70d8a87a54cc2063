"""``lmlab serve``: an OpenAI-compatible HTTP server with continuous batching (see app.py)."""
