"""Limits on the pickles inside files we did not write, checked before anything is unpickled.

``torch.load(weights_only=True)`` (and DCP's metadata through an allow-list) runs no code, but a
few hundred bytes can still describe a structure that takes hours to build or walk: shared
references nest a list or tuple nine ways on each of twenty levels (9^20 leaves for whatever
expands it: ``str()``, a checksum, the hash of a tuple used as a dict key while unpickling), and a
list can contain itself (endless recursion). :func:`check_pickle` reads the opcodes without
executing them (:mod:`pickletools`), builds the graph of the objects they would create, and
refuses one that holds a cycle or whose fully expanded size or nesting depth is past limits no
checkpoint comes near (a 3b-preset checkpoint with its AdamW state is about 2x10^4 nodes, 9 deep).
"""

from __future__ import annotations

import json
import pickletools
import zipfile
from pathlib import Path
from typing import IO, Any

from sab_byon_omni.errors import SabError, bounded, first_line

MAX_NODES = 10**6  # objects a pickle may expand to, counting every path through shared references
MAX_DEPTH = 64  # containers inside containers
MAX_PICKLE_BYTES = 1 << 30
MAX_JSON_BYTES = 16 << 20  # JSON we parse from a header, a config.json or a tokenizer.json
_MARK = -1
_IN_PLACE = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "BUILD", "ADDITEMS"}  # fill the object below
_PUT, _GET = {"PUT", "BINPUT", "LONG_BINPUT"}, {"GET", "BINGET", "LONG_BINGET"}


class _Cycle(Exception):
    pass


def _pop_to_mark(stack: list[int]) -> list[int]:
    at = len(stack) - 1 - stack[::-1].index(_MARK)  # ValueError without a mark: malformed
    items = stack[at + 1:]
    del stack[at:]
    return items


def _pop(stack: list[int], n: int) -> list[int]:
    items = [stack.pop() for _ in range(n)]
    if _MARK in items:
        raise IndexError("a mark where an object should be")
    return items


def _graph(data: bytes) -> list[list[int]]:
    """For every object the pickle would create (by index), the objects it holds: shared ones
    (memo references) appear once per reference."""
    children: list[list[int]] = []
    stack: list[int] = []
    memo: dict[int, int] = {}
    for op, arg, _ in pickletools.genops(data):
        name, marked = op.name, pickletools.markobject in op.stack_before
        if name == "STOP":
            break
        if name == "MARK":
            stack.append(_MARK)
        elif name in _PUT or name == "MEMOIZE":
            top = _pop(stack, 1)[0]
            memo[arg if name in _PUT else len(memo)] = top
            stack.append(top)
        elif name in _GET:
            stack.append(memo[arg])
        elif name == "DUP":
            stack.append(stack[-1])
        elif name == "POP":
            stack.pop()
        elif name == "POP_MARK":
            _pop_to_mark(stack)
        elif name in _IN_PLACE:
            items = _pop_to_mark(stack) if marked else _pop(stack, len(op.stack_before) - 1)
            target = _pop(stack, 1)[0]
            children[target].extend(items)
            stack.append(target)
        else:
            items = _pop_to_mark(stack) if marked else _pop(stack, len(op.stack_before))
            for _ in op.stack_after:
                children.append(items)
                stack.append(len(children) - 1)
    return children


def _measure(children: list[list[int]]) -> tuple[int, int]:
    """(largest expanded size, deepest nesting) over every object; a cycle raises _Cycle."""
    size, depth, state = [0] * len(children), [0] * len(children), [0] * len(children)  # state: 1 open, 2 done
    for root in range(len(children)):
        if state[root]:
            continue
        state[root] = 1
        path = [(root, 0)]
        while path:
            node, i = path[-1]
            kids = children[node]
            if i < len(kids):
                path[-1] = (node, i + 1)
                k = kids[i]
                if state[k] == 1:
                    raise _Cycle
                if state[k] == 0:
                    state[k] = 1
                    path.append((k, 0))
                continue
            path.pop()
            state[node] = 2
            size[node] = min(1 + sum(size[k] for k in kids), MAX_NODES + 1)
            depth[node] = 1 + max((depth[k] for k in kids), default=0)
            if size[node] > MAX_NODES or depth[node] > MAX_DEPTH:
                return size[node], depth[node]
    return max(size, default=0), max(depth, default=0)


