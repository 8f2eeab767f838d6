"""The exported model directory: layout, manifest, expert regions and deltas (SPEC §3.5).

    MODEL_DIR/
      manifest.json           format + version, resolved config, tokenizer, tensor
                              index, expert/delta index, routing frequencies,
                              XXH3-128 of every region and delta, byte size and
                              sha256 of every file, and the sha256 of its own
                              content (`manifest_digest`); written last
      shared.safetensors      every non-expert weight (float32, or 2-bit GPTQ
                              groups for the shared kernels) + expert_scales/<matrix>
                              [L, E, S]: one scale per matrix (S = 1) or per output
                              feature (S = N, ternary.scale_granularity=row)
      tokenizer.model | tokenizer.byte
      chat_template.jinja     the Jinja chat template a server formats conversations
                              with (`modeldir.chat_template`); the manifest's
                              "chat_template" entry names it and where it came from
                              (absent in directories exported before it existed)
      polytope.spp            the safety polytope (SPEC §3.9, `safety.polytope_file`),
                              when the export was given one; the manifest's "safety"
                              entry names it, its format version, flagged strings and
                              row counts (absent without a polytope)
      experts/layer_LLL.bin   E regions, one per expert of expert layer LLL, then its hub
      deltas/layer_LLL.bin    byte deltas between lattice-neighbour experts and from
                              the hub (source index E) to each expert

Expert layer j enumerates the routed (PDR) layers in execution order: period p,
pattern position i. A region holds the 2-bit codes of W_gate [d, f], W_up
[d, f], W_down [f, d], each packed along its input axis four trits per byte
(`kernels_pallas.ternary_matmul.pack_rows_2bit`), so the device computes on it
directly; regions are padded to `REGION_ALIGN` bytes (page- and O_DIRECT-aligned).
A delta src→dst lists the byte positions where dst's region differs from src's
and dst's bytes there: applying it to src's codes gives dst's codes exactly. Its
record (padded to 4 bytes) takes one of these encodings, whichever is smallest for
n changed bytes (m changed 2-bit fields) of a region of R bytes:

    "positions": uint32 LE positions [n], then the values uint8 [n]      5n bytes
    "bitmap":    bit i of byte i//8 (LSB first) set where byte i changes [⌈R/8⌉],
                 then the values uint8 [n] in position order              ⌈R/8⌉ + n
    "fields":    the bitmap, then per changed byte a 4-bit mask of its changed
                 fields (low nibble first) [⌈n/2⌉], then per changed field one bit
                 (LSB first): the new code is the larger (1) or smaller (0) of the
                 two codes 0..2 other than the old one [⌈m/8⌉]     ⌈R/8⌉ + ⌈n/2⌉ + ⌈m/8⌉

(bitmap wins over positions for n > R/32). "fields" needs the source region to
decode and is written only for deltas from a hub, which only the host applies. A
delta entry names its "encoding" and record "bytes" ("fields" entries also
"fields": m); entries of format 5 have neither and are positions.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Optional

import numpy as np
import xxhash

from perspective_jax.errors import UserError
from perspective_jax.fileio import naming, seal, sha256_bytes, sha256_file  # noqa: F401  (re-exported)

FORMAT_NAME = "perspective-model"
FORMAT_VERSION = 7   # 2: per-matrix expert scale tensors (expert_scales/<matrix>);
                     # 3: region and delta checksums are XXH3-128 ("xxh3_128");
                     # 4: shared/embedding says "float32" or "int8" (+ row scales);
                     # 5: the manifest carries a sha256 of its own content;
                     # 6: delta entries name their "encoding" and record "bytes"
                     # 7: a per-layer hub region (source index E) and "fields" records
READABLE_VERSIONS = (5, 6, 7)   # older manifests cannot be verified: refused, re-export
MANIFEST_CHECKSUM = "manifest_sha256"   # manifest key of its own content's sha256
HUB_VERSION = 7      # the first format with hubs and "fields" records
REGION_CHECKSUM = "xxh3_128"   # manifest key of a region's / delta's checksum
MANIFEST = "manifest.json"
SHARED_FILE = "shared.safetensors"
EXPERT_SCALES = "expert_scales"      # expert_scales/<matrix>: [L, E, S], S = 1 or N
REGION_ALIGN = 4096
DELTA_POSITIONS, DELTA_BITMAP, DELTA_FIELDS = "positions", "bitmap", "fields"
DELTA_ENCODINGS = (DELTA_POSITIONS, DELTA_BITMAP, DELTA_FIELDS)
EXPERT_MATRICES = ("w_gate", "w_up", "w_down")
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_KEY = "chat_template"   # manifest entry: {"file": ..., "source": ...}
SAFETY_KEY = "safety"                 # manifest entry: {"file": ..., "format_version": ...,
#                                       "flagged": [...], "support_rows", "flagged_rows", "eps"}


class ModelDirError(UserError):
    """A model directory that is missing, incomplete, corrupt or of another version."""


def scale_key(matrix: str) -> str:
    return f"{EXPERT_SCALES}/{matrix}"


def expert_file(j: int) -> str:
    return os.path.join("experts", f"layer_{j:03d}.bin")


def delta_file(j: int) -> str:
    return os.path.join("deltas", f"layer_{j:03d}.bin")


@dataclasses.dataclass(frozen=True)
class RegionLayout:
    """Byte layout of one expert's packed region: three 2-bit code matrices."""

    d_model: int
    d_ff: int

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        """Packed [ceil(K/4), N] shape of each matrix."""
        d, f = self.d_model, self.d_ff
        return {"w_gate": (math.ceil(d / 4), f), "w_up": (math.ceil(d / 4), f),
                "w_down": (math.ceil(f / 4), d)}

    @property
    def offsets(self) -> dict[str, int]:
        out, at = {}, 0
        for name, (k4, n) in self.shapes.items():
            out[name] = at
            at += k4 * n
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of codes in one region (what a full transfer moves)."""
        return sum(k4 * n for k4, n in self.shapes.values())

    @property
    def stride(self) -> int:
        """Bytes one region occupies in an expert file (padded)."""
        return -(-self.nbytes // REGION_ALIGN) * REGION_ALIGN

    def split(self, region: np.ndarray) -> dict[str, np.ndarray]:
        """Flat uint8 region → {name: [ceil(K/4), N] uint8 view}."""
        return {name: region[off: off + k4 * n].reshape(k4, n)
                for (name, (k4, n)), off in zip(self.shapes.items(), self.offsets.values())}


def pack_region(trits: dict[str, np.ndarray], layout: RegionLayout) -> np.ndarray:
    """{'w_gate': [d, f], 'w_up': [d, f], 'w_down': [f, d]} trits → flat uint8 codes."""
    from kernels_pallas.ternary_matmul import pack_rows_2bit
    parts = []
    for name, shape in layout.shapes.items():
        packed = pack_rows_2bit(trits[name])
        if packed.shape != shape:
            raise ValueError(f"{name}: packed shape {packed.shape}, expected {shape}")
        parts.append(packed.reshape(-1))
    return np.concatenate(parts)


def encode_delta(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Byte positions where dst differs from src (uint32) and dst's bytes there."""
    pos = np.flatnonzero(src != dst).astype(np.uint32)
    return pos, dst[pos]


