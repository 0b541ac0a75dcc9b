"""Group metadata shared by the tiled kernels (megablox-style work list).

Rows are cut into fixed tiles of `tile_m`; a tile that straddles a group boundary is
visited once per group it touches ("work items"), and each visit masks its own rows.
The rows past sum(group_sizes) form an extra "tail" group (index G) whose visits write
zeros, so every output element is written by exactly one visit.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class GroupMetadata(NamedTuple):
  starts: jax.Array       # int32[G+1]: first row of each group (tail group last)
  ends: jax.Array         # int32[G+1]: one past the last row
  item_group: jax.Array   # int32[I]: group of each work item (invalid items: last valid one's)
  item_tile: jax.Array    # int32[I]: row tile of each work item
  num_items: jax.Array    # int32[1]: number of valid items (<= I)


def max_items(m: int, num_groups: int, tile_m: int, visit_empty: bool) -> int:
  """Static upper bound on the number of work items."""
  return pl_cdiv(m, tile_m) + num_groups + (num_groups if visit_empty else 0)


def pl_cdiv(a: int, b: int) -> int:
  return -(-a // b)


def make_group_metadata(group_sizes_G: jax.Array, m: int, tile_m: int, *,
                        visit_empty: bool = False, with_tail: bool = True) -> GroupMetadata:
  """Builds the work list. `visit_empty` gives every empty group one (fully masked) item."""
  if m <= 0 or tile_m <= 0:
    raise ValueError(f"m={m} and tile_m={tile_m} must be positive")
  sizes = group_sizes_G.astype(jnp.int32)
  num_tiles = pl_cdiv(m, tile_m)
  ends = jnp.minimum(jnp.cumsum(sizes), m)
  starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
  if with_tail:
    starts = jnp.concatenate([starts, ends[-1:]])
    ends = jnp.concatenate([ends, jnp.full((1,), m, jnp.int32)])
  first_tile = starts // tile_m
  count = (ends + tile_m - 1) // tile_m - first_tile
  count = jnp.where(ends > starts, count, 1 if visit_empty else 0)
  first_tile = jnp.minimum(first_tile, num_tiles - 1)
  cum = jnp.cumsum(count)
  num = max_items(m, sizes.shape[0], tile_m, visit_empty)
  item = jnp.arange(num, dtype=jnp.int32)
  num_valid = cum[-1]
  # Invalid items repeat the last valid item (same output block; kernels mask them off).
  clamped = jnp.minimum(item, jnp.maximum(num_valid - 1, 0))
  grp = jnp.searchsorted(cum, clamped, side="right", method="compare_all").astype(jnp.int32)
  grp = jnp.minimum(grp, starts.shape[0] - 1)
  offset = cum[grp] - count[grp]
  tile = jnp.clip(first_tile[grp] + clamped - offset, 0, num_tiles - 1)
  return GroupMetadata(starts.astype(jnp.int32), ends.astype(jnp.int32), grp, tile.astype(jnp.int32),
                       num_valid.reshape(1).astype(jnp.int32))


def interleave_items(md: GroupMetadata, tile_m: int, block: int = 0) -> GroupMetadata:
  """The same work items, reordered by their relative position inside their group (then by
  group); invalid items stay last. `block` > 1 interleaves blocks of `block` consecutive
  groups one block after the other (so the weights of the groups running together can stay
  in L2 too); 0 or 1 interleaves all groups. With rows sorted by group and, inside a group, by source
  row (a stable sort of gathered tokens), the items that run together then read source rows
  from one narrow range, so a source row gathered by many groups (MoEUT's k = 16) is fetched
  from HBM about once and served from L2 afterwards."""
  num = md.item_group.shape[0]
  item = jnp.arange(num, dtype=jnp.int32)
  first = md.starts[md.item_group] // tile_m
  count = jnp.maximum((md.ends[md.item_group] + tile_m - 1) // tile_m - first, 1)
  frac = (md.item_tile - first).astype(jnp.float32) + 0.5
  key = frac / count.astype(jnp.float32)
  if block > 1:
    key = key + 2.0 * (md.item_group // block).astype(jnp.float32)
  key = jnp.where(item < md.num_items[0], key, jnp.inf)
  order = jnp.argsort(key, stable=True)
  return md._replace(item_group=md.item_group[order], item_tile=md.item_tile[order])
