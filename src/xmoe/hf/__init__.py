"""xmoe models inside Hugging Face transformers (needs the ``hf`` extra).

Importing this package does not import transformers: the classes below load on first use
(PEP 562), so ``import xmoe`` stays fast for users of the layer alone.

Registration with transformers' Auto classes (``model_type="xmoe"``) and of the ``"xmoe"``
experts implementation happens when the transformers module that needs it finishes loading:
``import xmoe`` installs a post-import hook (:mod:`xmoe.hf.autoregister`), so
``import xmoe`` then ``AutoModelForCausalLM.from_pretrained(dir)`` works in either import order
and a program that never touches the Auto classes never pays for them. :func:`register` does
all of it at once, explicitly; it is idempotent.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "XMoEConfig": "xmoe.hf.configuration",
    "XMoECausalLMOutput": "xmoe.hf.modeling",
    "XMoEEndTrainingStepCallback": "xmoe.hf.modeling",
    "XMoEForCausalLM": "xmoe.hf.modeling",
    "XMoEModel": "xmoe.hf.modeling",
    "XMoEModelOutput": "xmoe.hf.modeling",
    "XMoEPreTrainedModel": "xmoe.hf.modeling",
    "export_model": "xmoe.hf.export",
}


def register() -> None:
    """Register xmoe with transformers now: ``AutoConfig``, ``AutoModel``,
    ``AutoModelForCausalLM`` and the ``"xmoe"`` experts implementation (idempotent). The
    sparsified model types register themselves on ``import xmoe.conversion`` (which sits above
    this package)."""
    from xmoe.hf import autoregister

    for step in autoregister.STEPS.values():
        step()


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'xmoe.hf' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [*_LAZY, "register"]
