"""Hostile inputs for the security, fault and fuzz tests: a pickled payload that leaves a marker
file when it runs, and the files an attacker (or a damaged disk) could hand to the package —
checkpoints, sharded DCP folders, safetensors files — plus a way to run a command in a child
process with its memory and time bounded."""

from __future__ import annotations

import builtins
import hashlib
import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import torch

# The real CLI in a child process; knobs slow each optimizer step (to overlap two runs) or SIGKILL
# the child right before a checkpoint's temporary file would be renamed (no handler can run).
TRAIN_CHILD = """
import os, signal, sys, time
from sab_byon_omni.training import trainer as T

pause = float(os.environ.get("SAB_STEP_SLEEP", "0"))
kill_replace = os.environ.get("SAB_KILL_IN_REPLACE", "")
original_step = T.Trainer.optimizer_step

def step(self):
    time.sleep(pause)
    return original_step(self)

T.Trainer.optimizer_step = step
if kill_replace:
    real_replace = os.replace
    def replace(src, dst):
        if os.path.basename(str(dst)) == kill_replace:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst)
    os.replace = replace
from sab_byon_omni.cli import main
sys.exit(main(sys.argv[1:]))
"""

# Several CLI commands in one child process whose address space is capped and each of whose
# commands is cut after a time limit (exit 124): a memory or time bomb fails a test, not the machine.
BOUNDED_CHILD = """
import contextlib, io, json, os, resource, signal, sys, traceback
resource.setrlimit(resource.RLIMIT_AS, ({mem}, {mem}))
signal.signal(signal.SIGALRM, lambda *a: os._exit(124))
from sab_byon_omni.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    signal.alarm({seconds})
    try:
        with contextlib.redirect_stderr(err):
            rc = main(argv)
    except BaseException:
        rc = -1
        err.write(traceback.format_exc())
    signal.alarm(0)
    results.append([rc, err.getvalue()])
print(json.dumps(results))
"""


class Payload:
    """Unpickling this runs ``exec``: it writes a marker file. A stand-in for any attacker code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.exec, (f"open({self.marker!r}, 'w').write('pwned')",)


# ------------------------------------------------------------------------------ sharded (DCP)
def tiny_model_and_optimizer():
    """The tiny model and an AdamW laid out as the trainer's (decay / no-decay groups), one step in."""
    from sab_byon_omni.config import ModelConfig
    from sab_byon_omni.model.transformer import CausalTransformer

    model = CausalTransformer(ModelConfig.from_name("tiny", vocab_size=96))
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": 0.01},
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1e-3)
    model(torch.randint(0, 96, (1, 8))).float().mean().backward()  # AdamW state exists after a step
    opt.step()
    return model, opt


def tiny_config(**changes) -> dict:
    from sab_byon_omni.config import build_config

    return build_config({"preset": "tiny", "vocab_size": 96, "seq_len": 32, **changes}).to_dict()


