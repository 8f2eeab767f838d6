"""Shared (non-expert) weights of a model directory, as the streaming engine holds them.

    flat, quantized = load_shared(model_dir, manifest)
        flat:      {'/'-joined path: float numpy array}
        quantized: {kernel path: QuantizedKernel} (empty unless exported with --shared-bits)
    insert_kernels(layer_params, quantized, sharding)   # packed kernels into the layer trees
    table = embedding_table(flat, manifest, model_dir)  # [V, d] float, or an Int8Table
    table = load_embedding(model_dir, manifest)         # the same, reading only its tensors

`shared.safetensors` is checked against its manifest sha256 before it is loaded.
"""

from __future__ import annotations

import os

import jax
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file

from perspective_jax.quant import embedding_int8
from perspective_jax.quant import gptq
from perspective_jax.modeldir import format as md
from perspective_jax.modeldir.manifest import verified_path
from perspective_jax.quant.quantized_kernel import from_quantized_matrix


def load_shared(model_dir: str, manifest: dict):
    """(float tensors by '/'-joined path, {kernel path: QuantizedKernel}) of the shared
    weights; the second is empty unless the export quantised them (--shared-bits)."""
    # Hash first, then load: the second pass reads from the page cache; hashing an
    # in-memory copy instead would hold the shared weights twice at start-up.
    path = verified_path(model_dir, manifest, manifest["shared"]["file"])
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as e:
        raise md.ModelDirError(f"{path}: not a readable safetensors file ({e})") from None
    quantized = quantized_kernels(tensors, path) if manifest["shared"].get("bits") else {}
    return tensors, quantized


def quantized_kernels(tensors: dict, file: str) -> dict:
    """Take every GPTQ group (`gptq.kernel_keys`: '<kernel path>.codes', …) out of
    `tensors`; returns {kernel path: QuantizedKernel} (numpy leaves)."""
    try:
        out = {path: from_quantized_matrix(q, shape)
               for path, (q, shape) in gptq.read_kernels(tensors).items()}
    except ValueError as e:
        raise md.ModelDirError(f"{file}: {e}; re-run perspective-export") from None
    for path in out:
        for key in gptq.kernel_keys(path):
            del tensors[key]
    return out


def insert_kernels(layer_params: list, quantized: dict, sharding) -> None:
    """Place each 'periods/P/layer_i/…/kernel' QuantizedKernel in layer_params[P][i]."""
    for path, kernel in quantized.items():
        _, p, layer, *inner, leaf = path.split("/")
        node = layer_params[int(p)][int(layer.removeprefix("layer_"))]
        for name in inner:
            node = node.setdefault(name, {})
        node[leaf] = jax.device_put(kernel, sharding)


def embedding_table(flat: dict, manifest: dict, model_dir: str):
    """Take the tied embedding out of `flat`: the [V, d] float array, or for an int8
    export an `embedding_int8.Int8Table` (numpy) in head row blocks."""
    file = os.path.join(model_dir, md.SHARED_FILE)
    fmt = md.embedding_format(manifest)
    try:
        table = flat.pop(embedding_int8.EMBED_KEY)
    except KeyError:
        raise md.ModelDirError(f"{file}: no tensor {embedding_int8.EMBED_KEY}; re-run "
                               "perspective-export") from None
    if fmt == "float32":
        return table
    model = manifest["config"]["model"]
    scale = flat.pop(embedding_int8.SCALE_KEY, None)
    problem = ("no embedding scales" if scale is None else
               embedding_int8.check(table, scale, model["vocab_size"], model["d_model"]))
    if problem:
        raise md.ModelDirError(f"{file}: {problem}; re-run perspective-export")
    return embedding_int8.blocked(table, scale, embedding_int8.BLOCK_ROWS)


def load_embedding(model_dir: str, manifest: dict):
    """`embedding_table` without the rest of the shared weights: the file is checked
    against its sha256, then only the embedding's tensors are read from it."""
    path = verified_path(model_dir, manifest, manifest["shared"]["file"])
    keys = (embedding_int8.EMBED_KEY, embedding_int8.SCALE_KEY)
    try:
        with safe_open(path, framework="numpy") as fh:
            flat = {k: fh.get_tensor(k) for k in keys if k in fh.keys()}
    except (SafetensorError, OSError) as e:
        raise md.ModelDirError(f"{path}: not a readable safetensors file ({e})") from None
    return embedding_table(flat, manifest, model_dir)
