"""Reading a model directory's manifest, and checking it against its config and files.

    manifest = read_manifest(model_dir)   # raises ModelDirError naming what is wrong
    identity = model_identity(manifest)   # the config's and files' sha256, in one hash

`read_manifest` checks the format, the version, the manifest's sha256 of its
own content (format 5; older versions are refused: their config cannot be
verified) and that every listed file has its byte size; `verified_path` checks
a file against its sha256 before it is loaded (tokenizer, shared weights).
`check_manifest` (called by it) checks what a buggy exporter could still get
wrong: every file the engine reads is listed (so it is size- and hash-checked;
the chat template and the safety polytope too, when the manifest names them),
the config parses, the embedding format and its tensors, the expert index has
one layer per routed layer and one region per expert, region sizes match the
config's layout, every region and delta lies inside its file, and deltas join
lattice neighbours.
"""

from __future__ import annotations

import json
import os

from perspective_jax.config.param_layout import expert_layers
from perspective_jax.errors import UserError
from perspective_jax.quant import embedding_int8
from perspective_jax.modeldir import format as md
from perspective_jax.moe import torus

TOKENIZER_FILES = {"byte": "tokenizer.byte", "sentencepiece": "tokenizer.model"}


class Manifest(dict):
    """A manifest as read from manifest.json (a dict), with its config parsed once
    (`.config`, a PerspectiveConfig) by the check that read it."""

    config = None


def read_manifest(model_dir: str) -> Manifest:
    """The manifest of `model_dir`, checked for format, version, consistency with its
    config (`check_manifest`) and the size of every listed file."""
    if os.path.exists(model_dir) and not os.path.isdir(model_dir):
        raise md.ModelDirError(f"model directory {model_dir} is a file, not a directory; give "
                            "the directory perspective-export wrote")
    if not os.path.isdir(model_dir):
        raise md.ModelDirError(f"model directory {model_dir} does not exist; create one with "
                            "perspective-export --run-dir RUN --out MODEL_DIR")
    path = os.path.join(model_dir, md.MANIFEST)
    if not os.path.exists(path):
        raise md.ModelDirError(f"{model_dir} has no {md.MANIFEST}: not an exported model (or an "
                            "interrupted export); re-run perspective-export")
    manifest = _parse(path)
    if manifest.get("format") != md.FORMAT_NAME:
        raise md.ModelDirError(f"{path}: format {manifest.get('format')!r} is not "
                            f"{md.FORMAT_NAME!r}; is this a Perspective model directory?")
    version = manifest.get("format_version")
    if version not in md.READABLE_VERSIONS:
        old = isinstance(version, int) and 0 < version < min(md.READABLE_VERSIONS)
        why = (f"format version {version} has no checksum over its own config, so it "
               "cannot be verified" if old else
               f"format version {version!r} is not supported")
        raise md.ModelDirError(f"{path}: {why} (this build reads versions "
                            f"{', '.join(map(str, md.READABLE_VERSIONS))}); "
                            "re-export the model with this version of perspective-export")
    recorded = manifest.get(md.MANIFEST_CHECKSUM)
    if not isinstance(recorded, str) or recorded != md.manifest_digest(manifest):
        what = "has no" if not isinstance(recorded, str) else "fails its"
        raise md.ModelDirError(f"{path} {what} {md.MANIFEST_CHECKSUM} checksum: it was "
                            "edited or is damaged — re-run perspective-export")
    manifest = Manifest(manifest)
    manifest.config = check_manifest(model_dir, manifest)   # agrees with its config, lists
    #                                                         every file
    for rel, info in manifest["files"].items():
        full = os.path.join(model_dir, rel)
        if not os.path.exists(full):
            raise md.ModelDirError(f"{model_dir}: file {rel} listed in the manifest is missing; "
                                "re-run perspective-export")
        if os.path.getsize(full) != info["bytes"]:
            raise md.ModelDirError(f"{model_dir}: {rel} has {os.path.getsize(full)} bytes, the "
                                f"manifest says {info['bytes']}; the file is truncated or "
                                "corrupt — re-run perspective-export")
    return manifest


