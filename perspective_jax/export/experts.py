"""The experts of a model directory: ternarised, packed and written one layer at a time.

    trits, scale = ternary_experts(w)      # [..., K, N] float → int8 [..., K, N], [..., S]
    writer = ExpertWriter(out, layout, lattice, delta_max_share)
    entry = writer.layer(j, regions)       # experts/j and deltas/j; the manifest entry
    writer.summary(log)

Experts are the exact ternary values the trained model computes with:
trits = clip(round(W / (mean|W| + ε)), −1, 1), scale = mean|W| per matrix (or per
output feature; `quant.ternary.ternary_codes`), computed one expert matrix [K, N]
at a time, so the working memory is one matrix whatever the layer's size, and
export and its references (`exporter.with_ternary_experts`) agree bit for bit.
A layer's regions are written to experts/layer_j.bin; the neighbour deltas between
its lattice neighbours go to deltas/layer_j.bin, and so do the deltas from the
layer's hub (`hub_region`: the per-trit majority of its experts, written after them
in experts/layer_j.bin and pinned in the engine's host cache) to every expert, so a
load the host cache misses can read a delta rather than a region; each in the
smallest of its encodings (`modeldir.format`: positions, byte-change bitmap, or —
from a hub — changed fields) and kept when that record is at most
`delta_max_share` of a region.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from perspective_jax.fileio import naming
from perspective_jax.modeldir import format as md
from perspective_jax.moe import torus
from perspective_jax.quant.ternary import ternary_codes


@functools.partial(jax.jit, static_argnums=1)
def _codes(w, granularity: str):
    trits, scale = ternary_codes(w, granularity)
    return trits.astype(jnp.int8), scale[0]


def ternary_experts(w, granularity: str = "tensor") -> tuple[np.ndarray, np.ndarray]:
    """[..., K, N] float → (trits int8 [..., K, N], scale float32 [..., S]),
    S = 1 (per matrix) or N (per output feature); one matrix at a time."""
    w = np.asarray(w)
    lead, (k, n) = w.shape[:-2], w.shape[-2:]
    trits = np.empty(w.shape, np.int8)
    scale = np.empty((*lead, 1 if granularity == "tensor" else n), np.float32)
    for i in np.ndindex(*lead):
        t, s = _codes(jnp.asarray(w[i], jnp.float32), granularity)
        trits[i], scale[i] = np.asarray(t), np.asarray(s)
    return trits, scale


def exact_value(trits: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The float32 weights the ternary model computes with: trits · scale."""
    return trits.astype(np.float32) * scale[..., None, :]


def ternary_layer(ffn: dict, granularity: str, layout: md.RegionLayout):
    """Ternarise one routed FFN's experts ({name: [E, K, N]}); returns (its E packed
    regions, {name: scale [E, S]}) and replaces each matrix in `ffn` by its exact
    ternary value (a new array: the caller's arrays are not changed)."""
    trits, scales = {}, {}
    for name in md.EXPERT_MATRICES:
        trits[name], scales[name] = ternary_experts(ffn[name], granularity)
        ffn[name] = exact_value(trits[name], scales[name])
    n_experts = len(trits[md.EXPERT_MATRICES[0]])
    regions = [md.pack_region({n: trits[n][x] for n in md.EXPERT_MATRICES}, layout)
               for x in range(n_experts)]
    return regions, scales


def hub_region(regions, chunk: int = 1 << 16) -> np.ndarray:
    """The layer's hub: per 2-bit trit field, the code most of its E regions hold
    (ties: the smallest code) — the region nearest to all of them in trits (a sum of
    per-field mismatches is smallest at the per-field majority). regions: E flat uint8
    arrays of B bytes; done `chunk` bytes at a time, so the working memory beyond the
    regions is E × chunk bytes, never a second copy of the layer."""
    regions = [np.asarray(r) for r in regions]
    out = np.zeros(regions[0].shape[0], np.uint8)
    for lo in range(0, out.shape[0], chunk):
        block = np.stack([r[lo: lo + chunk] for r in regions])            # [E, b]
        for shift in (0, 2, 4, 6):
            field = (block >> shift) & 3                                  # [E, b]
            counts = np.stack([(field == v).sum(0) for v in range(4)])    # [4, b]
            out[lo: lo + chunk] |= (counts.argmax(0).astype(np.uint8) << shift)
    return out


