"""Our model handed back to ``transformers`` in its own architecture (``export --format hf``).

A model of family ``llama``, ``mistral``, ``qwen2``, ``gpt2`` or ``gpt_neox`` is written as
``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``, ``GPT2LMHeadModel`` or
``GPTNeoXForCausalLM``; a SAB model (family ``sab``) as GPT-NeoX (:mod:`~sab_byon_omni.interop.hf_neox`).
Each is exact or refused: an option the architecture cannot compute (say layernorm for Llama) is
one line naming it (:func:`~sab_byon_omni.interop.hf_families.check_representable`). Biases the
architecture always has and ours lacks are written as zeros; a fragmergent factor other than 1 is
folded into the embedding and the head written separately (untied); ``clock`` mode is refused.

:func:`to_hf_parts` gives the parts in memory (config, tensors, tokenizer.json, tokenizer config:
what a GGUF writer needs); :func:`save_hf` writes the folder that ``AutoModelForCausalLM`` and
``AutoTokenizer`` read offline without this package.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from sab_byon_omni.config import ModelConfig
from sab_byon_omni.data.pretrained_tokenizer import SPECIAL_TOKENS_MAP, SPECIALS, TOKENIZER_CONFIG, TOKENIZER_JSON
from sab_byon_omni.data.tokenizers import Tokenizer
from sab_byon_omni.errors import SabError
from sab_byon_omni.files.atomic import atomic_directory
from sab_byon_omni.interop.hf_families import ARCHITECTURES, LAYOUTS, check_representable, hf_config
from sab_byon_omni.interop.hf_neox import model_card, qkv_to_neox
from sab_byon_omni.interop.hf_tokenizer import hf_tokenizer_files
from sab_byon_omni.model.transformer import CausalTransformer

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
EXPORT_TAG = ("sab_byon_omni", "transformers export")  # in model.safetensors' metadata: what --force may replace
EXPORT_FILES = frozenset({"config.json", WEIGHTS, TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP,
                          "generation_config.json", "README.md"})
RUN_FILES = (".lock", "config.yaml", "metrics.jsonl", "checkpoints")  # a run folder's own (also any *.pt)


def export_family(cfg: ModelConfig) -> str:
    """The transformers family a model is written as: its own, GPT-NeoX for the SAB model."""
    return "gpt_neox" if cfg.family == "sab" else cfg.family


def _row_blocks(cfg: ModelConfig, mine: str, n: int) -> list[int]:
    """How our fused rows split into the family's ``n`` matrices."""
    if mine == "attn.qkv" and n == 3:
        return [cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim]
    return [cfg.ffn] * n


@torch.no_grad()
def theirs_from_ours(model: CausalTransformer, family: str, untie: bool) -> dict[str, torch.Tensor]:
    """The family's tensors (CPU, contiguous, no shared storage) for ``model``: fused rows split,
    Conv1D transposed, NeoX's rows per head, zero biases the architecture always has, the
    fragmergent factor in the embedding (``untie``: the head written on its own)."""
    cfg, layout, state = model.cfg, LAYOUTS[family], model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for i in range(cfg.n_layers):
        for mine, theirs, how in layout.layer:
            names = (theirs,) if isinstance(theirs, str) else theirs
            for kind in ("weight", "bias"):
                t = state.get(f"blocks.{i}.{mine}.{kind}")
                if t is None and kind == "bias" and mine in layout.biases:
                    t = state[f"blocks.{i}.{mine}.weight"].new_zeros(state[f"blocks.{i}.{mine}.weight"].shape[0])
                if t is None:
                    continue
                t = qkv_to_neox(t, cfg.n_heads) if how == "neox" else t
                parts = t.split(_row_blocks(cfg, mine, len(names))) if len(names) > 1 else (t,)
                for name, part in zip(names, parts):
                    out[layout.prefix.format(i=i) + f"{name}.{kind}"] = part.t() if how == "T" and kind == "weight" \
                        else part
    for mine, theirs in layout.top:
        for kind in ("weight", "bias"):
            t = state.get(f"{mine}.{kind}")
            if t is None and kind == "bias" and mine in layout.biases:
                t = torch.zeros_like(state[f"{mine}.weight"])
            if t is not None:
                out[f"{theirs}.{kind}"] = t
    # the fragmergent factor folded in: exactly the product the forward computes, in any dtype
    out[layout.top[0][1] + ".weight"] = model.fragmergent(model.embed.weight)
    if untie:
        out[f"{layout.head}.weight"] = model.head.weight
    seen: set[int] = set()  # safetensors refuses shared storage (a split's views, an unchanged tied embedding)
    for k, v in out.items():
        v = v.detach().cpu().contiguous()
        out[k] = v.clone() if v.untyped_storage().data_ptr() in seen else v
        seen.add(out[k].untyped_storage().data_ptr())
    return out


