"""Dense -> sparse conversion (MoEfication / XMoE-on-dense) of transformers causal LMs of the
families in ``xmoe.registry.FAMILIES`` (Llama, Mistral, Qwen2; one :class:`Family` entry each).

``sparsify(model, expert_size, ...)`` splits each decoder layer's SwiGLU FFN into unweighted
neuron-group experts with a router; ``sparsify(model, mode="neurons", target_flops=F, ...)``
instead skips each input channel and neuron below a calibrated threshold (:class:`NeuronMLP`);
``set_active_fraction`` / ``set_threshold`` pick how many run
per token; ``set_target_flops`` re-solves the neurons mode's thresholds on the current weights
(after recovery); ``save_pretrained`` + :func:`load_sparsified` (or ``AutoModelForCausalLM``)
round-trip it. Importing this package registers the families' sparse model types with the
Auto classes (it imports their transformers classes anyway); ``import xmoe`` alone does not
load it.
"""

from xmoe.conversion.architecture import UnsupportedModelError
from xmoe.conversion.config import COMBINES, PARTITIONS, ROUTERS, SparsifyConfig
from xmoe.conversion.families import Family
from xmoe.conversion.modeling import load_sparsified, register, sparse_classes
from xmoe.conversion.neuron_mlp import NeuronMLP, ffn_flops_fraction, neuron_mlps
from xmoe.conversion.partition import clustered_partition, contiguous_partition
from xmoe.conversion.sparse_mlp import SparseMLP
from xmoe.conversion.sparsify import (
    experts_per_token,
    set_active_fraction,
    set_combine,
    set_router,
    set_target_flops,
    set_threshold,
    sparse_mlps,
    sparsify,
)

register()

__all__ = [
    "COMBINES",
    "PARTITIONS",
    "ROUTERS",
    "Family",
    "NeuronMLP",
    "SparseMLP",
    "SparsifyConfig",
    "UnsupportedModelError",
    "clustered_partition",
    "contiguous_partition",
    "experts_per_token",
    "ffn_flops_fraction",
    "load_sparsified",
    "neuron_mlps",
    "register",
    "set_active_fraction",
    "set_combine",
    "set_router",
    "set_target_flops",
    "set_threshold",
    "sparse_classes",
    "sparse_mlps",
    "sparsify",
]
