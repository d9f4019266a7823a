"""xmoe models inside Hugging Face transformers (needs the ``hf`` extra).

``import xmoe`` registers the classes with ``AutoConfig``, ``AutoModel`` and
``AutoModelForCausalLM`` when transformers is installed; :func:`register` is idempotent.
"""

from xmoe.hf.configuration import XMoEConfig
from xmoe.hf.export import export_run, hf_model_from_run
from xmoe.hf.modeling import (
    XMoECausalLMOutput,
    XMoEForCausalLM,
    XMoEModel,
    XMoEModelOutput,
    XMoEPreTrainedModel,
)

_registered = False


def register() -> None:
    """Register ``model_type="xmoe"`` with the transformers Auto classes (once)."""
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    AutoConfig.register("xmoe", XMoEConfig, exist_ok=True)
    AutoModel.register(XMoEConfig, XMoEModel, exist_ok=True)
    AutoModelForCausalLM.register(XMoEConfig, XMoEForCausalLM, exist_ok=True)
    _registered = True


__all__ = [
    "XMoECausalLMOutput",
    "XMoEConfig",
    "XMoEForCausalLM",
    "XMoEModel",
    "XMoEModelOutput",
    "XMoEPreTrainedModel",
    "export_run",
    "hf_model_from_run",
    "register",
]