def tokenizer_parts(tokenizer: Tokenizer, max_len: int) -> tuple[str, dict[str, Any]]:
    """``tokenizer.json`` text and ``tokenizer_config.json`` of a tokenizer: a pretrained one as it
    came (read by ``PreTrainedTokenizerFast``: the file's own pipeline and post processor, so the
    same ids as ours), or one of ours (:func:`~sab_byon_omni.interop.hf_tokenizer.hf_tokenizer_files`)."""
    if tokenizer.name != "hf":
        files = hf_tokenizer_files(tokenizer, max_len)
        return files[TOKENIZER_JSON], json.loads(files[TOKENIZER_CONFIG])
    spec = tokenizer.to_spec()
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **{f"{k}_token": spec[f"{k}_token"] for k in SPECIALS},
              "model_max_length": max_len, "clean_up_tokenization_spaces": spec["clean_up"],
              "split_special_tokens": spec["split_special_tokens"]}
    if spec["chat_template"] is not None:
        config["chat_template"] = spec["chat_template"]
    return spec["json"], config


def _ids(tokenizer: Tokenizer) -> dict[str, Any]:
    """bos/eos/pad ids for config.json (a pretrained tokenizer's pad only where it names one)."""
    named = getattr(tokenizer, "ids", {"bos": None, "pad": tokenizer.pad_id})
    return {"bos": named["bos"], "eos": tokenizer.eos_id, "pad": named["pad"]}


def to_hf_parts(model: CausalTransformer, tokenizer: Tokenizer) -> tuple[dict[str, Any], dict[str, torch.Tensor],
                                                                          str, dict[str, Any]]:
    """(``config.json``, tensors by their transformers names, ``tokenizer.json`` text, ``tokenizer_config.json``)
    of ``model`` in its family's architecture (see the module doc); a SabError if it has no exact form."""
    if not isinstance(model, CausalTransformer):
        raise SabError(f"the export needs a CausalTransformer, got {type(model).__name__}")
    cfg, family = model.cfg, export_family(model.cfg)
    if cfg.fragmergent_mode == "clock":
        raise SabError("model.fragmergent_mode=clock scales the embedding by a factor that follows wall time, so no "
                       "fixed weights represent it; set fragmergent_mode to step, fixed or off before exporting")
    if tokenizer.vocab_size > cfg.vocab_size:
        raise SabError(f"the {tokenizer.name} tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary "
                       f"is {cfg.vocab_size}; export the tokenizer the model was trained with")
    check_representable(cfg, family)
    # the SAB export keeps one layout (an untied head, always); a factor other than 1 unties any model
    untie = cfg.family == "sab" or not cfg.tie_embeddings or cfg.fragmergent_mode != "off"
    dtype = str(model.embed.weight.dtype).removeprefix("torch.")
    config = hf_config(dataclasses.replace(cfg, tie_embeddings=not untie), family, dtype, _ids(tokenizer))
    text, tok_config = tokenizer_parts(tokenizer, cfg.max_seq_len)
    return config, theirs_from_ours(model, family, untie), text, tok_config


def family_card(model: CausalTransformer, tokenizer: Tokenizer, architecture: str) -> str:
    cfg = model.cfg
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags:
- {export_family(cfg)}
- sab-byon-omni
---

# {cfg.family} model, from sab-byon-omni

