"""The HTTP server's parts: the shared serving state and error shape, and one module-level
router per API (``status``: health, metrics, models; ``images``: OpenAI image generations;
``edits``: image edits; ``videos``: video jobs; ``native``: the native API). The routers find
the server's state in ``app.state.serving``; ``entrypoints/server.py`` puts them together into
one FastAPI application."""
