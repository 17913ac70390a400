"""The HTTP server's parts: the shared serving state and error shape, and one router per API
(OpenAI images, image edits, video jobs, the native API). ``entrypoints/server.py`` puts them
together into one FastAPI application."""
