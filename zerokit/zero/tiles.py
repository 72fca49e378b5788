"""How an offloaded optimizer walks a group's shard: tiles, and the segments of each tile.

A tile is a contiguous range of the shard, the unit of CPU work, of NVMe swapping and of the
upload of updated parameters. A segment is the part of a tile inside one optimizer piece (a
parameter's elements in this shard), or a gap between pieces (alignment padding), which is never
stepped but still uploaded.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass(frozen=True)
class Segment:
    start: int  # shard coordinates
    stop: int
    piece: Optional[int]  # index into the group's pieces; None for a gap


@dataclass(frozen=True)
class Tile:
    start: int
    stop: int
    segments: tuple[Segment, ...]

    @property
    def numel(self) -> int:
        return self.stop - self.start


def tile_ranges(numel: int, tile_numel: int) -> list[tuple[int, int]]:
    """[start, stop) of each tile of a shard of `numel` elements."""
    return [(start, min(start + tile_numel, numel)) for start in range(0, numel, tile_numel)]


def plan_tiles(numel: int, pieces: Sequence[tuple[int, int]], tile_numel: int) -> list[Tile]:
    """Tiles of a shard whose pieces are the sorted, disjoint [start, stop) ranges `pieces`."""
    tiles = []
    for start, stop in tile_ranges(numel, tile_numel):
        segments, cursor = [], start
        for index, (lo, hi) in enumerate(pieces):
            lo, hi = max(lo, start), min(hi, stop)
            if lo >= hi:
                continue
            if lo > cursor:
                segments.append(Segment(cursor, lo, None))
            segments.append(Segment(lo, hi, index))
            cursor = hi
        if cursor < stop:
            segments.append(Segment(cursor, stop, None))
        tiles.append(Tile(start, stop, tuple(segments)))
    return tiles
