"""Where a trained model can come from, read into one shape (config, tokenizer, weights).

Every command that takes a model (``generate``, ``eval``, ``export``, ``train --init_from``)
accepts the same sources:

* a training checkpoint (``.pt``), written by ``sab-omni train``;
* a sharded FSDP checkpoint (a ``.dcp`` folder);
* a ``.safetensors`` file written by ``sab-omni export`` (config and tokenizer in its header);
* a folder written by ``save_pretrained`` (or its ``model.safetensors``), read by the facade;
* a transformers folder: one written by ``sab-omni export --format hf``, or a Llama-family (Llama
  2/3, SmolLM, Qwen2, TinyLlama, Mistral without sliding window), GPT-2 or GPT-NeoX/Pythia model
  (safetensors weights; :mod:`~sab_byon_omni.interop.hf_import`);
* a GGUF file (llama.cpp's format: ``.gguf``, or any file that starts with its magic), or a
  folder holding exactly one, such as a Hub snapshot of a GGUF repository (see ``interop.gguf``);
* a Hub id ``user/name`` that is already in the local Hugging Face cache: nothing is downloaded.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from sab_byon_omni.config import RunConfig, build_config
from sab_byon_omni.data.tokenizers import Tokenizer, from_spec
from sab_byon_omni.errors import SabError, bounded, first_line
from sab_byon_omni.files import dcp
from sab_byon_omni.files.checkpoint import COPY_ADVICE, FORMAT, check_tensors, load_checkpoint
from sab_byon_omni.files.paths import looks_local
from sab_byon_omni.files.untrusted import MAX_JSON_BYTES, MAX_STEP, parse_json
from sab_byon_omni.interop.weights import Weights

EXPORT_FORMAT = FORMAT  # the header tag of a file written by `sab-omni export`: the checkpoint format's
PRETRAINED_FORMAT = "sab-byon-omni-pretrained/1"  # config.json of a save_pretrained folder
GGUF_MAGIC = b"GGUF"
RUN_FOLDER_CHECKPOINT = re.compile(r"^(step|epoch)_\d+\.(pt|dcp)$")  # the names sab-omni train writes
log = logging.getLogger(__name__)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")
_DIGITS = re.compile(r"[0-9]{1,%d}" % len(str(MAX_STEP)))  # ASCII digits: str.isdigit() accepts "²", which int() refuses


def is_pretrained_folder(d: Path) -> bool:
    """A folder written by ``save_pretrained``: its config.json carries our format tag."""
    cfg = d / "config.json"
    if not cfg.is_file() or cfg.stat().st_size > MAX_JSON_BYTES:
        return False
    try:
        raw = parse_json(cfg.read_bytes(), str(cfg))
    except (SabError, OSError):
        return False
    return isinstance(raw, dict) and raw.get("format") == PRETRAINED_FORMAT


def locate(source: str | Path) -> Path:
    """The local path of ``source``: itself, or a Hub id's snapshot in the local cache."""
    p = Path(source).expanduser()
    if p.exists():
        return p
    text = str(source)
    if _HUB_ID.match(text) and not looks_local(text):
        try:
            from huggingface_hub import snapshot_download

            # the cache folder as the environment says now (huggingface_hub reads it once, at import)
            return Path(snapshot_download(text, local_files_only=True, cache_dir=os.environ.get("HF_HUB_CACHE")))
        except Exception as e:  # not in the cache (LocalEntryNotFoundError), or a malformed id
            raise SabError(f"{text}: not found as a file or folder, nor in the local Hugging Face cache "
                           f"(nothing is downloaded; fetch it first, e.g. `hf download {text}`; "
                           f"{type(e).__name__})") from None
    raise SabError(f"checkpoint not found: {text[:200]} (looked for a checkpoint .pt, a .safetensors or .gguf file, "
                   "a folder written by save_pretrained or `sab-omni export`, or a Hub id user/name in the local "
                   "cache)")


