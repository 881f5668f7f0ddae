"""LoRA (Hu et al., 2021): a trainable low-rank update beside a frozen projection,
``y = x W^T + b + (alpha / r) * dropout(x) A^T B^T``, with ``A`` (r x in) drawn as PEFT draws it
(Kaiming-uniform, a = sqrt(5)) and ``B`` (out x r) zero, so the adapted model starts as the base model.

A small wrapper of our own rather than ``peft``: the projections to adapt are four fused matrices
per block (``attn.qkv``, ``attn.proj``, ``mlp.up``, ``mlp.down``) that the model names itself; peft
would add a dependency (and transformers-style module discovery) to wrap them, and its merge, state
dict keys and frozen-base dtype handling would sit outside the checkpoint code that has to keep
resume bit-exact. Here an adapted layer keeps the base's parameter names (``weight``, ``bias``) and
adds ``lora_A``, ``lora_B`` and the scale as a buffer (``lora_scale``), so a checkpoint's state dict
says everything :func:`merged_state_dict` needs to fold the adapters in without the run's config.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sab_byon_omni.config.schema import LORA_TARGETS, lora_target_names
from sab_byon_omni.model.ops import linear

# --lora_targets names -> the module of each block they adapt
TARGETS: dict[str, str] = dict(zip(LORA_TARGETS, ("attn.qkv", "attn.proj", "mlp.up", "mlp.down")))
SUFFIXES = ("lora_A", "lora_B", "lora_scale")


class LoRALinear(nn.Module):
    """A frozen linear layer (its ``weight`` may be held in a lower precision) plus a rank-``rank``
    update scaled by ``alpha / rank``; only ``lora_A`` and ``lora_B`` train (in fp32)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 base_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        weight = base.weight.detach()
        self.weight = nn.Parameter(weight.to(base_dtype) if base_dtype is not None else weight, requires_grad=False)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach(), requires_grad=False)
        device = weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = alpha / rank  # a Python number in forward (kept in fp32 math); a resume checks alpha matches
        self.register_buffer("lora_scale", torch.tensor(self.scale, dtype=torch.float32, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cast = (lambda t: t) if torch.is_autocast_enabled(x.device.type) else (  # noqa: E731
            lambda t: None if t is None else t.to(x.dtype))  # autocast casts them itself; else x's dtype
        update = F.linear(F.linear(self.dropout(x), cast(self.lora_A)), cast(self.lora_B))
        return linear(x, cast(self.weight), cast(self.bias)) + update * self.scale

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain fp32 ``nn.Linear`` holding ``W + scale * B @ A`` (and the bias)."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=self.weight.device)
        out.weight.copy_(merge_weight(self.weight, self.lora_A, self.lora_B, self.lora_scale))
        if self.bias is not None:
            out.bias.copy_(self.bias.float())
        return out


def merge_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """``W + scale * B @ A`` in fp32: the one formula for a merged adapter."""
    return weight.float() + (b.float() @ a.float()) * scale


def largest_useful_rank(model: nn.Module, targets: str = "qkv,proj,up,down") -> int:
    """The smallest dimension of the projections ``targets`` names: a LoRA rank above it adds
    parameters and no expressiveness (the update ``B @ A`` cannot exceed that rank)."""
    return min(min(layer.in_features, layer.out_features) for block in model.blocks
               for layer in (block.get_submodule(TARGETS[t]) for t in lora_target_names(targets)))


def add_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0, targets: str = "qkv,proj,up,down",
             base_dtype: torch.dtype | None = None) -> list[str]:
    """Freeze every parameter of ``model`` (a CausalTransformer) and put a :class:`LoRALinear` in
    place of each targeted projection of every block (its frozen weight cast to ``base_dtype`` if
    given). Returns the adapted modules' names. Draws ``lora_A`` from torch's global generator."""
    for p in model.parameters():
        p.requires_grad_(False)
    names = []
    for i, block in enumerate(model.blocks):
        for target in lora_target_names(targets):
            parent_name, attr = TARGETS[target].split(".")
            parent = getattr(block, parent_name)
            setattr(parent, attr, LoRALinear(getattr(parent, attr), rank, alpha, dropout, base_dtype))
            names.append(f"blocks.{i}.{TARGETS[target]}")
        block.mlp.recompute_gelu = False  # memory saving's GELU path multiplies by down.weight alone
    return names


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every adapter of ``model`` into a plain fp32 ``nn.Linear``, in place: afterwards the model
    is the base architecture again (its state dict loads anywhere). Returns how many were merged."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name, m in found:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, m.merged())
    return len(found)


def merged_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with every adapter (``X.lora_A``, ``X.lora_B``, ``X.lora_scale``) folded into its
    ``X.weight`` (fp32); one without adapters is returned as it is."""
    prefixes = [k[: -len(".lora_A")] for k in state if k.endswith(".lora_A")]
    if not prefixes:
        return state
    out = {k: v for k, v in state.items() if k.rpartition(".")[2] not in SUFFIXES}
    for p in prefixes:
        out[f"{p}.weight"] = merge_weight(state[f"{p}.weight"], state[f"{p}.lora_A"], state[f"{p}.lora_B"],
                                          state[f"{p}.lora_scale"])
    return out


def adapter_parameters(model: nn.Module) -> int:
    """Parameters of ``model``'s adapters (what a LoRA run trains)."""
    return sum(p.numel() for name, p in model.named_parameters() if name.rpartition(".")[2] in SUFFIXES)
