"""``xmoe.kernels`` without triton: the package and its registry entry import, and decline."""

from __future__ import annotations

import subprocess
import sys


def test_the_package_imports_and_declines_without_triton():
    """With triton unimportable, ``xmoe.kernels`` and the registry entry still import, and the
    entry supports nothing (so ``expert_ffn="triton"`` raises a clear error, never a crash)."""
    script = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from xmoe.registry import EXPERT_FFN\n"
        "import xmoe.kernels\n"
        "ffn = EXPERT_FFN['triton']\n"
        "assert not ffn.supports(torch.float32, torch.device('cuda'), 8, 24, 10)\n"
        "assert 'triton' not in [m.split('.')[0] for m in sys.modules if sys.modules[m]]\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
