"""Export a PiCa adapter as an exact PEFT LoRA folder, for servers that only know LoRA.

PiCa's delta `M_g diag(s_l) P_l` is a rank-r product per layer, so LoRA holds it exactly:
`lora_B = M_g` [out, r] and `lora_A = diag(s_l) P_l` [r, in], with `lora_alpha = r` (scaling 1).
The price is size: LoRA stores an A per layer where PiCa shares M per group and takes P from the
basis cache, so the folder holds r x (sum of in_features + sum of out_features) per layer against
PiCa's r x (sum of out_features) per group.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from adapters.format import Adapter
from adapters.registry import get_method

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


@torch.no_grad()
def export_peft_lora(adapter: Adapter, basis, out: Path, base_model: str | None = None) -> int:
    """Write `out` as a PEFT LoRA folder; returns the number of parameters it holds."""
    method = get_method(adapter.config.method)
    r = adapter.config.r
    tensors = {}
    for group in adapter.config.target_modules:
        for layer in basis.groups[group].layers:
            expand = method.factor(adapter.tensors, "expand", layer, basis, r)  # [out, r]
            core = method.factor(adapter.tensors, "core", layer, basis, r)  # [r, r] or None
            shrink = method.factor(adapter.tensors, "shrink", layer, basis, r)  # [r, in]
            key = f"base_model.model.{layer}"
            tensors[f"{key}.lora_B.weight"] = expand.clone()  # one copy per layer: LoRA shares nothing
            tensors[f"{key}.lora_A.weight"] = (shrink if core is None else core @ shrink).contiguous().cpu()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": r, "lora_dropout": 0.0,
        "target_modules": list(adapter.config.target_modules), "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "init_lora_weights": True, "inference_mode": True,
        "base_model_name_or_path": base_model or adapter.config.base_model,
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.float().cpu() for k, v in tensors.items()}, str(out / PEFT_WEIGHTS))
    (out / PEFT_CONFIG).write_text(json.dumps(config, indent=2))
    return sum(t.numel() for t in tensors.values())
