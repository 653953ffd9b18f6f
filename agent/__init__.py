"""moba-ask's application layer: model loading, the engine, sessions, citations, the cache, the CLI.

Composes `moba`, `ingest` and `prompts`. Nothing imports `agent`.
"""
