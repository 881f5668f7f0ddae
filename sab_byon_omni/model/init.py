"""Initial weights defined by one seed, whatever device or sharding they are written into.

A matrix's initial value is N(0, std), drawn in blocks of rows, each block from its own CPU
generator seeded by (the model's seed, the parameter's index, the block's index). So any rows of
any parameter can be produced on their own: a normal build fills whole parameters, an FSDP rank
fills only the rows of its shard (built on the meta device, sharded, then materialised), and
both get the very same numbers. Blocks are independent, so they are filled on several threads.
"""

from __future__ import annotations

import concurrent.futures

import torch

BLOCK_ELEMENTS = 1 << 20  # values per generator: 4 MB of fp32, cheap to draw whole for a partial block
_MASK = (1 << 63) - 1


def block_seed(seed: int, index: int, block: int) -> int:
    """The generator seed of rows block ``block`` of parameter ``index`` (a fixed mix, the same on every machine)."""
    return (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + block * 0x94D049BB133111EB) & _MASK


def rows_per_block(shape: torch.Size | tuple[int, ...]) -> int:
    row = 1
    for n in shape[1:]:
        row *= n
    return max(1, BLOCK_ELEMENTS // max(row, 1))


def _draw(shape: tuple[int, ...], seed: int, std: float) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.empty(shape, dtype=torch.float32, device="cpu").normal_(0.0, std, generator=gen)


@torch.no_grad()
def init_rows(out: torch.Tensor, full_shape: torch.Size | tuple[int, ...], seed: int, index: int,
              std: float | None, start: int = 0) -> None:
    """Write rows ``start .. start + len(out)`` of parameter ``index``'s initial value into ``out``
    (any device and dtype). ``std`` None: ones (the norms' gains); 0: zeros (biases)."""
    if std is None or std == 0:
        out.fill_(1.0 if std is None else 0.0)
        return
    out = out.detach()  # the same memory; in-place writes from worker threads (grad mode is per thread)
    rows, per = int(full_shape[0]), rows_per_block(full_shape)
    stop = start + int(out.shape[0])
    if stop <= start:
        return  # an empty shard

    def fill(block: int) -> None:
        b0, b1 = block * per, min((block + 1) * per, rows)
        values = _draw((b1 - b0, *full_shape[1:]), block_seed(seed, index, block), std)
        lo, hi = max(b0, start), min(b1, stop)
        out[lo - start:hi - start].copy_(values[lo - b0:hi - b0])

    blocks = range(start // per, (stop - 1) // per + 1)
    workers = min(torch.get_num_threads(), len(blocks))
    if workers <= 1:
        for b in blocks:
            fill(b)
        return
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:  # torch ops release the GIL
        list(pool.map(fill, blocks))

