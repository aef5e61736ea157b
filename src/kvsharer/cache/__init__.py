"""The KV cache: the shape every cache method has (``method``: ``KVMethod``, ``check_combination``), the one
attach path (``hooks``: ``CacheHooks``) and cache assembly (``assembly``), layer-wise sharing (``sharing``,
``policy``), the memory accounting (``footprint``) and the composition of a policy with a cache method
(``compose``).
"""
