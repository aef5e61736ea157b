"""The pipeline's stages, one module per ``python -m kvsharer <stage>`` subcommand: each parses its
arguments (``add_arguments``), reads its inputs, calls the core's pure functions and writes its outputs
(``main``). Nothing in the core imports this package; importing it imports nothing (the report stages stay
torch-free).
"""
