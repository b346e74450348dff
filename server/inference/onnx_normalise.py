"""uint8 batches into an ONNX graph: the pixels' normalisation prepended to the graph, so ONNX Runtime takes the
stacked ``N x H x W x C`` uint8 batch as it is (a quarter of the bytes, no float pass in Python or torch).

:func:`with_pixel_input` rewrites a graph whose image input ``x`` is ``N x C x H x W`` float32 so that ``x`` is
computed inside the graph as ``Concat(normalised pixels, x)`` along the batch axis, from three more inputs:

- :data:`PIXELS` ``N x H x W x C`` uint8, transposed to ``N x C x H x W``, cast to float32, divided by 255, less
  :data:`MEAN`, times :data:`INV_STD` (both ``1 x C x 1 x 1`` float32, fed with the version's ``[input]`` values);
- ``x`` itself, still an input under its own name, for float batches (float32 tensors from clients, normalised by
  torch as before).

Every call feeds one of the two batches and an empty (0-row) one for the other, so one session serves both kinds
exactly: the pixel path runs the same float32 operations in the same order as ``LoadedVersion``'s torch
normalisation (``x / 255``, ``- mean``, ``* (1 / std)``). A graph whose input is not a 4-dimensional float32 tensor
with a dynamic batch dimension, or that cannot be rewritten (a model over protobuf's 2 GiB), is served unchanged,
on the float path.

Blocks (parsing and serialising the model: a fraction of a second for a ResNet); run it where sessions are opened
(the loader thread or the runtime job).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

log = logging.getLogger("classifyd.models")

PIXELS = "classifyd_pixels"
MEAN = "classifyd_mean"
INV_STD = "classifyd_inv_std"
ADDED_INPUTS = (PIXELS, MEAN, INV_STD)
_PREFIX = "classifyd_pixel_path_"  # the added nodes' outputs and the scale constant
MIN_OPSET = 13  # Transpose, Cast, Div, Sub, Mul and Concat as used here are unchanged since opset 13


def pixel_model(model: Path | bytes) -> Path | bytes:
    """``model`` (a file or its bytes) with the pixel input prepended (:func:`with_pixel_input`), serialised; the
    model unchanged when it cannot take one (its reason logged at debug level). Blocks; never raises for the graph:
    ONNX Runtime reports a broken model when it opens it."""
    try:
        proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(str(model))
        reason = unsupported(proto)
        if reason:
            log.debug("ONNX graph served on the float path: %s", reason)
            return model
        return with_pixel_input(proto).SerializeToString()
    except Exception as exc:  # noqa: BLE001 -- a graph we cannot rewrite is served as it is, only slower
        log.debug("ONNX graph served on the float path: %s: %s", type(exc).__name__, exc)
        return model


def unsupported(model: onnx.ModelProto) -> str:
    """Why the graph cannot take the pixel input (empty when it can)."""
    graph = model.graph
    initialisers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initialisers]
    if len(inputs) != 1:
        return f"{len(inputs)} inputs"
    if any(i.name in ADDED_INPUTS for i in inputs):
        return "the pixel input is there already"
    tensor = inputs[0].type.tensor_type
    if tensor.elem_type != TensorProto.FLOAT or len(tensor.shape.dim) != 4:
        return "the input is not a 4-dimensional float32 tensor"
    if tensor.shape.dim[0].HasField("dim_value"):
        return f"a fixed batch of {tensor.shape.dim[0].dim_value} (the unused path's empty batch would not fit)"
    if any(o.name == inputs[0].name for o in graph.output):
        return "the input is also an output"
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        return f"opset {opset} (the pixel path needs {MIN_OPSET})"
    return ""


def with_pixel_input(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model``, changed in place (no second copy of its weights), so that its image input is also computed from
    the :data:`PIXELS` batch (the module docstring). Check :func:`unsupported` first."""
    graph = model.graph
    source = next(i for i in graph.input if i.name not in {x.name for x in graph.initializer})
    joined = _PREFIX + "input"
    for node in graph.node:
        _rename_uses(node, source.name, joined)
    dims = source.type.tensor_type.shape.dim
    channels, height, width = (_dim(d, f"{_PREFIX}{axis}") for d, axis in zip(dims[1:], "chw", strict=True))
    per_channel = [1, channels, 1, 1]
    graph.input.extend([
        helper.make_tensor_value_info(PIXELS, TensorProto.UINT8, [f"{_PREFIX}rows", height, width, channels]),
        helper.make_tensor_value_info(MEAN, TensorProto.FLOAT, per_channel),
        helper.make_tensor_value_info(INV_STD, TensorProto.FLOAT, per_channel)])
    graph.initializer.append(numpy_helper.from_array(np.array(255.0, dtype=np.float32), _PREFIX + "255"))
    steps = [("Transpose", [PIXELS], "nchw", {"perm": [0, 3, 1, 2]}),
             ("Cast", ["nchw"], "float", {"to": TensorProto.FLOAT}),
             ("Div", ["float", "255"], "unit", {}),
             ("Sub", ["unit", MEAN], "centred", {}),
             ("Mul", ["centred", INV_STD], "normalised", {})]
    nodes = [helper.make_node(op, [name if name in ADDED_INPUTS else _PREFIX + name for name in inputs],
                              [_PREFIX + output], name=_PREFIX + output, **attributes)
             for op, inputs, output, attributes in steps]
    nodes.append(helper.make_node("Concat", [_PREFIX + "normalised", source.name], [joined], name=joined, axis=0))
    original = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + original)  # topological order: the pixel path first
    return model


def _dim(dim: onnx.TensorShapeProto.Dimension, symbol: str) -> int | str:
    return dim.dim_value if dim.HasField("dim_value") else symbol


def _rename_uses(node: onnx.NodeProto, old: str, new: str) -> None:
    """Make ``node`` (and the subgraphs of If, Loop and Scan bodies in it, which may read outer names) read ``new``
    where it read ``old``."""
    for position, name in enumerate(node.input):
        if name == old:
            node.input[position] = new
    for attribute in node.attribute:
        for body in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
            if any(i.name == old for i in body.input):
                continue  # the body's own input of that name hides the outer one
            for inner in body.node:
                _rename_uses(inner, old, new)


def float_feed(name: str, batch: np.ndarray) -> dict[str, np.ndarray]:
    """The inputs of a graph with the pixel input for a normalised ``N x C x H x W`` float32 ``batch`` fed to its
    image input ``name``: no pixel rows."""
    channels, height, width = batch.shape[1:]
    per_channel = np.zeros((1, channels, 1, 1), np.float32)
    return {name: batch, PIXELS: np.empty((0, height, width, channels), np.uint8), MEAN: per_channel,
            INV_STD: per_channel}


def pixel_feed(name: str, pixels: np.ndarray, mean: np.ndarray, inv_std: np.ndarray) -> dict[str, np.ndarray]:
    """The inputs for an ``N x H x W x C`` uint8 batch normalised in the graph with ``mean`` and ``inv_std``
    (``1 x C x 1 x 1`` float32): no rows for the image input ``name``."""
    height, width, channels = pixels.shape[1:]
    return {PIXELS: np.ascontiguousarray(pixels), MEAN: mean, INV_STD: inv_std,
            name: np.empty((0, channels, height, width), np.float32)}
