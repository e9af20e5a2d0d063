"""ShardRequest: which part of one checkpoint tensor a rank reads.

A request is a list of boxes (one ``slice`` per leading dim; dims not named are taken
whole) whose reads are concatenated along ``cat_dim``. One box covers the usual cases
(an EP block of experts, a TP block of rows); two boxes cover a TP shard of the fused
``gate_up_proj [E, 2F, H]``, whose gate rows and up rows are sliced separately and put
back together gate-then-up:

    F_local = F // etp
    ShardRequest.blocks(dim=1, ranges=[(r * F_local, (r + 1) * F_local),
                                       (F + r * F_local, F + (r + 1) * F_local)],
                        outer=(slice(e0, e1),))

Slices have step 1 (safetensors reads contiguous boxes); bounds follow Python slicing
(clamped, ``None`` = open end).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from moe_ext.checkpoint.errors import CheckpointError

Box = tuple[slice, ...]
Bounds = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class ShardRequest:
    """Boxes read from one tensor and concatenated along ``cat_dim``."""

    boxes: tuple[Box, ...]
    cat_dim: int = 0

    def __post_init__(self) -> None:
        if not self.boxes:
            raise CheckpointError(
                "ShardRequest needs at least one box; use ShardRequest.full() for the whole tensor"
            )
        for box in self.boxes:
            for s in box:
                if not isinstance(s, slice) or s.step not in (None, 1):
                    raise CheckpointError(f"ShardRequest boxes hold slices with step 1, got {s!r}")

    @staticmethod
    def full() -> "ShardRequest":
        """The whole tensor."""
        return ShardRequest(boxes=((),))

    @staticmethod
    def block(dim: int, start: int, stop: int) -> "ShardRequest":
        """Rows ``[start, stop)`` of dim ``dim``, every other dim whole."""
        return ShardRequest(boxes=((slice(None),) * dim + (slice(start, stop),),))

    @staticmethod
    def blocks(dim: int, ranges: Sequence[tuple[int, int]], outer: Box = ()) -> "ShardRequest":
        """Several ``[start, stop)`` ranges of dim ``dim`` concatenated along ``dim``.

        ``outer`` gives slices for dims before ``dim`` (e.g. the EP block of experts on dim 0);
        dims before ``dim`` that ``outer`` does not name are whole.
        """
        if len(outer) > dim:
            raise CheckpointError(
                f"ShardRequest.blocks: outer names {len(outer)} dims, only {dim} come before dim "
                f"{dim}"
            )
        lead = tuple(outer) + (slice(None),) * (dim - len(outer))
        return ShardRequest(boxes=tuple(lead + (slice(a, b),) for a, b in ranges), cat_dim=dim)

    def is_full(self, shape: Sequence[int]) -> bool:
        bounds = self.bounds(shape)
        return len(bounds) == 1 and all(b == (0, n) for b, n in zip(bounds[0], shape))

    def bounds(self, shape: Sequence[int]) -> list[Bounds]:
        """Each box as ``(start, stop)`` per dim of a tensor of ``shape`` (all dims named)."""
        if not 0 <= self.cat_dim < max(len(shape), 1):
            raise CheckpointError(
                f"ShardRequest cat_dim {self.cat_dim} is out of range for shape {list(shape)}"
            )
        out = []
        for box in self.boxes:
            if len(box) > len(shape):
                raise CheckpointError(
                    f"ShardRequest box {box} has more dims than the tensor shape {list(shape)}"
                )
            full_box = tuple(box) + (slice(None),) * (len(shape) - len(box))
            out.append(
                tuple(
                    (s.indices(n)[0], max(s.indices(n)[0], s.indices(n)[1]))
                    for s, n in zip(full_box, shape)
                )
            )
        return out

    def shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Shape of the tensor this request reads from a tensor of ``shape``."""
        bounds = self.bounds(shape)
        out = [b - a for a, b in bounds[0]]
        for other in bounds[1:]:
            other_shape = [b - a for a, b in other]
            for d, (x, y) in enumerate(zip(out, other_shape)):
                if d != self.cat_dim and x != y:
                    raise CheckpointError(
                        f"ShardRequest boxes disagree on dim {d} ({x} vs {y}); only cat_dim "
                        f"{self.cat_dim} may differ"
                    )
            if len(shape):
                out[self.cat_dim] += other_shape[self.cat_dim]
        return tuple(out)
