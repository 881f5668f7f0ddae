"""sab-omni export: write a trained model for another tool.

Formats (by default from the output's name): a .safetensors file (weights plus the run's config
and tokenizer in its header; loading it never runs code), a transformers folder in the model's own
architecture (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, GPT2LMHeadModel,
GPTNeoXForCausalLM; a model trained here as GPT-NeoX), read by AutoModelForCausalLM and
AutoTokenizer without this package, with its tokenizer and chat template; a .pt training
checkpoint (no optimizer state); or a .gguf file (llama.cpp's format, for Llama-shaped models).
The source is anything generate takes: a checkpoint, a .safetensors file from export, a
save_pretrained folder, a transformers folder (ours, or a Llama, Mistral, Qwen2, Qwen3, GPT-2 or
GPT-NeoX model), a GGUF file, or a Hub id in the local cache. Exporting a transformers folder or a GGUF file
to a .pt is the import; an option the target architecture cannot compute is refused, never
approximated (docs/HF_EXPORT.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sab_byon_omni.commands.common import check_paths_first, spellings
from sab_byon_omni.config import EXPORT_FORMATS, GGUF_TYPES, PRECISIONS
from sab_byon_omni.errors import SabError

DTYPES = ("keep", *(p for p in PRECISIONS if p != "auto"))

EXAMPLE = """examples:
  sab-omni export --checkpoint checkpoints/best_model.pt -o model.safetensors
  sab-omni export --checkpoint checkpoints/best_model.pt -o model-bf16.safetensors --dtype bf16
  sab-omni export --checkpoint checkpoints/best_model.pt -o hf_model --format hf   # for transformers
  sab-omni export --checkpoint hf_model -o imported.pt                             # and back
  sab-omni export --checkpoint ~/models/SmolLM2-135M -o smollm2.pt                 # import a Llama-family model
  sab-omni export --checkpoint model.gguf -o model-q8.gguf --gguf-type q8_0        # re-quantise a GGUF
  sab-omni generate --checkpoint imported.pt --prompt "Consciousness is"
"""


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("export", help="write a model as safetensors, a transformers folder or a checkpoint",
                       description=__doc__, epilog=EXAMPLE)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="SOURCE", help="the model to export (any source generate takes)")
    src.add_argument(*spellings("--from-safetensors"), metavar="PATH",
                     help="the same as --checkpoint PATH (the earlier spelling of importing a .safetensors file)")
    p.add_argument("-o", "--output", required=False, metavar="PATH",
                   help="the file or folder to write (never replaced without --force)")
    p.add_argument("--format", choices=EXPORT_FORMATS, default=None,
                   help="safetensors, hf (a transformers folder), pt (a checkpoint) or gguf (llama.cpp); by default "
                        ".safetensors, .pt and .gguf names choose theirs and anything else is an hf folder")
    p.add_argument("--dtype", choices=DTYPES, default="keep",
                   help="store the weights in this dtype (safetensors and hf; default: keep the model's)")
    p.add_argument("--gguf-type", choices=GGUF_TYPES, default=None,
                   help="gguf: store the matrices as f16 (default), q8_0 (8-bit blocks, half the size) or f32; "
                        "vectors stay f32")
    p.add_argument("--force", action="store_true",
                   help="replace the output if it is an earlier export (never another file or folder)")
    p.add_argument("--out", dest="output", default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # the earlier spelling
    return p


def run(args: argparse.Namespace) -> int:
    check_paths_first(source=args.checkpoint or args.from_safetensors)
    if not args.output:
        raise SabError("export: -o/--output is required (the file or folder to write)")
    from sab_byon_omni.core.export import export_model

    source = args.checkpoint or args.from_safetensors
    fmt = args.format or ("pt" if args.from_safetensors and not args.format else None)
    out = export_model(source, args.output, fmt=fmt, dtype=args.dtype, overwrite=args.force, gguf_type=args.gguf_type)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) if out.is_dir() else out.stat().st_size
    print(f"wrote {out} ({size / 2**20:,.1f} MiB{', a transformers folder' if Path(out).is_dir() else ''})")
    return 0
