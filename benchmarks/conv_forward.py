"""Forward-only 3x3 convolutions on XLA:CPU: lax.conv vs im2col, and MiniCNN's evaluation step.

XLA:CPU's own convolution is slow on small images and fast on larger ones;
``orchard_jax.models.layers.Conv3x3`` evaluates images under
``IM2COL_FORWARD_PIXELS`` pixels with im2col. Printed, side by side in one
process (alternating rounds, medians):

* per layer shape at batch 256: milliseconds of a jitted forward pass of
  each, their ratio im2col / lax.conv, and the largest relative difference;
* MiniCNN's ``eval_step`` at batch 256 on 8x8x1 (digits) and 28x28x1
  inputs, with the threshold as shipped vs 0 (every evaluation convolution
  through lax.conv): milliseconds per batch and the ratio.

  python benchmarks/conv_forward.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from orchard_jax.core.state import create_train_state
from orchard_jax.core.steps import _eval_step
from orchard_jax.models import build_model, layers
from orchard_jax import tune_host_memory
tune_host_memory()  # the orchard-jax command's allocator (ORCHARD_JAX_MALLOC=system: glibc's)

SHAPES = [(2, 64, 128), (4, 64, 128), (7, 64, 128), (4, 32, 64), (8, 1, 32), (8, 32, 64),
          (14, 32, 64), (16, 3, 32), (28, 1, 32), (32, 3, 32)]


def timed(fn, args, calls: int = 10) -> float:
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(calls):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / calls * 1000


def side_by_side(fns: dict, args, rounds: int) -> dict[str, float]:
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      times[name].append(timed(fn, args))
  return {name: float(np.median(t)) for name, t in times.items()}


def layer_rows(rounds: int, batch: int = 256) -> None:
  rng = np.random.default_rng(0)
  print(f"forward 3x3 convolution, batch {batch}: ms (median of {rounds} rounds)")
  for side, c, o in SHAPES:
    x = jnp.asarray(rng.normal(size=(batch, side, side, c)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, 3, c, o)) * 0.1, jnp.float32)
    fns = {"lax": jax.jit(layers.conv3x3_xla), "im2col": jax.jit(layers.conv3x3_im2col)}
    t = side_by_side(fns, (x, k), rounds)
    a, b = fns["lax"](x, k), fns["im2col"](x, k)
    err = float(jnp.abs(a - b).max() / jnp.abs(a).max())
    print(f"  {side:>2}x{side:<2}x{c:<3}-> {o:<4} lax.conv {t['lax']:7.2f}  im2col {t['im2col']:7.2f}"
          f"  im2col/lax {t['im2col'] / t['lax']:.2f}  max rel diff {err:.1e}")


def eval_rows(rounds: int, batch: int = 256) -> None:
  rng = np.random.default_rng(1)
  shipped = layers.IM2COL_FORWARD_PIXELS
  print(f"MiniCNN eval_step, batch {batch}: ms per batch (median of {rounds} rounds)")
  for side in (8, 28):
    model = build_model("mini_cnn", num_classes=10, dropout=0.1, in_channels=1, resolution=side)
    state = create_train_state(model, input_shape=(side, side, 1), num_classes=10, seed=0)
    batch_ = {"image": jnp.asarray(rng.normal(size=(batch, side, side, 1)), jnp.float32),
              "label": jnp.asarray(rng.integers(0, 10, batch), jnp.int32),
              "mask": jnp.ones((batch,), bool)}
    fns = {}
    for name, pixels in (("shipped", shipped), ("lax.conv", 0)):
      layers.IM2COL_FORWARD_PIXELS = pixels  # read at trace time; a new function traces anew
      fns[name] = jax.jit(lambda s, b: _eval_step(s, b)).lower(state, batch_).compile()
    layers.IM2COL_FORWARD_PIXELS = shipped
    t = side_by_side(fns, (state, batch_), rounds)
    print(f"  {side}x{side}x1: threshold {shipped} {t['shipped']:.2f}  lax.conv only "
          f"{t['lax.conv']:.2f}  ratio {t['shipped'] / t['lax.conv']:.2f}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=7)
  args = parser.parse_args()
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}")
  layer_rows(args.rounds)
  eval_rows(args.rounds)


if __name__ == "__main__":
  main()
