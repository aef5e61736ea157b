"""Cache methods composed with a sharing policy: token methods (``intra``: H2O, SnapKV, StreamingLLM, ...),
KV quantization (``quant``) and MiniCache (``minicache``). Each is named in :mod:`kvsharer.method_registry`.
"""