def write_dcp(path: Path, global_step: int = 5, optimizer_extra: dict | None = None,
              moment_dtype: torch.dtype | None = None) -> Path:
    """A valid sharded checkpoint of the tiny model (written in one process, laid out as FSDP's):
    DCP's ``.metadata`` and ``__0_0.distcp``, plus ``meta.pt``. ``optimizer_extra`` goes into the
    first param group (a byte entry of the shard: how a payload would travel there);
    ``moment_dtype``: AdamW's moments stored in that dtype instead of the weights' fp32."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, opt = tiny_model_and_optimizer()
    msd, osd = get_state_dict(model, opt)
    osd["param_groups"][0].update(optimizer_extra or {})
    if moment_dtype is not None:
        for entry in osd["state"].values():
            entry.update({k: v.to(moment_dtype) for k, v in entry.items() if k.startswith("exp_avg")})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(path))
    torch.save({"epoch": 0, "global_step": global_step, "config": tiny_config(), "model_state_dict": {},
                "tokenizer": {"name": "char96"}, "sharded": True}, path / "meta.pt")
    return path


def plant_metadata_payload(dcp_dir: Path, marker: Path, inside: bool = True) -> None:
    """Replace ``.metadata`` by a pickle that runs the payload: inside real DCP Metadata (one of
    its fields), or alone."""
    meta_path = dcp_dir / ".metadata"
    if inside:
        with open(meta_path, "rb") as f:
            metadata = pickle.load(f)  # our own file, just written
        metadata.planner_data = Payload(marker)
        meta_path.write_bytes(pickle.dumps(metadata))
    else:
        meta_path.write_bytes(pickle.dumps(Payload(marker)))


def unsafe_dcp_load(dcp_dir: Path) -> None:
    """What torch's own reader does with a folder (the control: it runs a planted payload)."""
    import logging
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, opt = tiny_model_and_optimizer()
    msd, osd = get_state_dict(model, opt)
    logging.disable(logging.WARNING)  # DCP logs its failures with tracebacks on the root logger
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            dcp.load({"model": msd, "optimizer": osd}, checkpoint_id=str(dcp_dir))
        except (Exception, CheckpointException):
            pass  # the payload has run by then (or not): the caller checks the marker
        finally:
            logging.disable(logging.NOTSET)


# ------------------------------------------------------------------------------ pickles by hand
def deferred_bomb(levels: int = 8, fan: int = 9) -> bytes:
    """A pickle of nested lists, nine references per level, that creates every list empty first
    and fills them afterwards (so a scanner that sums sizes as it goes would see nothing big); the
    lists stay on the stack (no POP) and end up in one tuple."""
    out = [b"\x80\x02("]  # PROTO 2, MARK
    for i in range(levels):
        out.append(b"]q" + bytes([i]))  # EMPTY_LIST, BINPUT i
    for i in range(levels - 1, 0, -1):  # BINGET i, MARK, BINGET i-1 x fan, APPENDS, then TUPLE1 to keep it
        out.append(b"h" + bytes([i]) + b"(" + (b"h" + bytes([i - 1])) * fan + b"e\x85")
    out.append(b"t.")  # TUPLE of everything since the first MARK
    return b"".join(out)


def tuple_key_bomb(levels: int = 40) -> bytes:
    """``{t: 1}`` where ``t = (t', t')`` nested ``levels`` deep through shared references: building
    the dict hashes the key, 2**levels steps (hours at 40) inside the unpickler itself."""
    out = [b"\x80\x02", b"X\x01\x00\x00\x00x", b"q\x00"]  # 'x', BINPUT 0
    for i in range(1, levels + 1):
        out.append(b"h" + bytes([i - 1]) + b"h" + bytes([i - 1]) + b"\x86q" + bytes([i]))  # (t, t) TUPLE2
    out.append(b"}" + b"h" + bytes([levels]) + b"K\x01s.")  # EMPTY_DICT, key, 1, SETITEM
    return b"".join(out)


def with_pickle(torch_file: bytes, data_pkl: bytes) -> bytes:
    """A ``torch.save`` zip whose ``data.pkl`` is replaced by ``data_pkl`` (every other record kept)."""
    import zipfile

    src, dst = zipfile.ZipFile(io.BytesIO(torch_file)), io.BytesIO()
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as z:
        for info in src.infolist():
            z.writestr(info.filename, data_pkl if info.filename.endswith("/data.pkl") else src.read(info))
    return dst.getvalue()


def opcode_run(unit: bytes, times: int, head: bytes = b"", tail: bytes = b"N.") -> bytes:
    """A protocol-2 pickle: ``head``, then ``unit`` repeated ``times`` times, then ``tail``: the
    cheapest way to make an unpickler or a scanner work (``N0``: push None, pop it)."""
    return b"\x80\x02" + head + unit * times + tail


