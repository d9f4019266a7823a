"""Expert kinds (:data:`xmoe.registry.EXPERT_KINDS`), their weights and their compute."""

from xmoe.experts.ffn import FFNExperts
from xmoe.experts.ffn_function import ffn_over_plan
from xmoe.experts.fused import ExpertFFN, expert_ffn
from xmoe.experts.kind import ExpertKind, run_shared
from xmoe.experts.weights import ExpertWeights

__all__ = [
    "ExpertFFN",
    "ExpertKind",
    "ExpertWeights",
    "FFNExperts",
    "expert_ffn",
    "ffn_over_plan",
    "run_shared",
]
