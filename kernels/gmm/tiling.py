"""Tile shapes and padding helpers shared by the kernel backends."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Tiling:
  """Block shape of one program (rows tm, output cols tn, reduction tk) and launch knobs."""
  tm: int = 128
  tn: int = 128
  tk: int = 64
  num_warps: int = 4     # GPU (Triton) only
  num_stages: int = 3    # GPU (Triton) only
  group_m: int = 8       # GPU: row items per L2 swizzle band
  ctas_per_sm: int = 1   # pallas_mgpu only: persistent CTAs per SM (2 overlap epilogues)
  pingpong: int = 0      # pallas_mgpu gmm only: 1 = each compute warpgroup owns whole tiles
  cluster: int = 1       # pallas_mgpu gmm only: 2 = CTA pairs share the lhs tile (TMA multicast)
  delay_release: int = 0  # pallas_mgpu gmm only: 1 = one wgmma in flight across K steps
  ring: int = 0          # pallas_mgpu only: 1 = hand-written ring across tiles, one wgmma in
  #                        flight, rows split between warpgroups (pallas_mgpu_ring, _ring_tgmm);
  #                        2 (gmm) = the same, each block stored under the next one's wgmma
  interleave: int = 0    # pallas_gpu gmm only: 1 = items by relative position in their group
  #                        (metadata.interleave_items: L2 reuse of rows many groups gather);
  #                        B > 1 = the same inside consecutive blocks of B groups

  def __post_init__(self):
    for name in ("tm", "tn", "tk", "num_warps", "num_stages", "group_m", "ctas_per_sm", "cluster"):
      if getattr(self, name) <= 0:
        raise ValueError(f"Tiling.{name}={getattr(self, name)} must be positive")

  def to_dict(self) -> dict[str, int]:
    return dataclasses.asdict(self)


def pad_to(x: jax.Array, multiples: tuple[int, ...]) -> jax.Array:
  """Zero-pads each dim of x up to a multiple of the given block size."""
  pads = [(0, (-d) % b) for d, b in zip(x.shape, multiples)]
  if all(p == (0, 0) for p in pads):
    return x
  return jnp.pad(x, pads)