def gguf_file(p: Path) -> Path | None:
    """The GGUF file that ``p`` names: ``p`` itself if it is one (by its name or its first bytes),
    the one ``.gguf`` file of a folder that holds no other model, else None."""
    if p.is_dir():
        if (p / "config.json").is_file() or (p / dcp.META).is_file():
            return None
        found = sorted(f for f in p.glob("*.gguf") if f.is_file())
        if len(found) > 1:
            raise SabError(f"{p}: a folder of {len(found)} GGUF files ({bounded([f.name for f in found])}); "
                           "pass the one to use")
        return found[0] if found else None
    if p.suffix == ".gguf":
        return p
    if not p.is_file():  # a pipe is never opened to look: it would wait for a writer
        return None
    try:
        with open(p, "rb") as f:
            return p if f.read(4) == GGUF_MAGIC else None
    except OSError:
        return None


def read_gguf_weights(p: Path) -> Weights:
    """The model in a GGUF file, through the transformers-shaped form of ``interop.gguf``."""
    from sab_byon_omni.interop.gguf import read_gguf

    from sab_byon_omni.interop.hf import from_hf_parts

    weights = from_hf_parts(*read_gguf(p), source=str(p))
    weights.origin = f"GGUF file {p}"
    return weights


def read_weights(p: Path) -> Weights:
    """The parts of the model at ``p`` (not a save_pretrained folder: the facade reads those)."""
    gguf = gguf_file(p)
    if gguf is not None:
        return read_gguf_weights(gguf)
    if p.is_dir():
        if (p / "config.json").is_file():
            from sab_byon_omni.interop.hf_import import read_hf_folder

            return read_hf_folder(p)
        if (p / dcp.META).is_file():
            return _read_sharded(p)
        chosen = run_folder_checkpoint(p)
        if chosen is not None:
            return read_weights(chosen)
        raise SabError(f"{p}: a folder, but neither a saved model (config.json), a sharded checkpoint (meta.pt) nor "
                       "a GGUF file")
    if p.suffix == ".safetensors":
        return read_exported_safetensors(p)
    ck = load_checkpoint(p, advice=COPY_ADVICE)  # a model to use: a damaged file asks for another copy
    cfg, tokenizer = _config_and_tokenizer(ck["config"], ck.get("tokenizer"), str(p))
    return Weights(cfg, tokenizer, ck["model_state_dict"], ck["epoch"], ck["global_step"], f"checkpoint {p}")


def run_folder_checkpoint(p: Path) -> Path | None:
    """The checkpoint to use from a run folder that ``sab-omni train`` wrote (logged, naming it): its
    ``best_model`` (the best validation loss), else its newest step or epoch checkpoint; None for a
    folder that holds neither."""
    for name in ("best_model.pt", "best_model.dcp"):
        if (p / name).exists():
            log.info("%s is a run folder: using %s (its best validation loss)", p, p / name)
            return p / name
    found = [f for f in p.iterdir() if RUN_FOLDER_CHECKPOINT.match(f.name)]
    if not found:
        return None
    newest = max(found, key=lambda f: (f.stat().st_mtime_ns, f.name))
    log.info("%s is a run folder without best_model.pt (no validation yet): using its newest checkpoint %s", p,
             newest)
    return newest


def _config_and_tokenizer(raw_cfg: Any, spec: Any, source: str) -> tuple[RunConfig, Tokenizer]:
    try:
        cfg = build_config(raw_cfg, source=source)
    except SabError as e:
        raise SabError(f"{source}: bad config inside: {e}") from None
    tokenizer = from_spec(spec) if spec is not None else from_spec({"name": cfg.data.tokenizer})
    return cfg, tokenizer


def _read_sharded(p: Path) -> Weights:
    from sab_byon_omni.model.transformer import CausalTransformer

    meta = dcp.read_meta(p, advice=COPY_ADVICE)
    cfg, tokenizer = _config_and_tokenizer(meta["config"], meta.get("tokenizer"), f"{p}/{dcp.META}")
    model = CausalTransformer(cfg.model)
    dcp.load(p, model, None, no_dist=True, advice=COPY_ADVICE)
    return Weights(cfg, tokenizer, model.state_dict(), meta["epoch"], meta["global_step"], f"sharded checkpoint {p}")


