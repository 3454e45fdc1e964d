"""Serving: an OpenAI-compatible HTTP API with continuous batching, a chat page, and terminal chat.

``engine`` decodes many requests together; ``schema`` validates requests; ``app`` is the FastAPI
application; ``chat`` is the terminal chat loop behind ``zenlm chat``.
"""
