"""Text sources and token chunks: the embedded offline corpus, local files, or a hub dataset on a cluster.

Calibration and evaluation text never overlap: ``split_corpus`` cuts one corpus at a paragraph boundary
into a calibration part (the head) and a held-out evaluation part (the tail).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

EMBEDDED_CORPORA = ("embedded:pydoc", "embedded:docstrings")

# embedded:docstrings: the long docstrings of these pure-Python standard-library modules — library
# documentation, another genre than the language reference, and never seen by calibration
DOCSTRING_MODULES = (
    "argparse", "asyncio/tasks", "calendar", "collections/__init__", "dataclasses", "decimal", "difflib", "doctest",
    "email/message", "enum", "fractions", "functools", "heapq", "inspect", "json/__init__", "logging/__init__",
    "pathlib", "pickle", "random", "shutil", "socket", "statistics", "string", "subprocess", "tarfile",
    "textwrap", "threading", "typing", "unittest/case", "zipfile",
)


def stdlib_docstrings(min_chars: int = 200) -> str:
    """Module, class and function docstrings of at least ``min_chars`` characters, read with ``ast`` from the
    sources of :data:`DOCSTRING_MODULES` (nothing is imported), in file and source order."""
    import ast
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for module in DOCSTRING_MODULES:
        path = stdlib / f"{module}.py"
        if not path.is_file():
            raise ValueError(f"embedded:docstrings needs the standard-library source {path}, which is missing")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    parts.append(doc.strip())
    return "\n\n".join(parts)


def load_corpus(source: str) -> str:
    """``embedded:pydoc`` (CPython's language reference prose, ships with every Python), a text file,
    ``embedded:docstrings`` (long docstrings of 30 standard-library modules, a second offline corpus),
    or ``hf:<dataset>[:<config>][:<split>]`` (needs the hub or a local datasets cache; cluster only)."""
    if source == "embedded:docstrings":
        return stdlib_docstrings()
    if source == "embedded:pydoc":
        from pydoc_data.topics import topics

        return "\n\n".join(topics[key].strip() for key in sorted(topics))
    if source.startswith("hf:"):
        parts = source[3:].split(":")
        name, config, split = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None), (parts[2] if len(parts) > 2 else "train")
        try:
            from datasets import load_dataset

            dataset = load_dataset(name, config, split=split)
        except Exception as err:  # offline, unknown dataset, ...
            raise ValueError(f"could not load hub dataset {source!r}: {err}. Offline? Use a text file.") from None
        column = "text" if "text" in dataset.column_names else dataset.column_names[0]
        return "\n\n".join(t.strip() for t in dataset[column] if t and t.strip())
    path = Path(source)
    if not path.is_file():
        raise ValueError(
            f"text source {source!r} is not a file, {', '.join(EMBEDDED_CORPORA)}, or hf:<dataset>[:<config>][:<split>]"
        )
    return path.read_text(encoding="utf-8")


def check_text_source(source: str) -> None:
    if source in EMBEDDED_CORPORA or source.startswith("hf:"):
        return
    if not Path(source).is_file():
        raise ValueError(
            f"text source {source!r} is not a file, {', '.join(EMBEDDED_CORPORA)}, or hf:<dataset>[:<config>][:<split>]"
        )


def split_corpus(text: str, eval_fraction: float) -> tuple[str, str]:
    """(calibration head, evaluation tail), cut at the paragraph boundary nearest to the fraction."""
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    target = int(len(text) * (1 - eval_fraction))
    cut = text.rfind("\n\n", 0, target)
    if cut <= 0:
        cut = target
    return text[:cut].strip() + "\n", text[cut:].strip() + "\n"


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def token_chunks(tokenizer, text: str, n: int, t: int):
    """``[n, t]`` consecutive, non-overlapping chunks of exactly ``t`` tokens (every sample counts)."""
    import torch  # here, so that text-only stages do not import torch

    if n < 1 or t < 2:
        raise ValueError(f"need at least 1 sample of at least 2 tokens, got N={n}, T={t}")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    if len(ids) < n * t:
        raise ValueError(f"the text has {len(ids)} tokens; {n} samples x {t} tokens need {n * t}")
    return torch.tensor(ids[: n * t], dtype=torch.long).view(n, t)