class ExpertWriter:
    """Writes experts/ and deltas/ one expert layer at a time (`layer`)."""

    def __init__(self, out: str, layout: md.RegionLayout, lattice, delta_max_share: float):
        self.out, self.layout, self.delta_max_share = out, layout, delta_max_share
        pairs = torus.neighbour_pairs(tuple(lattice))
        self.directed = ([(int(a), int(b)) for a, b in pairs]
                         + [(int(b), int(a)) for a, b in pairs])
        for sub in ("experts", "deltas"):
            with naming(os.path.join(out, sub)):
                os.makedirs(os.path.join(out, sub))
        self.n_layers = self.n_experts = self.n_deltas = self.delta_bytes = self.bitmaps = 0
        self.hub_deltas = self.field_records = 0

    def layer(self, j: int, regions) -> dict:
        """Write layer j's regions (E flat uint8 arrays) and its hub (their consensus,
        region E of the file), the neighbour deltas and the deltas from the hub;
        returns its manifest index entry."""
        layout, entries, n = self.layout, [], len(regions)
        hub = hub_region(regions)
        path = os.path.join(self.out, md.expert_file(j))
        with naming(path), open(path, "wb") as fh:
            for x, region in enumerate([*regions, hub]):
                entries.append({"expert": x, "offset": x * layout.stride,
                                md.REGION_CHECKSUM: md.region_digest(region)})
                fh.write(region.tobytes() + b"\0" * (layout.stride - layout.nbytes))
        hub_entry = entries.pop()
        del hub_entry["expert"]
        deltas, from_hub = [], 0
        sources = [*regions, hub]
        pairs = self.directed + [(n, b) for b in range(n)]          # n: the hub
        path = os.path.join(self.out, md.delta_file(j))
        with naming(path), open(path, "wb") as fh:
            at = 0
            for a, b in pairs:
                count = int(np.count_nonzero(sources[a] != regions[b]))
                # "fields" needs its source to decode: only for the hub (host-applied)
                fields = md.changed_fields(sources[a], regions[b]) if a == n else -1
                encoding = md.smaller_encoding(count, layout.nbytes, fields)
                size = md.delta_record_bytes(encoding, count, layout.nbytes, max(fields, 0))
                if size > self.delta_max_share * layout.nbytes:
                    continue                      # cheaper to move the full region
                pos, val = md.encode_delta(sources[a], regions[b])
                rec = md.delta_record(pos, val, encoding, layout.nbytes, sources[a])
                deltas.append({"src": a, "dst": b, "offset": at, "count": count,
                               "encoding": encoding, "bytes": len(rec),
                               md.REGION_CHECKSUM: md.region_digest(rec),
                               **({"fields": fields} if encoding == md.DELTA_FIELDS else {})})
                fh.write(rec)
                at += len(rec)
                self.delta_bytes += len(rec)
                self.bitmaps += encoding == md.DELTA_BITMAP
                self.field_records += encoding == md.DELTA_FIELDS
                from_hub += a == n
        self.n_deltas += len(deltas) - from_hub
        self.hub_deltas += from_hub
        self.n_layers, self.n_experts = self.n_layers + 1, len(regions)
        return {"layer": j, "file": md.expert_file(j), "regions": entries,
                "delta_file": md.delta_file(j), "deltas": deltas, "hub": hub_entry}

    def summary(self, log=print) -> None:
        log(f"experts: {self.n_layers} layers × {self.n_experts} experts, "
            f"{self.layout.nbytes / 1e6:.3f} MB per region; {self.n_deltas} of "
            f"{self.n_layers * len(self.directed)} neighbour deltas kept, plus "
            f"{self.hub_deltas} from the layers' hubs ({self.delta_bytes / 1e6:.3f} MB, "
            f"{self.bitmaps} as byte-change bitmaps, {self.field_records} as changed-field "
            "records)")


def write_expert_files(out: str, layout: md.RegionLayout, n_layers: int, lattice,
                       layer_regions, delta_max_share: float, log=print) -> list[dict]:
    """experts/ and deltas/ files for every expert layer; returns the manifest index.

    layer_regions(j) -> list of E flat uint8 regions of expert layer j."""
    writer = ExpertWriter(out, layout, lattice, delta_max_share)
    index = [writer.layer(j, layer_regions(j)) for j in range(n_layers)]
    writer.summary(log)
    return index
