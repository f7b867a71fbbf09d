"""Rewrites of jax2onnx's NHWC pooling subgraphs as the standard ONNX pooling operators.

jax2onnx converts :func:`~orchard_jax.models.layers.max_pool_2x2` (a reshape, then a max) as
``Reshape [B, H, W, C] -> [B, H/2, 2, W/2, 2, C]`` + ``ReduceMax`` over axes 2 and 4, and a
spatial mean (:func:`~orchard_jax.models.layers.global_avg_pool`) as ``ReduceSum`` over axes 1
and 2 + ``Div`` by ``H * W``. onnxruntime cannot move the layout transposes jax2onnx puts around
each convolution past that reshape or reduction, so each convolution keeps a transpose on both
sides and its BatchNorm stays unfolded. :func:`rewrite_pools` replaces exactly those subgraphs,
with the shapes, axes and constants checked, by ``Transpose -> MaxPool 2x2/2 -> Transpose`` and
``Transpose -> GlobalAveragePool -> Flatten``, whose transposes onnxruntime's basic
optimizations then cancel against the convolutions'. Anything else (another window, stride or
axes, a divisor other than ``H * W``, a shape that is not static) is left as it is.

The functions work on an ``onnx.ModelProto`` whose constants are initializers (as onnxruntime's
basic optimizations leave it) and change it in place.
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any

import numpy as np

NCHW = (0, 3, 1, 2)  # perm: NHWC -> NCHW
NHWC = (0, 2, 3, 1)  # perm: NCHW -> NHWC


def _float_shapes(proto: Any, onnx: Any) -> dict[str, list[int | None]]:
  """Each float tensor's shape by onnx's shape inference (MaxPool and GlobalAveragePool take
  floats only), a dimension None where it is not static."""
  inferred = onnx.shape_inference.infer_shapes(proto)
  floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
  shapes = {}
  for value in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
    tensor = value.type.tensor_type
    if tensor.HasField("shape") and tensor.elem_type in floats:
      shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None
                            for d in tensor.shape.dim]
  return shapes


class _Graph:
  """The graph's constants, producers and consumers, and fresh names for new tensors."""

  def __init__(self, proto: Any, onnx: Any):
    self.proto, self.onnx = proto, onnx
    graph = proto.graph
    self.constants = {c.name: onnx.numpy_helper.to_array(c) for c in graph.initializer}
    self.consumers = Counter(i for n in graph.node for i in n.input)
    self.consumers.update(o.name for o in graph.output)
    self.shapes = _float_shapes(proto, onnx)
    self.names = {*self.constants, *(o for n in graph.node for o in n.output),
                  *(i.name for i in graph.input)}

  def constant(self, name: str) -> np.ndarray | None:
    return self.constants.get(name)

  def fresh(self, stem: str) -> str:
    k = 0
    while f"{stem}_{k}" in self.names:
      k += 1
    self.names.add(f"{stem}_{k}")
    return f"{stem}_{k}"

  def nhwc(self, name: str) -> tuple[int, int, int] | None:
    """``(H, W, C)`` of a rank-4 float tensor whose last three dimensions are static, else
    None."""
    shape = self.shapes.get(name)
    if shape is None or len(shape) != 4 or None in shape[1:] or 0 in shape[1:]:
      return None
    return shape[1], shape[2], shape[3]


def _attribute(node: Any, name: str, default: Any, onnx: Any) -> Any:
  for a in node.attribute:
    if a.name == name:
      return onnx.helper.get_attribute_value(a)
  return default


def _axes(node: Any, graph: _Graph, rank: int) -> list[int] | None:
  """A reduction's axes (its second input, as jax2onnx writes them), made non-negative and
  sorted; None when they are not a constant input (ReduceMax's axes attribute before opset
  18, which jax2onnx 0.13.0 does not write, is not matched)."""
  value = graph.constant(node.input[1]) if len(node.input) > 1 and node.input[1] else None
  if value is None or value.dtype != np.int64 or value.ndim != 1:
    return None
  axes = value.tolist()
  if not all(-rank <= a < rank for a in axes):
    return None
  return sorted(a % rank for a in axes)


def _transposed(graph: _Graph, x: str, perm: tuple[int, ...], out: str) -> Any:
  return graph.onnx.helper.make_node("Transpose", [x], [out], perm=list(perm))


