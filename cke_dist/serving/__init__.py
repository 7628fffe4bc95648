"""Serving: the continuous-batching engine over a tp x pp grid (engine.py), the OpenAI-compatible
HTTP front of `cke-dist serve` (http.py) and the chat templates it renders (chat.py)."""
from cke_dist.serving.engine import Engine, EngineError, Params, Request

__all__ = ["Engine", "EngineError", "Params", "Request"]