def check_pickle(data: bytes, source: str) -> None:
    """Refuse (SabError) a pickle that is malformed, holds a cycle, or expands past the limits."""
    try:
        nodes, depth = _measure(_graph(data))
    except _Cycle:
        raise SabError(f"{source}: refused to load: it holds an object that contains itself (hostile file?)") from None
    except (ValueError, IndexError, KeyError) as e:  # pickletools' own errors, or opcodes that make no sense
        raise SabError(f"{source}: not a readable pickle (truncated or corrupt?): {first_line(e)}") from None
    if nodes > MAX_NODES or depth > MAX_DEPTH:
        raise SabError(f"{source}: refused to load: its structure expands to more than {MAX_NODES:,} objects or "
                       f"{MAX_DEPTH} levels (shared references: a memory or time bomb?)")


_MAGIC = [(b"\x89PNG\r\n\x1a\n", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
          (b"%PDF-", "a PDF document"), (b"\x7fELF", "an ELF program or library"), (b"\x1f\x8b", "gzip-compressed"),
          (b"GGUF", "a GGUF model"), (b"\x93NUMPY", "a numpy .npy array"), (b"\x89HDF\r\n\x1a\n", "an HDF5 file")]


def file_kind(head: bytes) -> str:
    """What the first bytes of a file say it is, for messages: ``is a PNG image``, ``is a
    safetensors file (...)``, ``starts with 'abc' (a text file?)``."""
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return f"is {kind}"
    n = int.from_bytes(head[:8], "little") if len(head) > 8 else 0
    if 2 <= n < 1 << 27 and head[8:9] == b"{":  # safetensors: a little-endian header length, then JSON
        return "is a safetensors file (give it a .safetensors name)"
    shown = bounded(head[:8].decode("latin-1"))
    text = head.decode("utf-8", "ignore")
    looks_text = text and all(c.isprintable() or c.isspace() for c in text)
    return f"starts with {shown}" + (" (a text file?)" if looks_text else " (not a format it knows)")


def check_torch_file(f: str | Path | IO[bytes], source: str) -> None:
    """Check every pickle inside a ``torch.save`` file (a zip) before ``torch.load`` reads it; a
    file that is a raw pickle or a legacy (pre-1.6) torch file is refused: torch has written zip
    files since 2020, and the old format cannot be checked this way."""
    if isinstance(f, (str, Path)):
        with open(f, "rb") as stream:
            return check_torch_file(stream, source)
    start = f.read(16)
    f.seek(0)
    if not start:
        raise SabError(f"{source}: the file is empty (an interrupted copy?)")
    if start[:2] != b"PK" and start[:1] != b"\x80":  # neither a zip (torch.save) nor a pickle
        raise SabError(f"{source}: not a checkpoint: a torch.save file is a zip archive, and this file "
                       f"{file_kind(start)}; pass a .pt, .safetensors or model folder")
    if start[:1] == b"\x80":  # a pickle's PROTO opcode: a raw pickle or the legacy torch format
        raise SabError(f"{source}: refused to load: a raw pickle or a legacy (pre-1.6) torch file, not a torch zip "
                       "checkpoint; re-save it with a current torch from a source you trust")
    try:
        with zipfile.ZipFile(f) as z:
            for info in z.infolist():
                if info.filename.endswith(".pkl"):
                    if info.file_size > MAX_PICKLE_BYTES:
                        raise SabError(f"{source}: refused to load: a {info.file_size:,}-byte pickle inside")
                    check_pickle(z.read(info), source)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, NotImplementedError) as e:
        raise SabError(f"{source}: not a readable checkpoint (truncated or corrupt?): {first_line(e)}") from None
    finally:
        f.seek(0)


def parse_json(text: str | bytes, source: str) -> Any:
    """JSON from a file we did not write: bounded in size and depth, one SabError for anything else."""
    if len(text) > MAX_JSON_BYTES:
        raise SabError(f"{source}: {len(text):,} bytes of JSON is more than a config can need")
    try:
        return json.loads(text)
    except RecursionError:
        raise SabError(f"{source}: JSON nested too deeply to be a config") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise SabError(f"{source}: not valid JSON: {first_line(e)}") from None
