"""Value-and-gradient time of a 3x3 convolution: lax.conv vs im2col, side by side.

Prints, for MiniCNN's layer shapes, the max relative difference of the two
forward results and the milliseconds of a jitted value-and-gradient of each.

  python benchmarks/conv_im2col.py
"""
import time, jax, jax.numpy as jnp, numpy as np
def conv_lax(x, k): return jax.lax.conv_general_dilated(x, k, (1,1), "SAME", dimension_numbers=("NHWC","HWIO","NHWC"))
def conv_im2col(x, k):
  B,H,W,C = x.shape; xp = jnp.pad(x, ((0,0),(1,1),(1,1),(0,0)))
  cols = jnp.concatenate([xp[:, i:i+H, j:j+W, :] for i in range(3) for j in range(3)], -1)
  return (cols.reshape(B*H*W, 9*C) @ k.reshape(9*C, -1)).reshape(B,H,W,-1)
rng = np.random.default_rng(0)
for (B,H,C,O) in [(64,28,1,32),(64,14,32,64),(64,7,64,128),(16,28,1,32),(16,14,32,64)]:
  x = jnp.asarray(rng.normal(size=(B,H,H,C)),jnp.float32); k = jnp.asarray(rng.normal(size=(3,3,C,O)),jnp.float32)
  a, b = conv_lax(x,k), conv_im2col(x,k); err = float(jnp.abs(a-b).max()/jnp.abs(a).max())
  res = {}
  for name, f in (("lax", conv_lax), ("im2col", conv_im2col)):
    g = jax.jit(jax.grad(lambda x,k: (f(x,k)**2).sum(), argnums=(0,1)))
    jax.block_until_ready(g(x,k)); t=time.perf_counter()
    for _ in range(20): r=g(x,k)
    jax.block_until_ready(r); res[name]=(time.perf_counter()-t)/20*1000
  print((B,H,C,O), f"relerr {err:.1e}", {k: round(v,2) for k,v in res.items()})