def apply_delta(region: np.ndarray, positions: np.ndarray, values: np.ndarray) -> np.ndarray:
    """A copy of `region` (numpy, or any array `np.array` copies) with `values` written
    at `positions`."""
    out = np.array(region, np.uint8, copy=True)
    out[positions] = values
    return out


def delta_record_bytes(encoding: str, count: int, region_bytes: int, fields: int = 0) -> int:
    """Bytes a delta record of `count` changed bytes (`fields` changed 2-bit fields)
    takes on disk (padded to 4)."""
    if encoding == DELTA_POSITIONS:
        raw = 5 * count
    elif encoding == DELTA_BITMAP:
        raw = -(-region_bytes // 8) + count
    elif encoding == DELTA_FIELDS:
        raw = -(-region_bytes // 8) + -(-count // 2) + -(-fields // 8)
    else:
        raise ValueError(f"unknown delta encoding {encoding!r} (one of {DELTA_ENCODINGS})")
    return raw + (-raw) % 4


def smaller_encoding(count: int, region_bytes: int, fields: int = -1) -> str:
    """The encoding whose record is smallest for `count` changed bytes (positions, then
    bitmap, on a tie); "fields" is a candidate only when `fields` (the changed 2-bit
    fields) is given — a delta from a hub whose codes are all trits."""
    encodings = DELTA_ENCODINGS if fields >= 0 else (DELTA_POSITIONS, DELTA_BITMAP)
    return min(encodings, key=lambda enc: delta_record_bytes(enc, count, region_bytes,
                                                              max(fields, 0)))


def changed_fields(src: np.ndarray, dst: np.ndarray) -> int:
    """The number of 2-bit fields where dst differs from src, or −1 when a changed
    field holds code 3 (not a trit: "fields" cannot encode it)."""
    x = np.bitwise_xor(src, dst)
    n = 0
    for shift in (0, 2, 4, 6):
        changed = ((x >> shift) & 3) != 0
        if ((((src >> shift) & 3) == 3) & changed).any() or \
                ((((dst >> shift) & 3) == 3) & changed).any():
            return -1
        n += int(changed.sum())
    return n


def delta_encoding(entry: dict) -> str:
    """A manifest delta entry's encoding (format 5 entries name none: positions)."""
    return entry.get("encoding", DELTA_POSITIONS)


def delta_entry_bytes(entry: dict, region_bytes: int) -> int:
    """A manifest delta entry's record size on disk."""
    return delta_record_bytes(delta_encoding(entry), int(entry["count"]), region_bytes,
                              int(entry.get("fields", 0)))


_SHIFTS = np.arange(0, 8, 2, dtype=np.uint8)                     # the 4 fields of a byte


def delta_record(positions: np.ndarray, values: np.ndarray, encoding: str = DELTA_POSITIONS,
                 region_bytes: int = 0, src: np.ndarray = None) -> bytes:
    """The record of a delta (`encode_delta`'s sorted positions and values) in
    `encoding`, padded to 4 bytes; bitmap and fields need `region_bytes`, fields the
    source region `src`."""
    values = np.asarray(values, np.uint8)
    if encoding == DELTA_POSITIONS:
        raw = np.asarray(positions).astype("<u4").tobytes() + values.tobytes()
    elif encoding in (DELTA_BITMAP, DELTA_FIELDS):
        mask = np.zeros(region_bytes, bool)
        mask[positions] = True
        raw = np.packbits(mask, bitorder="little").tobytes()
        if encoding == DELTA_BITMAP:
            raw += values.tobytes()
        else:
            old = (np.asarray(src)[positions][:, None] >> _SHIFTS) & 3        # [n, 4]
            new = (values[:, None] >> _SHIFTS) & 3
            changed = old != new
            nibbles = (changed.astype(np.uint8) << np.arange(4, dtype=np.uint8)).sum(1)
            nibbles = np.concatenate([nibbles, np.zeros(len(nibbles) % 2, np.uint8)])
            raw += (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8).tobytes()
            larger = new[changed] == np.where(old[changed] == 2, 1, 2)
            raw += np.packbits(larger, bitorder="little").tobytes()
    else:
        raise ValueError(f"unknown delta encoding {encoding!r} (one of {DELTA_ENCODINGS})")
    return raw + b"\0" * ((-len(raw)) % 4)


def parse_delta(buf, encoding: str, count: int, region_bytes: int, src=None
                ) -> tuple[np.ndarray, np.ndarray]:
    """(positions uint32 [count] ascending, values uint8 [count]) of a record read
    whole (`buf`, as `delta_record` wrote it); "fields" needs the source region `src`."""
    buf = np.frombuffer(buf, np.uint8)
    if encoding == DELTA_POSITIONS:
        return buf[: 4 * count].view("<u4"), buf[4 * count: 5 * count]
    if encoding not in (DELTA_BITMAP, DELTA_FIELDS):
        raise ValueError(f"unknown delta encoding {encoding!r} (one of {DELTA_ENCODINGS})")
    head = -(-region_bytes // 8)
    mask = np.unpackbits(buf[:head], count=region_bytes, bitorder="little").view(bool)
    # (nonzero of a bool array is ~5x faster than of uint8 0/1s)
    positions = np.flatnonzero(mask).astype(np.uint32)
    if len(positions) != count:
        raise ValueError(f"bitmap delta marks {len(positions)} bytes, its entry {count}")
    if encoding == DELTA_BITMAP:
        return positions, buf[head: head + count]
    if src is None:
        raise ValueError("a 'fields' delta needs its source region to decode")
    packed = buf[head: head + -(-count // 2)]
    nibbles = np.empty(2 * len(packed), np.uint8)
    nibbles[0::2], nibbles[1::2] = packed & 15, packed >> 4
    nibbles = nibbles[:count]
    # byte i's field bits start at bit `first` of the bit stream: ≤ 4 of them, read
    # as a 16-bit window; the new byte is one table lookup (nibble, old byte, window)
    first = np.cumsum(_POPCOUNT[nibbles], dtype=np.uint32)
    first -= _POPCOUNT[nibbles]
    stream = np.zeros(len(buf) - head - len(packed) + 2, np.uint16)
    stream[:-2] = buf[head + len(packed):]
    at = first >> 3
    window = ((stream[at] | (stream[at + 1] << 8)) >> (first & 7).astype(np.uint16)) & 15
    base = np.asarray(src)[positions].astype(np.uint16)
    return positions, _fields_table()[(nibbles.astype(np.uint16) << 12) | (base << 4) | window]


_POPCOUNT = np.array([bin(i).count("1") for i in range(16)], np.uint8)


@functools.cache
def _fields_table() -> np.ndarray:
    """uint8 [16·256·16]: the new byte for (changed-field nibble, old byte, the next 4
    bits of the stream); each changed field, lowest first, takes one bit: 1 → the
    larger of the two other trit codes, 0 → the smaller."""
    nib = np.arange(16)[:, None, None]
    old = np.arange(256)[None, :, None]
    bits = np.arange(16)[None, None, :]
    out, used = np.broadcast_to(old, (16, 256, 16)).copy(), np.zeros((16, 256, 16), int)
    for f in range(4):
        changed = ((nib >> f) & 1).astype(bool)
        code = (old >> (2 * f)) & 3
        larger = ((bits >> used) & 1).astype(bool)
        new = np.where(larger, np.where(code == 2, 1, 2), np.where(code == 0, 1, 0))
        out = np.where(changed, (out & ~(3 << (2 * f))) | (new << (2 * f)), out)
        used = used + changed
    return out.astype(np.uint8).reshape(-1)


def region_digest(data) -> str:
    """XXH3-128 hex digest of a region or delta record: a corruption check fast
    enough (~25 GB/s on one core) to run on every first read while decoding;
    sha256 (~1.8 GB/s) cost 4.8 ms of CPU per 8.45 MB region."""
    return xxhash.xxh3_128_hexdigest(memoryview(data))


def embedding_format(manifest: dict) -> str:
    """'float32' or 'int8': how the tied embedding is stored."""
    return manifest["shared"].get("embedding", "float32")


def manifest_digest(manifest: dict) -> str:
    """sha256 of a manifest's content without its own checksum (`fileio.seal`)."""
    return seal(manifest, MANIFEST_CHECKSUM)[MANIFEST_CHECKSUM]


def seal_manifest(manifest: dict) -> dict:
    """`manifest` with its content checksum (MANIFEST_CHECKSUM) set."""
    return {**manifest, MANIFEST_CHECKSUM: manifest_digest(manifest)}


def write_manifest(out: str, config: dict, source: str, shared: dict, experts_index: list,
                   routing_frequencies=None, chat_template: Optional[dict] = None,
                   safety: Optional[dict] = None) -> dict:
    """Hash every file under `out` and write the sealed manifest (the last file
    written); `chat_template` ({"file", "source"}) becomes its CHAT_TEMPLATE_KEY entry,
    `safety` (the polytope's {"file", ...}) its SAFETY_KEY entry.
    An OSError (a full disk) propagates with its file name."""
    files = {}
    for root, _, names in os.walk(out):
        for name in sorted(names):
            full = os.path.join(root, name)
            files[os.path.relpath(full, out)] = {"bytes": os.path.getsize(full),
                                                 "sha256": sha256_file(full)}
    layout = RegionLayout(config["model"]["d_model"], config["model"]["d_ff"])
    manifest = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source_run": source, "config": config,
        "tokenizer": "byte" if os.path.exists(os.path.join(out, "tokenizer.byte"))
        else "sentencepiece",
        "shared": shared,
        "experts": {"format": "ternary-2bit-rows", "region_bytes": layout.nbytes,
                    "region_stride": layout.stride, "layers": experts_index},
        "routing_frequencies": (None if routing_frequencies is None
                                else np.round(routing_frequencies, 6).tolist()),
        "files": files,
    }
    if chat_template is not None:
        manifest[CHAT_TEMPLATE_KEY] = chat_template
    if safety is not None:
        manifest[SAFETY_KEY] = safety
    manifest = seal_manifest(manifest)
    path = os.path.join(out, MANIFEST)
    with naming(path), open(path, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=1)
    return manifest
