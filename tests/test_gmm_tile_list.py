"""The Hopper kernels' work lists built in one Pallas (Triton) launch each (kernels/gmm/tile_list)
are bit-identical to the jnp constructions (`pallas_mgpu.group_aligned_tiles`, valid and
unused items alike, and `pallas_mgpu.group_row_tiles`), run in Pallas' interpreter on CPU."""
import numpy as np
import jax.numpy as jnp
import pytest

from openmoe_jax.kernels.gmm import pallas_mgpu as mg
from openmoe_jax.kernels.gmm import tile_list

_RNG = np.random.default_rng(0)
CASES = {
    "ragged_with_tail": ([37, 0, 200, 64, 150], 520, 128),   # empty group, rows past the groups
    "aligned": ([128, 64, 0, 192, 136], 520, 64),
    "all_empty": ([0, 0, 0], 256, 128),                      # only the tail group
    "clipped": ([300, 300], 520, 128),                       # sizes sum past m
    "many_groups": (list(_RNG.integers(0, 400, 40)), 8000, 128),
    "one_big_group": ([20000], 20000, 64),  # 313 items: three loop steps of one program
    "tiny": ([5], 8, 8),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_tile_list_kernel_matches_jnp(case):
  sizes, m, tm = CASES[case]
  gs = jnp.array(sizes, jnp.int32)
  want = mg.group_aligned_tiles(gs, m, tm)
  got = tile_list.group_aligned_tiles(gs, m, tm, interpret=True)
  assert len(got) == 4 and got[0].shape == (tile_list.num_items(m, len(sizes), tm),)
  for name, a, b in zip(("group", "start", "end", "count"), want, got):
    np.testing.assert_array_equal(np.asarray(b), np.asarray(a), err_msg=name)
  # Every valid item owns rows of its group, inside one tile.
  n = int(got[3][0])
  start, end = np.asarray(got[1])[:n], np.asarray(got[2])[:n]
  assert np.all(start < end) and np.all(end - start <= tm)


@pytest.mark.parametrize("case", ["ragged_with_tail", "clipped", "many_groups", "all_empty"])
def test_row_tiles_kernel_matches_jnp(case):
  sizes, m, tm = CASES[case]
  gs = jnp.array(sizes, jnp.int32)
  want = mg.group_row_tiles(gs, m, tm)
  got = tile_list.group_row_tiles(gs, m, tm, interpret=True)
  for name, a, b in zip(want._fields, want, got):
    np.testing.assert_array_equal(np.asarray(b), np.asarray(a), err_msg=name)
