"""A transformers model folder (or the same parts from elsewhere: a GGUF file) read into our
model: ``config.json`` to our config (:mod:`~sab_byon_omni.interop.hf_families`), the tensors to
our names, the model's own tokenizer with its special tokens and chat template.

Only JSON and safetensors are read, never a pickle (``pytorch_model.bin``) and never code
(``trust_remote_code``). What our model cannot compute exactly is refused with one line naming it:
an unknown ``model_type``, quantised weights, sliding-window attention, a rope scaling we do not
compute, an activation or option of the family we do not have.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from sab_byon_omni.config import ModelConfig, build_config
from sab_byon_omni.data.pretrained_tokenizer import TOKENIZER_JSON, HFTokenizer, folder_parts
from sab_byon_omni.errors import SabError, bounded, first_line
from sab_byon_omni.files.checkpoint import check_tensors
from sab_byon_omni.files.untrusted import read_json
from sab_byon_omni.interop.hf_families import LAYOUTS, Layout, model_fields
from sab_byon_omni.interop.hf_neox import as_sab, qkv_from_neox
from sab_byon_omni.interop.weights import Weights
from sab_byon_omni.model.transformer import CausalTransformer

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
_SHARD = re.compile(r"^[\w.-]{1,200}\.safetensors$")  # a shard named by an index: a plain file of the folder
EVAL_SEQ_LEN = 2048  # the imported run's data.seq_len (eval's default window): the context, at most this


# ------------------------------------------------------------------------------------- tensors
def _shard_files(d: Path) -> list[Path]:
    """The shards ``model.safetensors.index.json`` names: plain ``*.safetensors`` names inside ``d``
    (never a path elsewhere: ``../../etc/passwd``, an absolute path), each a regular file."""
    index_path = d / WEIGHTS_INDEX
    index = read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise SabError(f"{index_path}: no weight_map (a mapping of tensor names to shard files) in it")
    names = set()
    for tensor, name in weight_map.items():
        if not isinstance(name, str) or not _SHARD.match(name):
            raise SabError(f"{index_path}: refused: {bounded(tensor)} is in the shard {bounded(name)}, which is not "
                           "a *.safetensors file of the folder")
        names.add(name)
    files = [d / name for name in sorted(names)]
    for f in files:
        if not f.is_file():  # follows links (the Hugging Face cache links its blobs): a device or pipe is refused
            raise SabError(f"{index_path}: its shard {f.name} is missing or not a regular file")
    return files


def load_tensors(d: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's ``model.safetensors`` (or its shards); a folder with only pickled
    weights is refused."""
    from safetensors.torch import load_file

    if (d / WEIGHTS).is_file():
        files = [d / WEIGHTS]
    elif (d / WEIGHTS_INDEX).is_file():
        files = _shard_files(d)
    else:
        found = sorted(p.name for p in d.glob("*.bin"))[:2] or sorted(p.name for p in d.glob("*.pt*"))[:2]
        raise SabError(f"{d}: no {WEIGHTS}" + (f" ({', '.join(found)} is a pickle, which is never read)" if found
                                                  else "") + "; re-save it with transformers' save_pretrained "
                       "(safe_serialization), or pick a repository that ships safetensors")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            tensors.update(load_file(str(f)))
        except Exception as e:  # a missing shard, a damaged header: safetensors raises its own types
            raise SabError(f"{f}: cannot read the weights: {first_line(e)}") from None
    check_tensors(tensors, str(d))
    return tensors


def _pop(tensors: dict[str, torch.Tensor], name: str, source: str, zeros: int | None = None) -> torch.Tensor:
    """The tensor ``name``, taken out of ``tensors``; ``zeros``: the size of the zero bias that stands
    in for it when the file leaves it out."""
    t = tensors.pop(name, None)
    if t is None and zeros is not None:
        return torch.zeros(zeros)
    if t is None:
        raise SabError(f"{source}: the weights have no {name}")
    if not t.is_floating_point():
        raise SabError(f"{source}: {name} is {str(t.dtype).removeprefix('torch.')}: quantized weights are not "
                       "supported (use the unquantized model)")
    return t


def _layer_tensor(tensors: dict[str, torch.Tensor], names: tuple[str, ...], kind: str, how: str, cfg: ModelConfig,
                  source: str, zero_rows: int | None) -> torch.Tensor:
    zeros = zero_rows // len(names) if zero_rows is not None else None
    parts = [_pop(tensors, f"{n}.{kind}", source, zeros) for n in names]
    if how == "T" and kind == "weight":  # GPT-2's Conv1D keeps (in, out)
        parts = [p.t() for p in parts]
    t = torch.cat(parts, 0) if len(parts) > 1 else parts[0]
    return qkv_from_neox(t, cfg.n_heads) if how == "neox" else t