def _max_pool(reduce: Any, producers: dict[str, Any], graph: _Graph) -> list[Any] | None:
  """``Reshape [B, H, W, C] -> [B, H/2, 2, W/2, 2, C]`` + ``ReduceMax`` over axes 2, 4 without
  kept axes (``reduce``) as ``Transpose -> MaxPool 2x2/2 -> Transpose``; None if not that."""
  reshape = producers.get(reduce.input[0])
  if (reshape is None or reshape.op_type != "Reshape" or graph.consumers[reshape.output[0]] != 1
      or _attribute(reduce, "keepdims", 1, graph.onnx) != 0):
    return None
  hwc, target = graph.nhwc(reshape.input[0]), graph.constant(reshape.input[1])
  if hwc is None or target is None or _axes(reduce, graph, 6) != [2, 4]:
    return None
  (h, w, c), allow_zero = hwc, _attribute(reshape, "allowzero", 0, graph.onnx)
  first = [-1] if allow_zero else [-1, 0]  # 0 copies the batch dimension unless allowzero
  if h % 2 or w % 2 or target.tolist()[1:] != [h // 2, 2, w // 2, 2, c] or target[0] not in first:
    return None
  helper, x, y = graph.onnx.helper, reshape.input[0], reduce.output[0]
  nchw, pooled = graph.fresh(f"{x}_nchw"), graph.fresh(f"{y}_nchw")
  return [_transposed(graph, x, NCHW, nchw),
          helper.make_node("MaxPool", [nchw], [pooled], kernel_shape=[2, 2], strides=[2, 2]),
          _transposed(graph, pooled, NHWC, y)]


def _spatial_mean(reduce: Any, consumers: dict[str, list[Any]],
                  graph: _Graph) -> tuple[Any, list[Any]] | None:
  """``ReduceSum`` over axes 1, 2 of ``[B, H, W, C]`` without kept axes (``reduce``) + ``Div``
  by ``H * W`` as ``Transpose -> GlobalAveragePool -> Flatten``; the ``Div`` node and the
  replacement, or None if not that. (A mean with ``keepdims=True`` jax2onnx writes as this
  ``ReduceSum``, a ``Reshape`` and an ``Expand`` to ``[B, 1, 1, C]``, then the ``Div``: not
  matched.)"""
  x, s = reduce.input[0], reduce.output[0]
  hwc, users = graph.nhwc(x), consumers.get(s, [])
  if (hwc is None or len(users) != 1 or graph.consumers[s] != 1
      or _attribute(reduce, "keepdims", 1, graph.onnx) != 0 or _axes(reduce, graph, 4) != [1, 2]):
    return None
  div = users[0]
  divisor = graph.constant(div.input[1]) if div.op_type == "Div" and div.input[0] == s else None
  if divisor is None or divisor.size != 1 or divisor.ndim > 1:  # a scalar, or [1]: same shape
    return None
  if not np.issubdtype(divisor.dtype, np.floating) or float(divisor.reshape(())) != hwc[0] * hwc[1]:
    return None
  helper, y = graph.onnx.helper, div.output[0]
  nchw, pooled = graph.fresh(f"{x}_nchw"), graph.fresh(f"{y}_nchw")
  return div, [_transposed(graph, x, NCHW, nchw),
               helper.make_node("GlobalAveragePool", [nchw], [pooled]),
               helper.make_node("Flatten", [pooled], [y], axis=1)]


def rewrite_pools(proto: Any, onnx: Any) -> Counter:
  """Rewrites jax2onnx's 2x2/2 reshape-max pools and spatial means of NHWC tensors (see the
  module docstring) in ``proto``, in place; returns how many of each (``"MaxPool"``,
  ``"GlobalAveragePool"``)."""
  graph = _Graph(proto, onnx)
  nodes = list(proto.graph.node)
  producers = {o: n for n in nodes for o in n.output}
  consumers: dict[str, list[Any]] = {}
  for n in nodes:
    for i in set(n.input):
      consumers.setdefault(i, []).append(n)
  replaced: dict[int, list[Any]] = {}  # id of a node -> what takes its place (nothing: removed)
  count: Counter = Counter()
  for node in nodes:
    if node.op_type == "ReduceMax" and (new := _max_pool(node, producers, graph)):
      replaced[id(producers[node.input[0]])], replaced[id(node)] = [], new
      count["MaxPool"] += 1
    elif node.op_type == "ReduceSum" and (found := _spatial_mean(node, consumers, graph)):
      div, new = found
      replaced[id(node)], replaced[id(div)] = [], new
      count["GlobalAveragePool"] += 1
  if count:
    rewritten = [copy.deepcopy(m) for n in nodes for m in replaced.get(id(n), [n])]
    del proto.graph.node[:]
    proto.graph.node.extend(rewritten)
    kept = {o for n in rewritten for o in n.output}
    values = [v for v in proto.graph.value_info if v.name in kept]
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(values)
  return count
