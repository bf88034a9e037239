"""LoRA, read from PEFT folders unchanged: W = W0 + scaling_l B_l A_l, with A_l [r_l, in] and B_l [out, r_l]
per adapted layer (E and S per LAYER, K identity).

The folder is what PEFT's `save_pretrained` writes: `adapter_config.json` with `peft_type: LORA` and
tensors `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`. The tensors name the adapted
layers (so `target_modules` as a list, a regex, `layers_to_transform` all come out the same); each
layer's rank and alpha follow PEFT's own rule (peft/tuners/lora/model.py `_create_and_replace`:
`rank_pattern` / `alpha_pattern` keys matched by `peft.utils.other.get_pattern_key`), its scaling is
`alpha / r`, or `alpha / sqrt(r)` with `use_rslora` (peft/tuners/lora/layer.py `update_layer`).
Anything that makes the forward other than `W0 x + scaling B A x` is refused with the reason.
"""

from __future__ import annotations

import math
import re

import torch

from adapters.methods.base import AdapterMethod, Factors, Scope
from adapters.methods.peft_folder import PEFT_PREFIX, common_config_problems
from adapters.registry import register_method
from adapters.targets import GroupInfo, group_of

BASE_MUTATING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")
"""init_lora_weights values that rewrite W0 (peft/tuners/lora/layer.py update_layer): the saved A, B are not a
delta on the base model's weights."""
UNSERVED_OPTIONS = {
    "use_dora": "DoRA rescales each column of W0 + BA by a trained magnitude over that column's norm: not a "
                "low-rank delta, and not served exactly here; merge it into the model instead (PEFT's "
                "merge_and_unload) or train plain LoRA",
    "lora_bias": "lora_bias (a trained bias on lora_B) is not served",
    "modules_to_save": "modules_to_save (fully trained copies of modules) is not served: only low-rank deltas "
                       "on the target linears are",
    "trainable_token_indices": "trainable_token_indices (trained embedding rows) is not served",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not served",
    "use_qalora": "QA-LoRA is not served",
    "layer_replication": "layer_replication changes the model's layers and is not served",
    "target_parameters": "target_parameters (LoRA on nn.Parameter) is not served",
    "megatron_config": "Megatron LoRA layers are not served",
    "arrow_config": "Arrow routing is not served",
    "use_bdlora": "BD-LoRA is not served",
    "velora_config": "VeLoRA is not served",
    "kasa_config": "KaSA is not served",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D weights) is not served: the base model's target layers are nn.Linear",
}


def pattern_key(pattern_keys, module_name: str) -> str | None:
    """The rank_pattern / alpha_pattern key that applies to a module, as PEFT's get_pattern_key picks it
    (the first key that matches the end of the name at a dot), or None."""
    return next((key for key in pattern_keys if re.match(rf"(.*\.)?({key})$", module_name)), None)


def tensor_name(layer: str, part: str) -> str:
    return f"{PEFT_PREFIX}{layer}.lora_{part}.weight"


