"""Limits on the files we did not write, checked before anything is unpickled.

``torch.load(weights_only=True)`` (and DCP's metadata through an allow-list) runs no code, but a
few hundred bytes can still describe a structure that takes hours to build or walk: shared
references nest a list or tuple nine ways on each of twenty levels (9^20 leaves for whatever
expands it: ``str()``, a checksum, the hash of a tuple used as a dict key while unpickling), a
list can contain itself (endless recursion), a compressed zip record of 39 KB can hold gigabytes
of cheap opcodes, and a pickle can set attributes on the classes it imports.

:func:`check_torch_file` refuses a zip whose records are compressed (``torch.save`` stores every
record as it is, so every record's size is bounded by the file's real size) or claim more bytes
than the file holds. :func:`check_pickle` then reads the opcodes as a stream without executing
them (:mod:`pickletools`), builds the graph of the objects they would create, and refuses one that
discards objects (``POP``/``DUP``: never written by ``pickle`` for data without cycles, and the
cheapest way to make a scan do work), modifies an object it imported rather than built, holds a
cycle, or is past limits no checkpoint comes near: more than 10^6 objects or references created,
3x10^6 opcodes, or a structure whose fully expanded size or nesting depth is over 10^6 objects or 64
levels (a 3b-preset checkpoint with its AdamW state is about 2x10^4 objects, 9 deep). So the scan's
memory and time are bounded by the file's real size and by those limits (a few seconds at worst).
"""

from __future__ import annotations

import io
import json
import os
import pickletools
import re
import zipfile
from pathlib import Path
from typing import IO, Any

from sab_byon_omni.errors import SabError, bounded, first_line

MAX_NODES = 10**6  # objects a pickle may create, references it may make, and objects it may expand to
MAX_OPS = 3 * MAX_NODES  # opcodes (a real pickle has 2-3 per object: the object, its memo entry, a reference)
MAX_DEPTH = 64  # containers inside containers
MAX_JSON_BYTES = 16 << 20  # JSON we parse from a header, a config.json or a tokenizer.json
MAX_STEP = 10**12  # the one limit of a step, epoch or sample count: no run takes more; a larger one is damaged or hostile