def ours_from_theirs(tensors: dict[str, torch.Tensor], cfg: ModelConfig, layout: Layout, source: str,
                     missing_biases: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """Our state dict from a family's tensors (names of ``layout``): fused rows joined, Conv1D
    transposed, NeoX's per-head rows reordered, every shape checked; ``missing_biases``: our
    modules whose bias the file may leave out (zeros: GPT-NeoX with ``attention_bias`` false)."""
    named = {}
    for k, v in tensors.items():
        if not k.endswith(layout.ignored):  # buffers some checkpoints carry (causal masks, rotary tables)
            named[k if not layout.strip or k.startswith((*layout.strip, layout.head + ".")) else layout.strip[0] + k] = v
    tensors = named
    with torch.device("meta"):
        want = {k: tuple(t.shape) for k, t in CausalTransformer(cfg).state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for i in range(cfg.n_layers):
        for mine, theirs, how in layout.layer:
            names = tuple(layout.prefix.format(i=i) + n for n in ((theirs,) if isinstance(theirs, str) else theirs))
            for kind in ("weight", "bias"):
                key = f"blocks.{i}.{mine}.{kind}"
                if key in want:
                    rows = want[key][0] if kind == "bias" and mine in missing_biases else None
                    out[key] = _layer_tensor(tensors, names, kind, how, cfg, source, rows)
    for mine, theirs in layout.top:
        for kind in ("weight", "bias"):
            if f"{mine}.{kind}" in want:
                out[f"{mine}.{kind}"] = _pop(tensors, f"{theirs}.{kind}", source)
    head = tensors.pop(f"{layout.head}.weight", None)
    head = tensors.pop("lm_head.weight", None) if head is None else head  # NeoX's embed_out, re-saved by some tools
    if cfg.tie_embeddings:  # as transformers: a tied head is the embedding, whatever the file also holds
        out["head.weight"] = out["embed.weight"]
    elif head is None:
        raise SabError(f"{source}: the weights have no {layout.head}.weight and tie_word_embeddings is false")
    else:
        out["head.weight"] = head
    if tensors:
        raise SabError(f"{source}: unexpected tensors for a {cfg.family} model: {bounded(sorted(tensors)[:5])}")
    for key, t in out.items():
        if tuple(t.shape) != want[key]:
            raise SabError(f"{source}: {key} would have shape {tuple(t.shape)}, but config.json makes it {want[key]}")
    out = {k: (t if k == "head.weight" and t is out["embed.weight"] else t.contiguous()) for k, t in out.items()}
    out["fragmergent.step"] = torch.zeros((), dtype=torch.float32)
    return out


# --------------------------------------------------------------------------------------- parts
def from_hf_parts(config: dict[str, Any], tensors: dict[str, torch.Tensor], tokenizer_json: str,
                  tokenizer_config: dict[str, Any], source: str) -> Weights:
    """Our model's parts from a transformers model's: its ``config.json`` (a dict), its tensors by
    their transformers names, its ``tokenizer.json`` text and its ``tokenizer_config.json`` (with
    ``special_tokens_map.json`` and ``chat_template`` merged in). The folder reader calls this; so
    may any other reader that produces the same parts (GGUF)."""
    fields = model_fields(config, f"{source} (config.json)")
    cfg = ModelConfig(**fields)
    missing = frozenset({"attn.qkv", "attn.proj"}) if fields["family"] == "gpt_neox" and \
        config.get("attention_bias") is False else frozenset()
    state = ours_from_theirs(dict(tensors), cfg, LAYOUTS[cfg.family], source, missing)
    sab = as_sab(fields, state, tokenizer_json, config, source) if cfg.family == "gpt_neox" else None
    if sab is not None:
        fields, state, tokenizer = sab
        if isinstance(tokenizer_config.get("chat_template"), str):  # the template it was trained with, kept
            tokenizer.chat_template = tokenizer_config["chat_template"]  # type: ignore[attr-defined]
    else:
        tokenizer = HFTokenizer.from_parts(tokenizer_json, tokenizer_config, config, f"{source} ({TOKENIZER_JSON})")
    if tokenizer.vocab_size > fields["vocab_size"]:
        raise SabError(f"{source}: its tokenizer has {tokenizer.vocab_size:,} ids but the model's vocab_size is "
                       f"{fields['vocab_size']:,}")
    run = build_config({"model": fields, "data": {"tokenizer": tokenizer.name,
                                                  "seq_len": min(fields["max_seq_len"], EVAL_SEQ_LEN)}},
                       source=f"{source} (config.json)")
    kind = "SAB model exported as GPT-NeoX" if sab is not None else f"{config.get('model_type')} model"
    return Weights(run, tokenizer, state, origin=f"transformers folder {source} ({kind})")


def tokenizer_parts(d: Path) -> tuple[str, dict[str, Any]]:
    """A folder's ``tokenizer.json`` text and its merged tokenizer config (see ``folder_parts``)."""
    return folder_parts(d, f"{d}: no {TOKENIZER_JSON} (the model's tokenizer is needed; a folder with only a "
                           "sentencepiece tokenizer.model can be re-saved with transformers' AutoTokenizer)")


def read_hf_folder(directory: str | Path) -> Weights:
    """A transformers model folder (``config.json``, safetensors weights, ``tokenizer.json``...)
    as our model's parts; see :func:`from_hf_parts`."""
    d = Path(directory)
    if not (d / CONFIG).is_file():
        raise SabError(f"{d}: no {CONFIG}: not a transformers model folder")
    config = read_json(d / CONFIG)
    model_fields(config, str(d / CONFIG))  # an unsupported model is refused before its weights are read
    text, tok_config = tokenizer_parts(d)
    return from_hf_parts(config, load_tensors(d), text, tok_config, str(d))
