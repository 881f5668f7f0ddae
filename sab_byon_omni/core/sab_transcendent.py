"""``SABTranscendentV2``: the guide's entry object, a model + tokenizer + config.

It holds things together and samples; training lives in :mod:`sab_byon_omni.training`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCard, ModelHubMixin

from sab_byon_omni.config import SECTIONS, RunConfig, build_config, load_config, replace
from sab_byon_omni.data.tokenizers import Tokenizer, build_tokenizer, from_spec
from sab_byon_omni.device import intra_op_threads, make_precision
from sab_byon_omni.errors import SabError, bounded, first_line
from sab_byon_omni.files.untrusted import read_json
from sab_byon_omni.interop.sources import (
    PRETRAINED_FORMAT,
    Weights,
    check_safetensors_header,
    is_pretrained_folder,
    locate,
    read_weights,
)
from sab_byon_omni.model.generate import decoding_threads, generate_tokens
from sab_byon_omni.model.lora import merged_state_dict
from sab_byon_omni.model.transformer import CausalTransformer

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "sab_tokenizer.json"


class SABTranscendentV2(ModelHubMixin, library_name="sab-byon-omni", tags=["causal-lm", "sab-byon-omni"]):
    """A causal language model with its tokenizer and configuration.

    ``SABTranscendentV2()`` builds the Lightweight preset with the char96 tokenizer;
    ``SABTranscendentV2(preset="3b")`` the (really ~7.5B-parameter) "3b" preset;
    ``SABTranscendentV2(config=...)`` takes a :class:`RunConfig`, a mapping or a YAML path.

    Sharing: :meth:`save_pretrained` writes a directory with ``model.safetensors`` (tied weights
    stored once), ``config.json`` (the run config) and ``sab_tokenizer.json`` (the tokenizer spec);
    :meth:`from_pretrained` rebuilds the object from such a directory or a Hugging Face Hub repo
    without unpickling anything; ``push_to_hub("user/name")`` uploads it (needs ``hf auth login``).
    These come from ``huggingface_hub.ModelHubMixin``. Its PyTorch flavour
    (``PyTorchModelHubMixin``) does not fit: it expects the class to *be* the ``nn.Module`` (this
    object holds a module *and* a tokenizer), rebuilds the object from flat JSON init arguments
    (our config is nested dataclasses), loads weights non-strictly by default and may fall back to a
    pickled ``pytorch_model.bin``. So the generic mixin is used with our own ``_save_pretrained`` /
    ``_from_pretrained``: strict safetensors loading, typed config validation, a model card
    written without Jinja.
    """

    def __init__(self, preset: str | None = None, config: RunConfig | dict | str | Path | None = None,
                 tokenizer: Tokenizer | None = None, device: str | torch.device | None = None,
                 seed: int | None = None) -> None:
        if isinstance(config, (str, Path)):
            cfg = load_config(config)
        elif isinstance(config, dict):
            cfg = build_config(config)
        elif isinstance(config, RunConfig):
            cfg = config
        elif config is None:
            cfg = RunConfig()
        else:
            raise SabError(f"config must be a RunConfig, a mapping or a YAML path, not {type(config).__name__}")
        if preset is not None:
            cfg = replace(cfg, **{"model.preset": preset})
        if tokenizer is None:
            tokenizer = build_tokenizer(cfg.data)
        if cfg.model.vocab_size is None:
            cfg = replace(cfg, **{"model.vocab_size": tokenizer.vocab_size})
        elif cfg.model.vocab_size < tokenizer.vocab_size:
            raise SabError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                           f"{tokenizer.vocab_size} ids")
        if cfg.data.seq_len > cfg.model.max_seq_len:
            cfg = replace(cfg, **{"model.max_seq_len": cfg.data.seq_len})
        torch.manual_seed(cfg.train.seed if seed is None else seed)
        self.config, self.tokenizer = cfg, tokenizer
        self.origin, self.global_step = "new model", 0  # where load() found it, and its training step
        self.last_tokens_per_second, self.last_threads = 0.0, 0  # of the last generate()
        self._printed = ""  # the text the last generate() streamed so far
        if device is not None and torch.device(device).type == "meta":  # shapes only: inspect the 3b preset anywhere
            with torch.device("meta"):
                self.model = CausalTransformer(cfg.model)
            return
        _check_weights_fit(cfg)
        self.model = CausalTransformer(cfg.model)
        if device is not None:
            self.model.to(device)

    # --------------------------------------------------------------------------- construction
    @classmethod
    def load(cls, source: str | Path, device: str | torch.device | None = None) -> "SABTranscendentV2":
        """Model, tokenizer and config from any source a command accepts: a training checkpoint
        (``.pt``), a sharded one (``.dcp``), a ``.safetensors`` file from ``sab-omni export``, a folder
        written by :meth:`save_pretrained` (or its ``model.safetensors``), a transformers folder
        (from ``sab-omni export --format hf``, or a Llama, Mistral, Qwen2, GPT-2 or GPT-NeoX model),
        a GGUF file (``.gguf``, dequantised; see ``interop.gguf``), or a Hub id in the local cache
        (never downloaded). Which one it was is in ``self.origin``."""
        p = locate(source)
        folder = p if p.is_dir() else p.parent if p.name == WEIGHTS_FILE else None
        if folder is not None and is_pretrained_folder(folder):
            self = cls.from_pretrained(folder, device=device)
            self.origin, self.global_step = f"saved model {folder}", 0
            return self
        self = cls.from_weights(read_weights(p))
        if device is not None:
            self.model.to(device)
        return self

    @classmethod
    def from_weights(cls, w: Weights) -> "SABTranscendentV2":
        """Build the model of ``w.config`` and load ``w.state_dict`` into it, strictly."""
        self = cls(config=w.config, tokenizer=w.tokenizer)
        try:
            self.model.load_state_dict(merged_state_dict(w.state_dict))  # a LoRA run's adapters folded in
        except (RuntimeError, TypeError, AttributeError, KeyError, ValueError) as e:
            raise SabError(f"{w.origin}: weights do not fit the model in its config: {first_line(e)}") from None
        self.origin, self.global_step = w.origin, w.global_step
        return self

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device | None = None) -> "SABTranscendentV2":
        """Rebuild model, tokenizer and config from one training checkpoint (any source, see :meth:`load`)."""
        return cls.load(path, device)

    # ------------------------------------------------------------------------ save and share
    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> str | None:  # type: ignore[override]
        """Write ``model.safetensors``, ``config.json``, ``sab_tokenizer.json`` and a README model card.

        A directory holding a ``config.json`` that this method did not write is refused (nothing is
        overwritten). ``push_to_hub=True, repo_id="user/name"`` also uploads it; see :meth:`push_to_hub`.
        """
        d = Path(save_directory)
        if d.exists() and not d.is_dir():
            raise SabError(f"{d} exists and is not a directory")
        existing = d / CONFIG_FILE
        if existing.is_file():
            try:
                ours = json.loads(existing.read_text(encoding="utf-8")).get("format") == PRETRAINED_FORMAT
            except (ValueError, AttributeError, OSError, UnicodeDecodeError):
                ours = False
            if not ours:
                raise SabError(f"{existing} was not written by save_pretrained; refusing to overwrite it")
        return super().save_pretrained(d, **kwargs)

    def _save_pretrained(self, save_directory: Path) -> None:
        from safetensors.torch import save_model

        cfg = replace(self.config, resume="none").to_dict()  # a shared model carries no pointer into a local run
        save_model(self.model, str(save_directory / WEIGHTS_FILE), metadata={"format": "pt"})
        (save_directory / CONFIG_FILE).write_text(json.dumps({"format": PRETRAINED_FORMAT, **cfg}, indent=2),
                                                  encoding="utf-8")
        (save_directory / TOKENIZER_FILE).write_text(json.dumps(self.tokenizer.to_spec()), encoding="utf-8")

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        m = self.config.model
        return ModelCard(
            "---\nlibrary_name: sab-byon-omni\ntags:\n- causal-lm\n- sab-byon-omni\n---\n\n"
            f"# sab-byon-omni {m.preset} model\n\n"
            f"A causal decoder ({self.num_parameters():,} parameters: hidden {m.hidden}, {m.n_layers} layers, "
            f"{m.n_heads} heads, FFN {m.ffn}, vocabulary {m.vocab_size}, tokenizer {self.tokenizer.name}).\n\n"
            "```python\nfrom sab_byon_omni.core.sab_transcendent import SABTranscendentV2\n\n"
            "sab = SABTranscendentV2.from_pretrained(\"<this repo or directory>\")\n"
            "print(sab.generate(\"Consciousness is\", max_new_tokens=80))\n```\n")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *,  # type: ignore[override]
                        device: str | torch.device | None = None, **kwargs: Any) -> "SABTranscendentV2":
        """Load from a directory written by :meth:`save_pretrained` or a Hub repo id (``"user/name"``).

        Only JSON and safetensors are read: no pickle. Weights must match the config exactly.
        ``device`` moves the model there; it is returned in eval mode.
        """
        where = str(pretrained_model_name_or_path)
        p = Path(where).expanduser()
        if p.is_dir():
            where = str(p)
            if (p / CONFIG_FILE).is_file():
                read_json(p / CONFIG_FILE)  # the mixin parses it first; fail here with a SabError
        elif p.exists() or where.startswith(("/", ".", "~")) or where.count("/") != 1:
            raise SabError(f"pretrained model directory not found: {where}")
        try:
            return super().from_pretrained(where, device=device, **kwargs)  # type: ignore[return-value]
        except SabError:
            raise
        except Exception as e:  # the hub client's errors (offline, unknown repo, auth) for a repo id
            if p.is_dir():
                raise
            raise SabError(f"{where}: cannot load from the Hub: {first_line(e)}") from None

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None = None, cache_dir: Any = None,
                         force_download: bool = False, local_files_only: bool = False, token: Any = None,
                         device: str | torch.device | None = None, **_: Any) -> "SABTranscendentV2":
        from safetensors import SafetensorError
        from safetensors.torch import load_model

        def fetch(name: str) -> Path:
            if os.path.isdir(model_id):
                path = Path(model_id) / name
                if not path.is_file():
                    raise SabError(f"{model_id}: no {name} (not a directory written by save_pretrained)")
                return path
            from huggingface_hub import hf_hub_download

            try:
                return Path(hf_hub_download(repo_id=model_id, filename=name, revision=revision, cache_dir=cache_dir,
                                            force_download=force_download, local_files_only=local_files_only,
                                            token=token))
            except Exception as e:  # network, auth, missing file: the hub client raises many types
                raise SabError(f"{model_id}: cannot get {name} from the Hub: {first_line(e)}") from None

        raw = read_json(fetch(CONFIG_FILE))
        if not isinstance(raw, dict) or raw.get("format") != PRETRAINED_FORMAT:
            raise SabError(f"{model_id}: {CONFIG_FILE} is not a sab-byon-omni config (format {PRETRAINED_FORMAT})")
        cfg = build_config({k: v for k, v in raw.items() if k in SECTIONS}, source=f"{model_id}/{CONFIG_FILE}")
        self = cls(config=cfg, tokenizer=from_spec(read_json(fetch(TOKENIZER_FILE))))
        weights = fetch(WEIGHTS_FILE)
        check_safetensors_header(weights)
        try:
            load_model(self.model, str(weights), strict=True)
        except (RuntimeError, SafetensorError, OSError) as e:
            first = first_line(e)
            raise SabError(f"{weights}: weights do not fit the model in its config: {first}") from None
        if device is not None:
            self.model.to(device)
        self.model.eval()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def num_parameters(self) -> int:
        return self.model.num_parameters()

    # ------------------------------------------------------------------------------ sampling
    def generate(self, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8, top_k: int | None = 50,
                 top_p: float | None = None, seed: int | None = None, stream: bool | Callable[[str], Any] = False,
                 use_cache: bool = True, stop_at_eos: bool = True, precision: str = "auto",
                 threads: int | None = None) -> str:
        """Sample a continuation of ``prompt`` from the model (the prompt is not repeated).

        ``stream=True`` writes text to stdout as it is produced; a callable receives each piece.
        ``precision``: as ``train.precision`` (``auto``: bf16/fp16 autocast on GPUs, bf16 on CPUs
        with AVX-512 BF16 or AMX, fp32 on other CPUs). ``threads``: torch intra-op threads while
        sampling (default on a CPU: the cores no other process is using as it starts, see
        :func:`~sab_byon_omni.model.generate.decoding_threads`; more than the cores this process may
        use is lowered to that count, with a warning; the caller's setting is restored after). The throughput and threads of the last call are in ``self.last_tokens_per_second``
        and ``self.last_threads``.
        """
        check_sampling(max_new_tokens, temperature, top_k, top_p, threads=threads)
        ids = self.tokenizer.encode(prompt)
        if not ids:
            raise SabError("the prompt is empty after tokenisation")
        if len(ids) > 8 * self.config.model.max_seq_len:
            ids = ids[-self.config.model.max_seq_len:]  # only the last max_seq_len tokens are ever seen
        sink = (lambda s: (sys.stdout.write(s), sys.stdout.flush())) if stream is True else (stream or None)
        out: list[int] = []
        t0 = time.perf_counter()
        eos = self.tokenizer.eos_id if stop_at_eos else None
        try:
            with make_precision(precision, self.device).autocast(), \
                    intra_op_threads(decoding_threads(self.device, _within_cores(threads, self.device), use_cache)):
                self.last_threads = torch.get_num_threads()
                tokens = list(self._sample(ids, max_new_tokens, temperature, top_k, top_p, seed, eos, use_cache,
                                           sink, out))
        except ValueError as e:  # non-finite logits from damaged weights
            raise SabError(f"cannot sample: {first_line(e)}") from None
        elapsed = time.perf_counter() - t0
        self.last_tokens_per_second = len(tokens) / elapsed if elapsed > 0 else 0.0
        text = self.tokenizer.decode(out)
        if sink and len(text) > len(self._printed):
            sink(text[len(self._printed):])
        return text

    def _sample(self, ids: list[int], max_new_tokens: int, temperature: float, top_k: int | None,
                top_p: float | None, seed: int | None, eos: int | None, use_cache: bool, sink: Any,
                out: list[int]) -> Any:
        """Yield new ids as they come, appending to ``out`` and streaming the text to ``sink``."""
        self._printed = ""
        for tok in generate_tokens(self.model, ids, max_new_tokens, temperature, top_k, top_p, seed, eos, use_cache):
            if tok == eos:
                return
            out.append(tok)
            yield tok
            if sink:
                text = self.tokenizer.decode(out)
                if len(text) > len(self._printed) and not text.endswith("\ufffd"):
                    sink(text[len(self._printed):])
                    self._printed = text

    def __repr__(self) -> str:
        m = self.config.model
        return (f"SABTranscendentV2(preset={m.preset!r}, hidden={m.hidden}, layers={m.n_layers}, heads={m.n_heads}, "
                f"ffn={m.ffn}, vocab={m.vocab_size}, params={self.num_parameters():,})")


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
                   cli: bool = False, threads: int | None = None) -> None:
    """Sampling options, checked before any work (one clear line each, naming the keyword or,
    with ``cli``, the command-line flag)."""
    name = (lambda k: "--" + k.replace("_", "-")) if cli else (lambda k: k)
    if not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= 10**7:
        raise SabError(f"{name('max_new_tokens')}={bounded(max_new_tokens)} must be an integer in [1, 10,000,000]")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise SabError(f"{name('temperature')}={bounded(temperature)} must be a finite number >= 0 (0 is greedy)")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
        raise SabError(f"{name('top_k')}={bounded(top_k)} must be a non-negative integer (0 or None: off)")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise SabError(f"{name('top_p')}={bounded(top_p)} must be in (0, 1]")
    if threads is not None and (not isinstance(threads, int) or not 1 <= threads <= 4096):
        raise SabError(f"{name('threads')}={bounded(threads)} must be an integer in [1, 4096]")


def _check_weights_fit(cfg: RunConfig) -> None:
    """Refuse, before allocating, a model whose fp32 weights alone exceed the available RAM."""
    from sab_byon_omni.estimate import num_parameters
    from sab_byon_omni.machine import memory_budget

    need = 4.0 * num_parameters(cfg.model)
    budget, what = memory_budget(torch.device("cpu"))
    if need > budget:
        raise SabError(f"the {cfg.model.preset!r} preset needs {need / 2**30:.1f} GiB for its fp32 weights alone, "
                       f"more than the {what}; inspect it with device='meta', see `sab-omni estimate`, "
                       "or use a smaller preset")


def _within_cores(threads: int | None, device: torch.device) -> int | None:
    """``threads`` (sampling on a CPU), lowered to the cores this process may use: more threads than
    cores only wait on one another (each op waits for its slowest thread). Warns once per count."""
    from sab_byon_omni.machine import usable_cpus

    if threads is None or device.type != "cpu" or threads <= (cores := usable_cpus()):
        return threads
    if (threads, cores) not in _THREADS_WARNED:
        _THREADS_WARNED.add((threads, cores))
        log.warning("threads=%d is more than the %d CPU core%s this process may use: sampling with %d", threads,
                    cores, "" if cores == 1 else "s", cores)
    return cores


_THREADS_WARNED: set[tuple[int, int]] = set()
