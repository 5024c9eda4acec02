"""LoRA files made in the tests from the demo models with PEFT (tests/unit/test_lora.py, and LoRAs on quantized
denoisers in tests/unit/test_quantized.py)."""

from __future__ import annotations

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict

ATTN = ["to_q", "to_k", "to_v", "to_out.0"]


def random_lora(module: torch.nn.Module, targets: list[str], seed: int) -> dict[str, torch.Tensor]:
    """A random rank-4 LoRA for `module` (lora_B random too, so it changes the output), PEFT/diffusers key names.

    PEFT injects it directly, not through transformers' or diffusers' adapter integration: the files are made the
    same way whatever versions are installed, and only the loading code under test goes through those layers."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False), module)
    return {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(module).items()}


def prefixed(prefix: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in sd.items()}