def _parse(path: str) -> dict:
    """manifest.json as a JSON object; anything else is a one-line ModelDirError."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as e:
        raise md.ModelDirError(f"{path}: cannot read it ({e.strerror}); check the "
                               "model directory's permissions") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise md.ModelDirError(f"{path} is not valid UTF-8 (byte {raw[e.start]:#04x} at "
                               f"offset {e.start}): it is damaged — re-run "
                               "perspective-export") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise md.ModelDirError(f"{path} is not valid JSON ({e}); re-run "
                               "perspective-export") from None
    if not isinstance(manifest, dict):
        raise md.ModelDirError(f"{path} is not a manifest (a JSON object); re-run "
                               "perspective-export")
    return manifest


def model_identity(manifest: dict) -> str:
    """What a saved conversation or a memory file is tied to: the sha256 (hex) of the
    exact config and the sha256 of every file (shared weights, experts, tokenizer)."""
    return md.sha256_bytes(json.dumps(
        {"config": manifest["config"],
         "files": {k: v["sha256"] for k, v in sorted(manifest["files"].items())}},
        sort_keys=True).encode())


def tokenizer_file(manifest: dict) -> str:
    """The model directory's tokenizer file the manifest names (relative)."""
    return TOKENIZER_FILES[manifest["tokenizer"]]


def verified_path(model_dir: str, manifest: dict, rel: str) -> str:
    """model_dir/rel once its bytes match the manifest's sha256 for it; else a one-line
    ModelDirError naming the file."""
    path = os.path.join(model_dir, rel)
    try:
        digest = md.sha256_file(path)
    except OSError as e:
        raise md.ModelDirError(f"{path}: cannot read it ({e.strerror}); re-run "
                               "perspective-export") from None
    if digest != manifest["files"][rel]["sha256"]:
        raise md.ModelDirError(f"{path} fails its sha256 checksum; the model directory is "
                               "corrupt — re-run perspective-export")
    return path


def check_manifest(model_dir: str, manifest: dict):
    """The manifest's config (PerspectiveConfig), once it is checked."""
    path = os.path.join(model_dir, md.MANIFEST)

    def bad(what: str) -> md.ModelDirError:
        return md.ModelDirError(f"{path}: {what}; the model directory is inconsistent — "
                                "re-run perspective-export")
    try:
        return _check(manifest, bad)
    except md.ModelDirError:
        raise
    except UserError as e:                    # the config does not parse
        raise bad(f"its config is invalid ({e})") from None
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise bad(f"it is malformed ({type(e).__name__}: {e})") from None


def _check_embedding(manifest: dict, model, bad) -> None:
    """shared/embedding names a known format whose tensors the index lists as expected."""
    fmt = md.embedding_format(manifest)
    if fmt not in embedding_int8.FORMATS:
        raise bad(f"shared embedding format {fmt!r} is not one of {list(embedding_int8.FORMATS)}")
    tensors = manifest["shared"].get("tensors", {})
    want = {embedding_int8.EMBED_KEY: ([model.vocab_size, model.d_model],
                                       "int8" if fmt == "int8" else None)}
    if fmt == "int8":
        want[embedding_int8.SCALE_KEY] = ([model.vocab_size], "float32")
    for key, (shape, dtype) in want.items():
        info = tensors.get(key)
        if info is None:
            raise bad(f"the shared tensor index has no {key} (embedding {fmt})")
        right_type = (info["dtype"] == dtype if dtype
                      else str(info["dtype"]).startswith(("float", "bfloat")))
        if list(info["shape"]) != shape or not right_type:
            raise bad(f"shared tensor {key} is {info['dtype']} {list(info['shape'])}, "
                      f"expected {dtype or 'float'} {shape} for embedding {fmt}")


