"""What ``import xmoe`` loads, registration with transformers in either import order, and the
dependency ranges against the exact pins of ``constraints.txt``."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_import_xmoe_does_not_import_transformers():
    out = _run(
        "import sys, xmoe, xmoe.hf\n"
        "print('transformers' in sys.modules, 'xmoe.training' in sys.modules)\n"
        "xmoe.hf.XMoEConfig\n"  # the lazy attribute loads on first use
        "print('transformers' in sys.modules)"
    )
    assert out.splitlines() == ["False False", "True"]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    pytest.importorskip("transformers")
    from xmoe.hf import XMoEConfig, XMoEForCausalLM

    config = XMoEConfig(
        vocab_size=64,
        d_model=32,
        num_layers=2,
        num_heads=2,
        d_ff=64,
        max_seq_len=32,
        moe={"d_model": 32, "num_experts": 4, "d_expert": 16},
    )
    directory = tmp_path_factory.mktemp("hf")
    XMoEForCausalLM(config).save_pretrained(directory)
    return directory


_LOAD = (
    "from transformers import AutoConfig, AutoModelForCausalLM\n"
    "from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS\n"
    "config = AutoConfig.from_pretrained(sys.argv[1])\n"
    "model = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
    "print(type(config).__name__, type(model).__name__, 'xmoe' in ALL_EXPERTS_FUNCTIONS)\n"
)


_ORDERS = {
    "xmoe-first": "import xmoe\n" + _LOAD,
    "transformers-first": _LOAD.replace("config = ", "import xmoe\nconfig = ", 1),
    # configuration_llama loads the Auto modules while it is itself half-initialised
    "xmoe-then-llama": "import xmoe\nfrom transformers import LlamaConfig, LlamaForCausalLM\n"
    + _LOAD,
}


@pytest.mark.parametrize("order", list(_ORDERS))
def test_auto_classes_load_xmoe_in_either_import_order(saved_model, order):
    code = "import sys, warnings\nwarnings.simplefilter('error')\n" + _ORDERS[order]
    out = _run(code, str(saved_model))
    assert out.splitlines()[-1] == "XMoEConfig XMoEForCausalLM True"


def test_every_dependency_range_admits_its_pin():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        requirements += [Requirement(r) for r in extra]
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower()] = version
    for requirement in requirements:
        assert requirement.specifier, f"{requirement.name} has no version range in pyproject.toml"
        name = requirement.name.lower()
        assert name in pins, f"{requirement.name} has no exact pin in constraints.txt"
        assert requirement.specifier.contains(pins[name]), (requirement, pins[name])