def with_record(torch_file: bytes, suffix: str, chunks, compress_type: int = 8, zip64: bool = True) -> bytes:
    """A ``torch.save`` zip whose record ending in ``suffix`` is replaced by the bytes of ``chunks``
    (an iterable, written as a stream so that gigabytes cost no memory here), compressed with
    ``compress_type`` (8 deflate, 12 bzip2, 14 lzma; 0 stored): a decompression bomb when the
    chunks repeat."""
    import zipfile

    src, dst = zipfile.ZipFile(io.BytesIO(torch_file)), io.BytesIO()
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as z:
        for info in src.infolist():
            if not info.filename.endswith(suffix):
                z.writestr(info.filename, src.read(info))
                continue
            record = zipfile.ZipInfo(info.filename)
            record.compress_type = compress_type
            with z.open(record, "w", force_zip64=zip64) as w:
                for chunk in chunks:
                    w.write(chunk)
    return dst.getvalue()


def claim_size(zip_bytes: bytes, suffix: str, size: int) -> bytes:
    """``zip_bytes`` with the central directory's uncompressed size of the record ending in ``suffix``
    replaced by ``size`` (a header that lies: the bytes stay as they are)."""
    import struct
    import zipfile

    info = next(i for i in zipfile.ZipFile(io.BytesIO(zip_bytes)).infolist() if i.filename.endswith(suffix))
    data = bytearray(zip_bytes)
    name = info.filename.encode()
    at = data.find(b"PK\x01\x02")  # the first central directory entry
    while at >= 0:
        n = struct.unpack_from("<H", data, at + 28)[0]
        if bytes(data[at + 46:at + 46 + n]) == name:
            struct.pack_into("<I", data, at + 24, min(size, 0xFFFFFFFE))
            return bytes(data)
        at = data.find(b"PK\x01\x02", at + 46)
    raise AssertionError(f"no central directory entry for {suffix}")


# ------------------------------------------------------------------------------ processes
def run_bounded(commands: list[list[str]], cwd: Path, memory_mb: int = 2500, seconds: int = 20) -> list:
    """[(exit status, stderr)] of ``sab-omni`` commands run one after another in a child process
    with at most ``memory_mb`` of address space and ``seconds`` per command."""
    import json

    code = BOUNDED_CHILD.format(mem=memory_mb << 20, seconds=seconds)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    out = subprocess.run([sys.executable, "-c", code, json.dumps(commands)], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=seconds * len(commands) + 120)
    assert out.returncode == 0, (out.returncode, out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def start_train(argv: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    """``sab-omni ARGV`` in a child process with :data:`TRAIN_CHILD`'s knobs set from ``env``."""
    script = cwd / "child.py"
    script.write_text(TRAIN_CHILD)
    full_env = {**{k: v for k, v in os.environ.items() if not k.startswith("SAB_")}, "OMP_NUM_THREADS": "1",
                "TQDM_DISABLE": "1", **env}
    return subprocess.Popen([sys.executable, str(script), *argv], cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def assert_one_error_line(err: str, *needles: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def snapshot(d: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``d`` (to show nothing was changed or lost)."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def flip_tensor_bit(path: Path, tensor: torch.Tensor) -> None:
    """Flip one bit inside ``tensor``'s bytes where the checkpoint at ``path`` stores them (the zip
    structure stays intact: only a checksum can tell)."""
    data = bytearray(path.read_bytes())
    raw = tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    at = data.find(raw)
    assert at >= 0 and data.find(raw, at + 1) < 0, "the tensor's bytes are not found once in the file"
    data[at + len(raw) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def torch_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


__all__ = ["Payload", "write_dcp", "plant_metadata_payload", "unsafe_dcp_load", "run_bounded", "start_train",
           "assert_one_error_line", "snapshot", "torch_bytes", "flip_tensor_bit", "deferred_bomb", "tuple_key_bomb",
           "with_pickle", "opcode_run", "with_record", "claim_size"]