def _check(manifest: dict, bad):
    from perspective_jax.config import PerspectiveConfig, from_dict
    files = manifest["files"]
    sizes = {rel: int(info["bytes"]) for rel, info in files.items()}
    for rel, info in files.items():
        if not isinstance(info.get("sha256"), str):
            raise bad(f"file {rel} has no sha256")

    def listed(rel: str, what: str) -> int:
        if rel not in sizes:
            raise bad(f"{what} {rel} is not listed under 'files'")
        return sizes[rel]

    listed(manifest["shared"]["file"], "the shared weights file")
    tokenizer = manifest["tokenizer"]
    if tokenizer not in TOKENIZER_FILES:
        raise bad(f"tokenizer {tokenizer!r} is not one of {sorted(TOKENIZER_FILES)}")
    listed(TOKENIZER_FILES[tokenizer], "the tokenizer file")
    template = manifest.get(md.CHAT_TEMPLATE_KEY)    # absent in older exports: fine
    if template is not None:
        if (not isinstance(template, dict) or template.get("file") != md.CHAT_TEMPLATE_FILE
                or not isinstance(template.get("source"), str)):
            raise bad(f"its {md.CHAT_TEMPLATE_KEY} entry must be {{\"file\": "
                      f"\"{md.CHAT_TEMPLATE_FILE}\", \"source\": NAME}}, not {template!r}")
        listed(md.CHAT_TEMPLATE_FILE, "the chat template file")
    safety = manifest.get(md.SAFETY_KEY)             # absent without a polytope
    if safety is not None:
        if not isinstance(safety, dict) or not isinstance(safety.get("file"), str):
            raise bad(f"its {md.SAFETY_KEY} entry must be an object naming the polytope's "
                      f"\"file\", not {safety!r}")
        listed(safety["file"], "the safety polytope file")
    cfg = from_dict(PerspectiveConfig, manifest["config"])
    _check_embedding(manifest, cfg.model, bad)
    experts = manifest["experts"]
    layers = experts["layers"]
    if not cfg.model.routed:
        if layers:
            raise bad("the config is not routed but the manifest indexes expert layers")
        return cfg
    expected = expert_layers(cfg.model)
    if len(layers) != len(expected):
        raise bad(f"{len(layers)} expert layers indexed, the config has {len(expected)}")
    layout = md.RegionLayout(cfg.model.d_model, cfg.model.d_ff)
    if experts["region_bytes"] != layout.nbytes:
        raise bad(f"region_bytes {experts['region_bytes']} does not match the config's "
                  f"d_model {cfg.model.d_model}, d_ff {cfg.model.d_ff} ({layout.nbytes})")
    n_experts = cfg.moe.num_experts
    neighbours = {(int(a), int(b)) for a, b in torus.neighbour_pairs(tuple(cfg.moe.lattice))}
    for j, layer in enumerate(layers):
        where = f"expert layer {j}"
        file_bytes = listed(layer["file"], f"{where}'s expert file")
        regions = layer["regions"]
        if [r["expert"] for r in regions] != list(range(n_experts)):
            raise bad(f"{where} must index experts 0..{n_experts - 1} in order")
        for r in regions:
            if not isinstance(r[md.REGION_CHECKSUM], str):
                raise bad(f"{where}, expert {r['expert']} has no {md.REGION_CHECKSUM}")
            if not 0 <= int(r["offset"]) <= file_bytes - layout.nbytes:
                raise bad(f"{where}, expert {r['expert']} lies outside {layer['file']}")
        delta_bytes = listed(layer["delta_file"], f"{where}'s delta file")
        hub = layer.get("hub")                  # the consensus region, source index E
        if hub is not None and int(manifest["format_version"]) < md.HUB_VERSION:
            raise bad(f"{where} has a hub, which format version "
                      f"{manifest['format_version']} does not have")
        if hub is not None:
            if not isinstance(hub, dict) or not isinstance(hub.get(md.REGION_CHECKSUM), str):
                raise bad(f"{where}'s hub must be an object with a {md.REGION_CHECKSUM}")
            if not 0 <= int(hub["offset"]) <= file_bytes - layout.nbytes:
                raise bad(f"{where}'s hub lies outside {layer['file']}")
        top = n_experts if hub is not None else n_experts - 1      # the largest source
        for d in layer["deltas"]:
            src, dst, count = int(d["src"]), int(d["dst"]), int(d["count"])
            if src == dst or not (0 <= src <= top and 0 <= dst < n_experts):
                raise bad(f"{where} has a delta {src}->{dst}, not from an expert 0..{top} "
                          f"to another 0..{n_experts - 1}")
            if (min(src, dst), max(src, dst)) not in neighbours and src != n_experts:
                raise bad(f"{where} has a delta {src}->{dst} between experts that are not "
                          "lattice neighbours, nor from the layer's hub")
            encoding = md.delta_encoding(d)
            if encoding not in md.DELTA_ENCODINGS:
                raise bad(f"{where}'s delta {src}->{dst} has encoding {encoding!r}, not one "
                          f"of {', '.join(md.DELTA_ENCODINGS)}")
            if encoding == md.DELTA_FIELDS and src != n_experts:
                raise bad(f"{where}'s delta {src}->{dst} is a 'fields' record, which only "
                          "a delta from the layer's hub may be")
            size = md.delta_entry_bytes(d, layout.nbytes)
            if count < 0 or not 0 <= int(d["offset"]) <= delta_bytes - size:
                raise bad(f"{where}'s delta {src}->{dst} lies outside {layer['delta_file']}")
            if int(d.get("bytes", size)) != size:
                raise bad(f"{where}'s delta {src}->{dst} says {d['bytes']} bytes; its "
                          f"encoding and count make {size}")
            if not isinstance(d[md.REGION_CHECKSUM], str):
                raise bad(f"{where}'s delta {src}->{dst} has no {md.REGION_CHECKSUM}")
    freqs = manifest.get("routing_frequencies")
    if freqs is not None and (len(freqs) != len(layers)
                              or any(len(row) != n_experts for row in freqs)):
        raise bad(f"routing_frequencies must be [{len(layers)}, {n_experts}]")
    return cfg
