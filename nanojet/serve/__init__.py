"""Serving (an extra, not the runtime): the OpenAI-compatible HTTP server (`python -m nanojet.serve`) and the
loop that steps the engine on its own thread."""
