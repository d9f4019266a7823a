"""Register xmoe with transformers when (and only when) transformers loads the parts that need it.

transformers takes seconds to import, and most of that is its Auto classes. Registering at
``import xmoe`` would make every user of the layer pay for them. Instead :func:`install` puts a
finder on ``sys.meta_path`` that runs one registration step right after each of these modules
finishes executing (or at once, for those already imported):

- ``transformers.models.auto.configuration_auto``: ``AutoConfig`` learns ``model_type="xmoe"``;
- ``transformers.models.auto.modeling_auto``: ``AutoModel`` and ``AutoModelForCausalLM`` too;
- ``transformers.integrations.moe``: the ``"xmoe"`` experts implementation.

The finder only wraps those three modules' loaders and stays out of every other import.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import warnings
from collections.abc import Callable
from types import ModuleType

_done: set[str] = set()


def _once(name: str, step: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        if name not in _done:
            step()
            _done.add(name)

    return run


def _register_config() -> None:
    from transformers import AutoConfig

    from xmoe.hf.configuration import XMoEConfig

    AutoConfig.register("xmoe", XMoEConfig, exist_ok=True)


def _register_models() -> None:
    from transformers import AutoModel, AutoModelForCausalLM

    from xmoe.hf.configuration import XMoEConfig
    from xmoe.hf.modeling import XMoEForCausalLM, XMoEModel

    STEPS["transformers.models.auto.configuration_auto"]()
    AutoModel.register(XMoEConfig, XMoEModel, exist_ok=True)
    AutoModelForCausalLM.register(XMoEConfig, XMoEForCausalLM, exist_ok=True)


def _register_experts() -> None:
    from xmoe.hf.experts import register_experts_implementation

    register_experts_implementation()


STEPS: dict[str, Callable[[], None]] = {
    "transformers.models.auto.configuration_auto": _once("config", _register_config),
    "transformers.models.auto.modeling_auto": _once("models", _register_models),
    "transformers.integrations.moe": _once("experts", _register_experts),
}
"""Module whose loading triggers a step -> the step (each runs once)."""


def _run_step(module_name: str) -> None:
    try:
        STEPS[module_name]()
    except Exception as error:  # a failed registration must not break the user's import
        warnings.warn(
            f"xmoe could not register with transformers after {module_name} loaded: "
            f"{type(error).__name__}: {error} (call xmoe.hf.register() to see the traceback)",
            stacklevel=2,
        )


class _RegisteringLoader(importlib.abc.Loader):
    """Delegates to the real loader, then runs the module's registration step."""

    def __init__(self, loader: importlib.abc.Loader, module_name: str) -> None:
        self._loader = loader
        self._module_name = module_name

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        _run_step(self._module_name)

    def __getattr__(self, name: str):  # get_source, get_resource_reader, ... of the real loader
        return getattr(self._loader, name)


class _AfterImportFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in STEPS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisteringLoader(spec.loader, fullname)
                return spec
        return None


_FINDER = _AfterImportFinder()


def install() -> None:
    """Run the steps of modules already imported; hook the others (idempotent)."""
    for module_name in STEPS:
        if module_name in sys.modules:
            _run_step(module_name)
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