def read_exported_safetensors(p: Path) -> Weights:
    """A file written by ``sab-omni export``: tensors, and the run's config and tokenizer in its header."""
    from safetensors import safe_open

    if not p.is_file():  # a pipe or a device would never end
        raise SabError(f"{p}: not found, or not a regular file")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError for damaged headers
        raise SabError(f"{p}: not a readable safetensors file: {first_line(e)}") from None
    if meta.get("format") != EXPORT_FORMAT or "config" not in meta or "tokenizer" not in meta:
        raise SabError(f"{p}: has no sab-byon-omni metadata (config, tokenizer): was it written by "
                       "'sab-omni export'?")
    raw_cfg = parse_json(meta["config"], f"{p} (config)")
    spec = parse_json(meta["tokenizer"], f"{p} (tokenizer)")
    epoch, step = (_count(meta.get(k, "0"), k, p) for k in ("epoch", "global_step"))
    check_tensors(state, str(p))
    cfg, tokenizer = _config_and_tokenizer(raw_cfg, spec, str(p))
    if cfg.model.tie_embeddings and "head.weight" not in state and "embed.weight" in state:
        state["head.weight"] = state["embed.weight"]  # stored once (safetensors refuses shared tensors)
    return Weights(cfg, tokenizer, state, epoch, step, f"safetensors file {p}")


def check_safetensors_header(p: Path) -> None:
    """Refuse a safetensors file holding complex tensors, from its header alone (before a loader
    copies them into real weights, dropping the imaginary part): the header-only counterpart of
    :func:`~sab_byon_omni.files.checkpoint.check_tensors` (safetensors holds only dense tensors)."""
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt") as f:
            kinds = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError for damaged headers
        raise SabError(f"{p}: not a readable safetensors file: {first_line(e)}") from None
    for name, kind in kinds.items():
        if str(kind).upper().startswith("C"):
            raise SabError(f"{p}: refused to load: {bounded(name)} is a complex tensor ({kind}: the weights are "
                           "real; a damaged or hostile file?)")


def _count(value: Any, name: str, p: Path) -> int:
    text = str(value)
    if not _DIGITS.fullmatch(text) or int(text) > MAX_STEP:
        raise SabError(f"{p}: damaged metadata: {name}={bounded(value)} is not a step count")
    return int(text)


def model_config_of(source: str | Path) -> tuple[Any, str]:
    """(the model config, what it is) of ``source``, read without its weights where the format
    allows: a GGUF's header, a transformers folder's ``config.json``, a checkpoint mapped rather than
    read, a .safetensors file's header; anything else (a sharded checkpoint) is loaded."""
    from sab_byon_omni.config import ModelConfig
    from sab_byon_omni.interop.hf_families import model_fields

    p = locate(source)
    gguf = gguf_file(p)
    if gguf is not None:
        from sab_byon_omni.files.gguf_header import read_gguf_header
        from sab_byon_omni.interop.gguf import _arch, _config, block_sizes

        header = read_gguf_header(gguf, block_sizes())
        arch = _arch(header.metadata, str(gguf))
        config = _config(header.metadata, arch, next((t for t in header.tensors if t.name == "token_embd.weight"),
                                                     None), str(gguf))
        config["tie_word_embeddings"] = not any(t.name == "output.weight" for t in header.tensors)
        return ModelConfig(**model_fields(config, str(gguf))), f"GGUF file {gguf} (its header)"
    if p.is_dir() and (p / "config.json").is_file():
        raw = parse_json((p / "config.json").read_bytes(), str(p / "config.json"))
        if is_pretrained_folder(p):  # save_pretrained's: the run's config, under our format tag
            cfg = build_config({k: v for k, v in raw.items() if k in ("model", "data", "train")},
                               source=str(p / "config.json"))
            return cfg.model, f"saved model {p} (its config.json)"
        return ModelConfig(**model_fields(raw, str(p))), f"transformers folder {p} (its config.json)"
    if p.is_file() and p.suffix == ".safetensors":
        check_safetensors_header(p)
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") == EXPORT_FORMAT and "config" in meta and "tokenizer" in meta:
            cfg, _ = _config_and_tokenizer(parse_json(meta["config"], f"{p} (config)"),
                                           parse_json(meta["tokenizer"], f"{p} (tokenizer)"), str(p))
            return cfg.model, f"safetensors file {p} (its header)"
    if p.is_file() and p.suffix != ".safetensors":  # (a GGUF returned above)
        ck = load_checkpoint(p, mmap=True, verify_tensors=False, advice=COPY_ADVICE)
        cfg, _ = _config_and_tokenizer(ck["config"], ck.get("tokenizer"), str(p))
        return cfg.model, f"checkpoint {p}"
    weights = read_weights(p)  # a sharded checkpoint or a run folder: read as a model is
    return weights.config.model, str(weights.origin)
