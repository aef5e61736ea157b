"""The report layer: paper-style tables and figures from the pipeline's result JSON files.

``collect`` loads policy, evaluation and distance files into tidy pandas DataFrames; the stages
``tables`` (CSV + Markdown) and ``figures`` (seaborn, PNG + PDF) turn them into the report.
Nothing here imports torch or transformers: these stages only read result files.
"""