A `{architecture}` (hidden {cfg.hidden}, {cfg.n_layers} layers, {cfg.n_heads} heads, {cfg.kv_heads} key/value
heads, FFN {cfg.ffn}, vocabulary {cfg.vocab_size}, context {cfg.max_seq_len}) written by sab-byon-omni with the
same weights and the same logits as its model. The tokenizer is `{tokenizer.name}`; decode with
`skip_special_tokens=True` for the text sab-byon-omni returns. No `trust_remote_code` is needed.
"""


def save_hf(model: CausalTransformer, tokenizer: Tokenizer, directory: str | Path, overwrite: bool = False) -> Path:
    """Write ``model`` and ``tokenizer`` as a transformers folder of the model's family (a SAB model
    as GPT-NeoX): ``config.json``, ``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json``
    (with the chat template), ``special_tokens_map.json``, ``generation_config.json`` and a
    ``README.md``. An existing ``directory`` is replaced only with ``overwrite``; the write is atomic."""
    from safetensors.torch import save_file

    config, tensors, text, tok_config = to_hf_parts(model, tokenizer)
    special = {k: v for k, v in tok_config.items() if k.endswith("_token") and v is not None}
    ids = _ids(tokenizer)
    texts = {"config.json": config, TOKENIZER_CONFIG: tok_config, SPECIAL_TOKENS_MAP: special,
             "generation_config.json": {f"{k}_token_id": ids[k] for k in ("bos", "eos", "pad")}}
    architecture = ARCHITECTURES[export_family(model.cfg)]
    card = model_card(model, tokenizer) if model.cfg.family == "sab" else family_card(model, tokenizer, architecture)
    out = Path(directory)
    if overwrite:
        check_replaceable(out)
    with atomic_directory(out, what="transformers export", overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt", EXPORT_TAG[0]: EXPORT_TAG[1]})
        for name, data in texts.items():
            (tmp / name).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        (tmp / TOKENIZER_JSON).write_text(text, encoding="utf-8")
        (tmp / "README.md").write_text(card, encoding="utf-8")
    log.info("exported %s as a %s with the %s tokenizer", out, architecture, tokenizer.name)
    return out


def _is_our_export(d: Path, names: list[str]) -> bool:
    if not set(names) <= EXPORT_FILES or WEIGHTS not in names or (d / WEIGHTS).is_symlink():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(d / WEIGHTS), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # not a safetensors file at all: not ours
        return False
    return meta.get(EXPORT_TAG[0]) == EXPORT_TAG[1]


def is_export_file(p: Path) -> bool:
    """Whether the file ``p`` is one ``sab-omni export`` wrote: a safetensors file with the export's
    header tag, a GGUF with ``interop.gguf.GGUF_TAG``, or a checkpoint it wrote (the model alone: no optimizer
    state, an ``imported_from`` record). Anything else, or unreadable, is not."""
    suffix = p.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors import safe_open

            from sab_byon_omni.files.checkpoint import FORMAT as EXPORT_FORMAT  # sources.EXPORT_FORMAT

            with safe_open(str(p), framework="pt") as f:
                return (f.metadata() or {}).get("format") == EXPORT_FORMAT
        if suffix == ".gguf":
            from sab_byon_omni.files.gguf_header import read_gguf_header
            from sab_byon_omni.interop.gguf import GGUF_TAG, block_sizes

            return read_gguf_header(p, block_sizes()).metadata.get(GGUF_TAG[0]) == GGUF_TAG[1]
        if suffix == ".pt":
            from sab_byon_omni.files.checkpoint import load_checkpoint

            ck = load_checkpoint(p, mmap=True, verify_tensors=False)
            return "imported_from" in ck and "optimizer_state_dict" not in ck
    except Exception:  # not a file of that kind at all: not ours
        return False
    return False


def check_replaceable(out: str | Path, source: str | Path | None = None) -> None:
    """Refuse to replace ``out`` (``--force``) unless it is a link (replaced itself), an empty
    folder, a file that ``sab-omni export`` wrote (:func:`is_export_file`) or a transformers export
    this project wrote (its files only, tagged in its weights' metadata). Never a folder holding a
    run, the input ``source``, the current folder, or any other file or folder of the user's."""
    out = Path(out)
    if out.is_symlink() or not os.path.lexists(out):
        return
    if not out.is_dir():
        if not is_export_file(out):
            raise SabError(f"-o {out} is a file that sab-omni export did not write; --force replaces only an "
                           "earlier export: remove it yourself or choose another path")
        return
    here, where = Path.cwd().resolve(), out.resolve()
    if here == where or where in here.parents:
        raise SabError(f"-o {out} is the current folder (or holds it); choose a new folder for the export")
    if source is not None and where in Path(source).resolve().parents:
        raise SabError(f"-o {out} holds the input {source}; --force never replaces it: choose another folder")
    try:
        names = sorted(p.name for p in out.iterdir())
    except OSError as e:
        raise SabError(f"cannot read {out}: {e.strerror or e}") from None
    run = next((n for n in names if n in RUN_FILES or n.endswith(".pt")), None)
    if run is not None:
        raise SabError(f"-o {out} holds a training run ({run}); --force never replaces it: choose another folder")
    if names and not _is_our_export(out, names):
        other = next((n for n in names if n not in EXPORT_FILES), names[0])
        raise SabError(f"-o {out} is a folder that is not a sab-byon-omni export (it holds {other[:80]!r}); "
                       "--force replaces only an earlier export: remove it yourself or choose another folder")
