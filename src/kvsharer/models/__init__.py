"""Models: loading any Hugging Face causal LM and finding its decoder layers (``loading``), the paper models'
shapes (``shapes``), CPU stand-ins (``standins``), model sources (``sources``) and hub access (``hub_access``).

The lowest layer: nothing here imports the cache, the methods, the search or the stages.
"""