@register_method
class LoRA(AdapterMethod):
    name = "lora"
    peft_type = "LORA"
    factors = Factors(expand=Scope.LAYER, core=Scope.IDENTITY, shrink=Scope.LAYER)

    def parse_peft_config(self, raw: dict, expect, problems: list[str], warnings: list[str]):
        from adapters.format import AdapterConfig

        start = len(problems)
        problems += common_config_problems(raw, UNSERVED_OPTIONS)
        if raw.get("bias", "none") != "none":
            problems.append(f"bias={raw['bias']!r} (trained biases of the base layers) is not served; train with bias='none'")
        init = raw.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(BASE_MUTATING_INITS):
            problems.append(
                f"init_lora_weights={init!r} rewrites the base weights, so these A and B are not a delta on this "
                "server's model: convert the adapter with PEFT, save_pretrained(out_dir, "
                "path_initial_model_for_weight_conversion=<the folder of the adapter saved before training>), "
                "and upload out_dir (a plain LoRA of rank 2r)")
        r, alpha = raw.get("r"), raw.get("lora_alpha", 8)
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
            problems.append(f"lora_alpha must be a number, got {alpha!r}")
        patterns = {}
        for key in ("rank_pattern", "alpha_pattern"):
            value = raw.get(key) or {}
            if not isinstance(value, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                      for v in value.values()):
                problems.append(f"{key} must map module name patterns to numbers, got {str(value)[:80]}")
                value = {}
            patterns[key] = value
        targets = raw.get("target_modules")
        if not (isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
            problems.append(f"target_modules must be a list of names or a regex string, got {str(targets)[:80]}")
        if len(problems) > start:
            return None
        return AdapterConfig(self.name, r, (), raw.get("base_model_name_or_path") if isinstance(
            raw.get("base_model_name_or_path"), str) else None, peft_options={
            "r": r, "lora_alpha": alpha, "use_rslora": bool(raw.get("use_rslora")), **patterns})

    def resolve(self, config, tensors: dict[str, torch.Tensor], expect, problems: list[str]):
        """The config with its adapted layers (named by the tensors), their ranks and scalings."""
        from dataclasses import replace

        served = {layer: g for g, info in expect.groups.items() for layer in info.layers}
        opts = config.peft_options
        layers, unknown = set(), []
        for name in tensors:
            match = re.fullmatch(rf"{re.escape(PEFT_PREFIX)}(.+)\.lora_[AB]\.weight", name)
            if "lora_embedding" in name:
                problems.append(f"tensor {name}: LoRA on embeddings is not served (only on the target linears "
                                f"{sorted(expect.groups)})")
            elif match and match.group(1) in served:
                layers.add(match.group(1))
            elif match and group_of(match.group(1)) == "lm_head":
                problems.append(f"tensor {name}: LoRA on lm_head is not served (only on the target linears "
                                f"{sorted(expect.groups)})")
            else:
                unknown.append(name)
        if unknown:
            problems.append(f"tensors {sorted(unknown)[:8]} are not LoRA factors of a layer this server adapts "
                            f"(its target groups are {sorted(expect.groups)})")
        if not layers:
            if not unknown:
                problems.append("the adapter holds no lora_A / lora_B tensors")
            return config
        ranks, scaling = {}, {}
        for layer in sorted(layers):
            r_key = pattern_key(opts["rank_pattern"], layer)
            a_key = pattern_key(opts["alpha_pattern"], layer)
            r = int(opts["rank_pattern"][r_key]) if r_key is not None else opts["r"]
            alpha = opts["alpha_pattern"][a_key] if a_key is not None else opts["lora_alpha"]
            ranks[layer] = r
            scaling[layer] = alpha / math.sqrt(r) if opts["use_rslora"] else alpha / r
        max_rank = max(ranks.values())
        if max_rank > expect.max_layer_rank:
            problems.append(f"LoRA rank {max_rank} exceeds this server's --max-lora-rank {expect.max_layer_rank} "
                            f"(start it with --max-lora-rank {max_rank} or more to serve LoRA adapters this large)")
        groups = tuple(g for g in expect.groups if any(served[layer] == g for layer in layers))
        return replace(config, r=max_rank, target_modules=groups, layer_ranks=ranks, layer_scaling=scaling)

    def max_elements(self, expect) -> int:
        """Bounded by the per-layer stacks' rank, not the basis's."""
        return sum(math.prod(shape) for shape in self.expected_tensors(expect.max_layer_rank, expect.groups).values())

    def expected_tensors(self, r: int, groups: dict[str, GroupInfo]) -> dict[str, tuple[int, ...]]:
        """Every layer of the groups at rank r (the most a file can hold)."""
        shapes = {}
        for info in groups.values():
            for layer, in_features in zip(info.layers, info.in_features):
                shapes[tensor_name(layer, "A")] = (r, in_features)
                shapes[tensor_name(layer, "B")] = (info.out_features, r)
        return shapes

    def expected_tensors_for(self, config, groups: dict[str, GroupInfo]) -> dict[str, tuple[int, ...]]:
        shapes = {}
        for info in groups.values():
            for layer, in_features in zip(info.layers, info.in_features):
                r = config.layer_ranks.get(layer)
                if r is not None:
                    shapes[tensor_name(layer, "A")] = (r, in_features)
                    shapes[tensor_name(layer, "B")] = (info.out_features, r)
        return shapes

    def trained_factor(self, tensors: dict[str, torch.Tensor], part: str, layer: str, group: GroupInfo):
        return tensors[tensor_name(layer, "B" if part == "expand" else "A")]

    def delta_weight_for(self, adapter, layer: str, basis) -> torch.Tensor:
        info = basis.groups[group_of(layer)]
        if layer not in adapter.config.layer_ranks:
            return torch.zeros(info.out_features, info.in_features[info.layers.index(layer)])
        a, b = (adapter.tensors[tensor_name(layer, part)].to(torch.float32) for part in ("A", "B"))
        return adapter.config.layer_scaling[layer] * (b @ a)

    def slot_tensors_for(self, adapter) -> dict[str, torch.Tensor]:
        """`lora_A.<layer>` [r_l, in] and `lora_B.<layer>` [out, r_l] with the layer's scaling folded into B."""
        served = {}
        for layer, scale in adapter.config.layer_scaling.items():
            served[f"lora_A.{layer}"] = adapter.tensors[tensor_name(layer, "A")]
            served[f"lora_B.{layer}"] = adapter.tensors[tensor_name(layer, "B")].to(torch.float32) * scale
        return served
