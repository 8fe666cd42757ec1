"""One node's recommender: ``model`` (a loaded bundle and its check), ``encoder`` (the ONNX session), ``session``
(per-shopper sessions, the result cache), ``service`` (the API methods), ``swap`` (the one path a model takes into
service), ``memory`` (thread and heap limits)."""
