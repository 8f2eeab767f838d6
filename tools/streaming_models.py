"""Model directories and read-path probes for `bench_streaming.py` (issue 6).

Synthetic stores (random ternary experts on a lattice, coherent or independent
routers), the exported quickstart model, pre-reading a store into the page cache,
and the read bandwidth of the engine's own I/O paths.
"""

from __future__ import annotations

import json
import os
import shutil
import time

MB = 1 << 20

LATTICES = {8: (2, 2, 2), 16: (4, 2, 2), 32: (4, 4, 2), 64: (4, 4, 4)}


def synthetic_cfg(d_model: int, d_ff: int, n_layers: int = 24, experts: int = 64,
                  lattice=None):
    lattice = lattice or LATTICES[experts]
    from perspective_jax.config import load_config
    return load_config(None, [
        "model.routed=true", "ternary.enabled=true", "model.vocab_size=259",
        f"model.d_model={d_model}", f"model.d_ff={d_ff}", f"model.n_layers={n_layers}",
        f"moe.num_experts={experts}", f"moe.lattice=[{','.join(map(str, lattice))}]",
        "data.tokenizer=byte"])


def synthetic_path(args, name: str) -> str:
    suffix = "" if args.experts == 64 else f"-e{args.experts}"
    return os.path.join(args.work_dir, f"synthetic-{name}{suffix}")


def _complete(path: str) -> bool:
    return os.path.exists(os.path.join(path, "manifest.json"))


def build_synthetic(path: str, cfg, log, **kw) -> float:
    """Build `path` unless a complete one is there; returns build seconds (0 if reused)."""
    from perspective_jax.export.synthetic import write_synthetic_model_dir
    if _complete(path):
        return 0.0
    t0 = time.perf_counter()
    write_synthetic_model_dir(path, cfg, seed=0, force=True, log=log, **kw)
    return time.perf_counter() - t0


def _derive(src: str, dst: str, transform, label: str, current=None) -> None:
    """`dst` = `src` with its shared file rewritten by transform(tensors, manifest) —
    the expert and delta files are hard links to `src`'s (identical bytes). An
    existing `dst` is reused only if it links `src`'s experts and, when given,
    current(its manifest) holds."""
    from safetensors.numpy import load_file, save_file
    from perspective_jax.modeldir import format as md
    if _complete(dst) and _links(src, dst):
        with open(os.path.join(dst, md.MANIFEST)) as fh:
            if current is None or current(json.load(fh)):
                return
    shutil.rmtree(dst, ignore_errors=True)
    tmp = dst + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    for sub in ("experts", "deltas"):
        os.makedirs(os.path.join(tmp, sub))
        for name in os.listdir(os.path.join(src, sub)):
            os.link(os.path.join(src, sub, name), os.path.join(tmp, sub, name))
    shutil.copy(os.path.join(src, "tokenizer.byte"), tmp)
    with open(os.path.join(src, md.MANIFEST)) as fh:
        manifest = json.load(fh)
    tensors = transform(load_file(os.path.join(src, md.SHARED_FILE)), manifest)
    out = os.path.join(tmp, md.SHARED_FILE)
    save_file(tensors, out)
    manifest["files"][md.SHARED_FILE] = {"bytes": os.path.getsize(out),
                                         "sha256": md.sha256_file(out)}
    manifest["source_run"] += f" ({label})"
    with open(os.path.join(tmp, md.MANIFEST), "w") as fh:
        json.dump(md.seal_manifest(manifest), fh, indent=1)
    os.replace(tmp, dst)


def _links(src: str, dst: str) -> bool:
    """Whether dst's expert files are src's (hard links to the same inodes)."""
    names = sorted(os.listdir(os.path.join(src, "experts")))
    return bool(names) and all(
        os.path.exists(os.path.join(dst, "experts", n))
        and os.path.samefile(os.path.join(src, "experts", n), os.path.join(dst, "experts", n))
        for n in names)


def derive_incoherent(src: str, dst: str, seed: int = 1) -> None:
    """`src` with independent random routers per layer (coherent_routers=False)."""
    import numpy as np

    def transform(tensors, manifest):
        rng = np.random.default_rng(seed)
        d = manifest["config"]["model"]["d_model"]
        for key in sorted(tensors):
            if key.endswith("router/w_route"):
                tensors[key] = rng.normal(0, 1 / np.sqrt(d), tensors[key].shape).astype(
                    np.float32)
        return tensors
    _derive(src, dst, transform, "incoherent routers")


def derive_quantized(src: str, dst: str, bits: int, group_size: int = 64) -> None:
    """`src` with its shared kernels as round-to-nearest `bits`-bit group codes (the
    format `perspective-export --shared-bits` writes); the engine keeps them packed."""
    from perspective_jax.config import PerspectiveConfig
    from perspective_jax.config.loader import from_dict
    from perspective_jax.export.synthetic import rtn_quantized_tensors

    def transform(tensors, manifest):
        cfg = from_dict(PerspectiveConfig, manifest["config"])
        tensors, quantized = rtn_quantized_tensors(cfg, tensors, bits, group_size)
        manifest["shared"].update(bits=bits, group_size=group_size, quantized=quantized,
                                  tensors={k: {"shape": list(v.shape), "dtype": str(v.dtype)}
                                           for k, v in tensors.items()})
        return tensors
    def current(manifest):
        shared = manifest["shared"]
        dtypes = {v["dtype"] for k, v in shared.get("tensors", {}).items()
                  if k.endswith(".scales")}
        return (shared.get("bits") == bits and shared.get("group_size") == group_size
                and dtypes == {"float16"})
    _derive(src, dst, transform, f"{bits}-bit shared weights", current)


def export_quickstart(run_dir: str, out: str, log) -> None:
    from perspective_jax.export.exporter import export_model
    if not _complete(out):
        export_model(run_dir, out, force=True, log=log)


def expert_files(model_dir: str) -> list[str]:
    d = os.path.join(model_dir, "experts")
    return [os.path.join(d, n) for n in sorted(os.listdir(d))]


def preread(model_dir: str) -> tuple[float, float]:
    """Read every expert file once through the page cache; returns (GB, seconds)."""
    total, t0 = 0, time.perf_counter()
    for path in expert_files(model_dir):
        with open(path, "rb", buffering=0) as fh:
            while block := fh.read(64 * MB):
                total += len(block)
    return total / 1e9, time.perf_counter() - t0


def read_bandwidth(model_dir: str, io: str, nbytes: int) -> float:
    """Bytes/s reading region-sized chunks of expert files the way `ExpertStore` does
    (io="mmap": copy out of a memory map; io="direct": the store's own chunked O_DIRECT
    reads, checksum off), over `nbytes` spread across the layer files."""
    import numpy as np
    from perspective_jax.infer.expert_store import ExpertStore
    from perspective_jax.modeldir.manifest import read_manifest
    manifest = read_manifest(model_dir)
    store = ExpertStore(model_dir, manifest, io=io)
    region = store.region_bytes
    layers = manifest["experts"]["layers"]
    per_file = max(1, nbytes // region // len(layers))
    done, t0 = 0, time.perf_counter()
    for layer in layers:
        if io == "mmap":
            mm = np.memmap(os.path.join(model_dir, layer["file"]), np.uint8, mode="r")
            for entry in layer["regions"][:per_file]:
                np.array(mm[entry["offset"]: entry["offset"] + region])
                done += region
            del mm
        else:
            for entry in layer["regions"][:per_file]:
                store._read_direct(layer["file"], entry["offset"], region, hash_it=False)
                done += region
    store.close()
    return done / (time.perf_counter() - t0)


