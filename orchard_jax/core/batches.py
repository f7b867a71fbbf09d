"""Batches the steps accept: a dict of arrays, or one row of an :class:`IndexedBatch` chunk.

A batch is ``{"image": [B, ...], "label": int [B], "mask": bool [B]}``.
When a dataset's images already live on the device (see
:mod:`orchard_jax.data.resident`), a batch can instead be described by the
indices of its rows: :class:`IndexedBatch`. ``train_step`` and ``eval_step``
gather such a batch inside their own program, so feeding one costs a single
dispatch per step, the same as a batch already on the device.
"""

from __future__ import annotations

from typing import NamedTuple, Union

import jax
import jax.numpy as jnp

__all__ = ["Batch", "IndexedBatch", "materialize"]


class IndexedBatch(NamedTuple):
  """Row ``row`` of a chunk of ``K`` batches of device-resident images.

  Attributes:
    images: ``[N + 1, ...]`` the dataset's images; the last row is zeros and
      is what padding rows index.
    index: int32 ``[K, B]`` image rows of each batch of the chunk (padding
      rows hold ``N``).
    label: int32 ``[K, B]`` class ids (0 on padding rows).
    count: int32 ``[K]`` unpadded rows of each batch.
    row: int32 scalar, which batch of the chunk this is.

  Every field is an array, so one compiled step serves every batch of every
  chunk of the same shapes.
  """
  images: jax.Array
  index: jax.Array
  label: jax.Array
  count: jax.Array
  row: jax.Array


Batch = Union[dict, IndexedBatch]


def materialize(batch: Batch) -> dict[str, jax.Array]:
  """The dict form of ``batch``: an :class:`IndexedBatch` is gathered, a dict returned as is.

  Traceable (the steps call it inside their program) and usable eagerly.
  """
  if not isinstance(batch, IndexedBatch):
    return batch
  index_B = batch.index[batch.row]
  mask_B = jnp.arange(index_B.shape[0]) < batch.count[batch.row]
  # Rows of a 2-D view gather as contiguous copies (about 3x faster on XLA:CPU than
  # gathering [1, H, W, C] windows). Padding rows' index N is the zero row.
  rows = batch.images.reshape(batch.images.shape[0], -1)
  image = jnp.take(rows, index_B, axis=0, mode="clip").reshape(
      index_B.shape + batch.images.shape[1:])
  return {"image": image, "label": batch.label[batch.row], "mask": mask_B}
