"""Expert weight containers and their compute."""

from xmoe.experts.ffn import FFNExperts
from xmoe.experts.ffn_function import expert_ffn

__all__ = ["FFNExperts", "expert_ffn"]
