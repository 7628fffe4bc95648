"""Serving: the continuous-batching engine over a tp x pp grid (engine.py) and the OpenAI-compatible
HTTP front of `cke-dist serve` (http.py)."""
from .engine import Engine, EngineError, Params, Request

__all__ = ["Engine", "EngineError", "Params", "Request"]
