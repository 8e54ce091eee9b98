"""Every path of the LoRA ops implements the `LoraOps` contract with the same parameters."""
from __future__ import annotations

import inspect

import pytest

from loraplex.kernels import LoraOps, lora_reference, lora_torch, lora_triton

CONTRACT = {name: fn for name, fn in vars(LoraOps).items() if inspect.isfunction(fn) and not name.startswith("_")}


def test_the_contract_names_the_five_ops():
    assert sorted(CONTRACT) == ["lora_expand", "lora_expand_fused", "lora_shrink", "lora_shrink_fused", "merge"]


@pytest.mark.parametrize("path", [lora_reference, lora_torch, lora_triton], ids=lambda m: m.__name__.rsplit(".")[-1])
@pytest.mark.parametrize("op", sorted(CONTRACT))
def test_each_path_has_the_op_with_the_contract_parameters(path, op):
    expected = list(inspect.signature(CONTRACT[op]).parameters)[1:]  # without self
    assert list(inspect.signature(getattr(path, op)).parameters) == expected
