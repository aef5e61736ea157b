"""The KV cache: layer-wise sharing (``sharing``, ``policy``), the decoder hooks every cache method builds on
(``hooks``), the memory accounting (``footprint``) and the composition of a policy with a cache method
(``compose``).
"""