def is_count(value: Any) -> bool:
    """A whole number from 0 to :data:`MAX_STEP` (not a bool, not a float): a step, epoch or sample count."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_STEP
_NEW, _IN_PLACE, _MARK, _PUT, _GET, _STOP, _NOTHING, _DISCARD = range(8)  # what an opcode does


def _kinds() -> dict[Any, tuple[str, int, int, bool]]:
    """Per opcode: (name, what it does, objects it takes from the stack, whether it takes a mark's slice)."""
    special = {"APPEND": _IN_PLACE, "APPENDS": _IN_PLACE, "SETITEM": _IN_PLACE, "SETITEMS": _IN_PLACE,
               "BUILD": _IN_PLACE, "ADDITEMS": _IN_PLACE, "MARK": _MARK, "PUT": _PUT, "BINPUT": _PUT,
               "LONG_BINPUT": _PUT, "MEMOIZE": _PUT, "GET": _GET, "BINGET": _GET, "LONG_BINGET": _GET,
               "STOP": _STOP, "PROTO": _NOTHING, "FRAME": _NOTHING, "POP": _DISCARD, "POP_MARK": _DISCARD,
               "DUP": _DISCARD}
    out = {}
    for op in pickletools.opcodes:
        kind, marked = special.get(op.name, _NEW), pickletools.markobject in op.stack_before
        n = len(op.stack_before) - (2 if marked else 0) - (1 if kind == _IN_PLACE else 0)  # the target stays
        out[op] = (op.name, kind, max(n, 0), marked)
    return out


_KINDS = _kinds()
_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_LEAF: tuple[int, ...] = ()  # the children of an object that holds none (shared: no list per leaf)


class _Refused(Exception):
    """The scan stops: why (the rest of a SabError's message)."""


class _Scan:
    """The graph of the objects a pickle's opcodes would create, built without executing them: for
    every object (by index), the objects it holds; shared ones (memo references) appear once per
    reference. ``buildable``: the only classes whose new instances (``NEWOBJ``) may be given
    attributes (``BUILD``); None: any object the pickle built."""

    def __init__(self, buildable: frozenset[str] | None) -> None:
        self.buildable = buildable
        self.children: list[Any] = []
        self.stack: list[int] = []
        self.marks: list[int] = []  # the stack's length at each open MARK
        self.memo: dict[int, int] = {}
        self.imported: set[int] = set()  # what GLOBAL/STACK_GLOBAL fetch: classes, functions, constants
        self.names: dict[int, str] = {}  # the globals' names; with buildable, strings that may name one
        self.instances: set[int] = set()  # new instances of a buildable class
        self.references = 0

    def run(self, stream: IO[bytes]) -> list[Any]:
        stack, marks = self.stack, self.marks
        for count, (op, arg, _) in enumerate(pickletools.genops(stream)):
            if count >= MAX_OPS:
                raise _Refused(f"it has more than {MAX_OPS:,} opcodes (a time bomb?)")
            name, kind, n, marked = _KINDS[op]
            if kind == _NEW:
                self._new(name, arg, self._take(n, marked) if marked or n else _LEAF)
            elif kind == _GET:
                stack.append(self.memo[arg])
            elif kind == _PUT:
                if len(stack) <= (marks[-1] if marks else 0):
                    raise IndexError("a memo entry for nothing")
                self.memo[len(self.memo) if name == "MEMOIZE" else arg] = stack[-1]
            elif kind == _MARK:
                marks.append(len(stack))
            elif kind == _IN_PLACE:
                self._fill(name, self._take(n, marked))
            elif kind == _DISCARD:
                raise _Refused(f"it discards objects it builds ({name}, which pickle never writes for data: a bomb "
                               "that keeps a reader busy?)")
            elif kind == _STOP:
                return self.children
        raise ValueError("the pickle has no STOP opcode (truncated?)")

    def _take(self, n: int, marked: bool) -> list[int]:
        """The objects an opcode consumes: those above the last mark, or its ``n`` arguments."""
        stack, marks = self.stack, self.marks
        at = marks.pop() if marked else len(stack) - n  # IndexError without a mark: malformed
        if not marked and at < (marks[-1] if marks else 0):
            raise IndexError("an opcode reaches past a mark or the bottom of the stack")
        items = stack[at:]
        del stack[at:]
        self.references += len(items)
        return items

    def _fill(self, name: str, items: list[int]) -> None:
        """APPEND(S), SETITEM(S), ADDITEMS, BUILD: ``items`` go into the object below them."""
        if len(self.stack) <= (self.marks[-1] if self.marks else 0):
            raise IndexError(f"{name} without an object to fill")
        target = self.stack[-1]
        if target in self.imported:
            raise _Refused(f"it changes {bounded(self.names.get(target, 'an object'))}, which it imports ({name} "
                           "on a class or function rather than on an object it built: a hostile file)")
        if name == "BUILD" and self.buildable is not None and target not in self.instances:
            kinds = " or ".join(sorted(c.rpartition(".")[2] for c in self.buildable))
            raise _Refused(f"it sets attributes ({name}) on something other than a new {kinds} (a hostile file)")
        if items:
            kids = self.children[target]
            if kids is _LEAF:
                self.children[target] = items
            else:
                kids.extend(items)

    def _new(self, name: str, arg: Any, items: list[int] | tuple[int, ...]) -> None:
        """Any other opcode: a new object that holds ``items``."""
        node = len(self.children)
        self.children.append(items or _LEAF)
        self.stack.append(node)
        if node >= MAX_NODES or self.references > MAX_NODES:
            raise _Refused(f"it creates more than {MAX_NODES:,} objects or references (a memory or time bomb?)")
        if name == "GLOBAL" or name == "STACK_GLOBAL":
            self.imported.add(node)
            self.names[node] = arg.replace(" ", ".") if name == "GLOBAL" else \
                f"{self.names.get(items[0], '?')}.{self.names.get(items[1], '?')}"
        elif self.buildable is not None:
            if isinstance(arg, str) and len(arg) <= 200 and _DOTTED.fullmatch(arg):
                self.names[node] = arg  # a module or class name, perhaps: STACK_GLOBAL takes two of them
            elif name == "NEWOBJ" and items[0] in self.imported and self.names.get(items[0]) in self.buildable:
                self.instances.add(node)


def _measure(children: list[Any]) -> tuple[int, int]:
    """(largest expanded size, deepest nesting) over every object; a cycle raises _Refused."""
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
                    raise _Refused("it holds an object that contains itself (hostile file?)")
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


def check_pickle(data: bytes | IO[bytes], source: str, buildable: frozenset[str] | None = None) -> None:
    """Refuse (SabError) a pickle that is malformed, discards objects, changes what it imports,
    holds a cycle, or is past the limits; ``data`` is bytes or a stream read once, as far as the
    limits allow. ``buildable``: see :class:`_Scan` (DCP's metadata dataclasses)."""
    stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    try:
        nodes, depth = _measure(_Scan(buildable).run(stream))
    except _Refused as e:
        raise SabError(f"{source}: refused to load: {e}") from None
    except (ValueError, IndexError, KeyError, EOFError, zipfile.BadZipFile) as e:  # pickletools' errors, nonsense
        raise SabError(f"{source}: not a readable pickle (truncated or corrupt?): {first_line(e)}") from None
    if nodes > MAX_NODES or depth > MAX_DEPTH:
        raise SabError(f"{source}: refused to load: its structure expands to more than {MAX_NODES:,} objects or "
                       f"{MAX_DEPTH} levels (shared references: a memory or time bomb?)")


def _size(f: IO[bytes]) -> int:
    try:
        return os.fstat(f.fileno()).st_size
    except (AttributeError, OSError, ValueError):  # an in-memory stream
        end = f.seek(0, 2)
        f.seek(0)
        return end


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
    """Check a ``torch.save`` file (a zip) before ``torch.load`` reads it: every record stored
    uncompressed, as torch writes them, and no larger than the file (so what torch reads is
    bounded by the file's real size), and every pickle inside passing :func:`check_pickle`. A file
    that is a raw pickle or a legacy (pre-1.6) torch file is refused: torch has written zip files
    since 2020, and the old format cannot be checked this way."""
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
    real = _size(f)
    try:
        with zipfile.ZipFile(f) as z:
            infos = z.infolist()
            for info in infos:
                if info.compress_type != zipfile.ZIP_STORED:
                    raise SabError(f"{source}: refused to load: its record {bounded(info.filename)} is compressed, "
                                   "and torch.save stores every record as it is (a decompression bomb?)")
                if info.file_size != info.compress_size:
                    raise SabError(f"{source}: refused to load: its record {bounded(info.filename)} claims "
                                   f"{info.file_size:,} bytes but stores {info.compress_size:,} (a hostile file?)")
            if sum(info.file_size for info in infos) > real:
                raise SabError(f"{source}: refused to load: its records claim more bytes than the file's {real:,} "
                               "(records that overlap: a hostile file?)")
            for info in infos:
                if info.filename.endswith(".pkl"):
                    with z.open(info) as stream:
                        check_pickle(stream, source)
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


def read_json(path: str | Path) -> Any:
    """The JSON in a file we did not write (a ``config.json``, a tokenizer, an index), read through
    :func:`parse_json`: a file too large is refused before it is read; an unreadable one is a SabError."""
    p = Path(path)
    try:
        if p.stat().st_size > MAX_JSON_BYTES:
            raise SabError(f"{p}: {p.stat().st_size:,} bytes of JSON is more than a config can need")
        return parse_json(p.read_bytes(), str(p))
    except OSError as e:
        raise SabError(f"cannot read {p}: {e.strerror or e}") from None



def not_a_file(path: str | Path) -> str | None:
    """Why ``path`` is no regular file to read (``file not found``, ``not a regular file (a character
    device)``), or None when it is one: ``/dev/zero`` exists, and is not "not found"."""
    import stat

    try:
        mode = Path(path).stat().st_mode
    except OSError:
        return "file not found"
    if stat.S_ISREG(mode):
        return None
    kind = ("a folder" if stat.S_ISDIR(mode) else "a character device" if stat.S_ISCHR(mode) else
            "a block device" if stat.S_ISBLK(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a socket")
    return f"not a regular file ({kind})"
