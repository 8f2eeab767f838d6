"""Disk tier: memory-mapped expert regions, hubs and deltas of a model directory.

    store.read_region(j, e[, cancel]) -> uint8 [region_bytes]  (a fresh, aligned host copy)
    store.read_delta(j, src, dst) -> (positions uint32 [n], values uint8 [n]) | None
    store.region_from_delta(base, j, src, dst) -> uint8 [region_bytes]  (dst's region)

Expert layer j's hub (the consensus of its experts, `export.experts.hub_region`) is
region E (`hub(j)`), a delta source like any expert. A delta record is stored as
positions, a byte-change bitmap or (from a hub) changed fields (`modeldir.format`);
`read_delta` decodes each, `delta_bytes` is the record's size on disk.

Every region and delta is checked against its manifest XXH3-128 checksum the
first time it is read; a mismatch raises `ModelDirError` naming the file, expert layer and
expert. `io="direct"` bypasses the page cache (O_DIRECT reads, falling back to
posix_fadvise(DONTNEED) before each read where the file system refuses
O_DIRECT) — for measuring the disk itself. Direct reads go in `READ_CHUNK`
pieces straight into the page-aligned array that is returned (no copy), and a
first read's checksum is computed by a helper thread one chunk behind the disk,
so hashing overlaps the reading instead of following it.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from typing import Optional

import numpy as np
import xxhash

from perspective_jax.config.choices import IO_MODES
from perspective_jax.modeldir import format as md

READ_CHUNK = 1 << 20          # bytes per piece of a region read (O_DIRECT: a multiple
                              # of REGION_ALIGN); a cancel is seen between pieces
ARRAY_ALIGN = 64              # a host array this aligned is aliased, not copied, by the
                              # CPU backend's device_put (measured: 16 and 32 are copied)


class ExpertStore:
    def __init__(self, model_dir: str, manifest: dict, io: str = "mmap"):
        if io not in IO_MODES:
            raise ValueError(f"io must be one of {IO_MODES}, got {io!r}")
        cfg = manifest["config"]["model"]
        self.dir, self.io = model_dir, io
        self.layout = md.RegionLayout(cfg["d_model"], cfg["d_ff"])
        self.layers = manifest["experts"]["layers"]
        self.region_bytes = self.layout.nbytes
        self._maps: dict[int, np.memmap] = {}
        self._deltas: dict[int, np.memmap] = {}
        self._delta_index = [{(d["src"], d["dst"]): d for d in layer["deltas"]}
                             for layer in self.layers]
        self._verified: set = set()
        self._lock = threading.Lock()
        self._hasher = concurrent.futures.ThreadPoolExecutor(1, "expert-checksum")
        self.bytes_read = 0
        # host bytes one region read from the store occupies (its aligned allocation)
        align = md.REGION_ALIGN if io == "direct" else ARRAY_ALIGN
        self.alloc_bytes = -(-self.region_bytes // align) * align + align

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def hub(self, j: int) -> Optional[int]:
        """The index (E, after the experts) of expert layer j's hub — the consensus
        region every expert may have a delta from, which the host cache pins — or None
        (a model directory exported before hubs)."""
        return len(self.layers[j]["regions"]) if "hub" in self.layers[j] else None

    def has_delta(self, j: int, src: int, dst: int) -> bool:
        return (src, dst) in self._delta_index[j]

    def delta_bytes(self, j: int, src: int, dst: int) -> int:
        """Bytes the delta src→dst's record takes on disk (what `read_delta` reads)."""
        return md.delta_entry_bytes(self._delta_index[j][(src, dst)], self.region_bytes)

    def delta_targets(self, j: int, src: int) -> list[int]:
        return [d for (s, d) in self._delta_index[j] if s == src]

    def delta_sources(self, j: int, dst: int) -> list[int]:
        return [s for (s, d) in self._delta_index[j] if d == dst]

    def drop_delta(self, j: int, src: int, dst: int) -> None:
        """Forget a damaged delta: later transfers to `dst` load it in full. The index is
        replaced, not edited, so a lookup on another thread sees the old or new one."""
        with self._lock:
            self._delta_index[j] = {k: v for k, v in self._delta_index[j].items()
                                    if k != (src, dst)}

    def _map(self, cache: dict, j: int, rel: str) -> np.memmap:
        with self._lock:
            if j not in cache:
                path = os.path.join(self.dir, rel)
                cache[j] = (np.memmap(path, np.uint8, mode="r") if os.path.getsize(path)
                            else np.zeros((0,), np.uint8))
            return cache[j]

    def _check(self, key, data, expected: str, what: str, rel: str, digest=None) -> None:
        if key in self._verified:
            return
        if (digest if digest is not None else md.region_digest(data)) != expected:
            raise md.ModelDirError(
                f"{os.path.join(self.dir, rel)}: {what} fails its checksum; the "
                "model directory is corrupt — re-run perspective-export")
        with self._lock:
            self._verified.add(key)

    def read_region(self, j: int, e: int, cancel: Optional[threading.Event] = None
                    ) -> np.ndarray:
        """Region (j, e) as a fresh aligned host array (e = E: the layer's hub). Reads go
        in `READ_CHUNK` pieces; when `cancel` is set between two pieces the read stops
        and `ReadCancelled` is raised (a prefetch that turned out wrong gives the disk
        back)."""
        layer = self.layers[j]
        hub = e == len(layer["regions"]) and "hub" in layer
        entry = layer["hub"] if hub else layer["regions"][e]
        key = ("region", j, e)
        digest = None
        if self.io == "direct":
            data, digest = self._read_direct(layer["file"], entry["offset"], self.region_bytes,
                                             hash_it=key not in self._verified, cancel=cancel,
                                             what=f"expert {e} of expert layer {j}")
        else:
            mm = self._map(self._maps, j, layer["file"])
            data = _aligned_empty(self.region_bytes, ARRAY_ALIGN)[: self.region_bytes]
            src = mm[entry["offset"]: entry["offset"] + self.region_bytes]
            step = self.region_bytes if cancel is None else READ_CHUNK   # one copy unless
            for a in range(0, self.region_bytes, step):                  # it may be cancelled
                if cancel is not None and cancel.is_set():
                    self._count_read(a)
                    raise ReadCancelled(f"{layer['file']} at {entry['offset'] + a}")
                data[a: a + step] = src[a: a + step]
        self._check(key, data, entry[md.REGION_CHECKSUM],
                    f"the hub of expert layer {j}" if hub else f"expert {e} of expert layer {j}",
                    layer["file"], digest)
        self._count_read(self.region_bytes)
        return data

    def _count_read(self, nbytes: int) -> None:
        with self._lock:                      # reads may run on two tier threads
            self.bytes_read += nbytes

    def read_delta(self, j: int, src: int, dst: int, base=None):
        """(positions uint32 [n], values uint8 [n]) of the delta src→dst of expert layer
        j, whatever its encoding, or None when there is none; a "fields" record (from a
        hub) decodes against `base`, src's region."""
        entry = self._delta_index[j].get((src, dst))
        if entry is None:
            return None
        rel = self.layers[j]["delta_file"]
        mm = self._map(self._deltas, j, rel)
        nbytes = md.delta_entry_bytes(entry, self.region_bytes)
        raw = np.array(mm[entry["offset"]: entry["offset"] + nbytes])
        what = f"delta {src}->{dst} of expert layer {j}"
        self._check(("delta", j, src, dst), raw, entry[md.REGION_CHECKSUM], what, rel)
        self._count_read(nbytes)
        try:
            return md.parse_delta(raw, md.delta_encoding(entry), int(entry["count"]),
                                  self.region_bytes,
                                  None if base is None else np.asarray(base)[: self.region_bytes])
        except ValueError as err:
            raise md.ModelDirError(f"{os.path.join(self.dir, rel)}: {what}: {err}; "
                                   "re-run perspective-export") from None

    def region_from_delta(self, base, j: int, src: int, dst: int) -> np.ndarray:
        """Expert dst's region of layer j built on the host from `base` (src's region,
        numpy or a host jax array; not changed) and the delta src→dst read from disk;
        checked against dst's region checksum, so a wrong base or a damaged delta
        raises `ModelDirError` instead of giving wrong codes."""
        positions, values = self.read_delta(j, src, dst, base)
        region = _aligned_empty(self.region_bytes, ARRAY_ALIGN)[: self.region_bytes]
        region[:] = np.asarray(base)
        region[positions] = values
        entry = self.layers[j]["regions"][dst]
        if md.region_digest(region) != entry[md.REGION_CHECKSUM]:
            raise md.ModelDirError(
                f"{os.path.join(self.dir, self.layers[j]['delta_file'])}: delta {src}->{dst} "
                f"of expert layer {j} applied on the host does not give expert {dst}'s "
                "region checksum")
        return region

    def _read_direct(self, rel: str, offset: int, nbytes: int, hash_it: bool,
                     cancel: Optional[threading.Event] = None, what: str = "region"):
        """(uint8 [nbytes] view of a page-aligned buffer, checksum hex or None); `what`
        names the region in the error a truncated file raises."""
        path = os.path.join(self.dir, rel)
        buf = _aligned_empty(nbytes, md.REGION_ALIGN)       # O_DIRECT needs a page
        size = buf.size
        hasher = xxhash.xxh3_128() if hash_it else None
        pending = None
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        except OSError:
            fd = None
        try:
            if fd is None:                              # no O_DIRECT: drop cached pages
                fd = os.open(path, os.O_RDONLY)
                os.posix_fadvise(fd, offset, size, os.POSIX_FADV_DONTNEED)
            got = 0
            for a in range(0, size, READ_CHUNK):
                if cancel is not None and cancel.is_set():
                    self._count_read(got)
                    raise ReadCancelled(f"{rel} at {offset + a}")
                b = min(a + READ_CHUNK, size)
                n = os.preadv(fd, [memoryview(buf[a:b])], offset + a)
                got += n
                if hasher is not None:                  # hash this chunk while reading on
                    pending = self._hasher.submit(hasher.update, buf[a: min(a + n, nbytes)])
                if n < b - a:
                    break
        finally:
            if fd is not None:
                os.close(fd)
            if pending is not None:
                pending.result()                        # single worker: all updates done
        if got < nbytes:
            raise md.ModelDirError(f"{path}: short read of {what} at offset {offset} ({got} "
                                   f"of {nbytes} bytes); the file is truncated — re-export")
        return buf[:nbytes], (hasher.hexdigest() if hasher is not None else None)

    def close(self) -> None:
        self._hasher.shutdown(wait=True)
        self._maps.clear()
        self._deltas.clear()


class ReadCancelled(Exception):
    """A region read stopped between two pieces because its caller cancelled it."""


def _aligned_empty(nbytes: int, align: int) -> np.ndarray:
    """uint8 [nbytes rounded up to `align`] starting on an `align` boundary."""
    size = -(-nbytes // align) * align
    raw = np.empty(size + align, np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start: start + size]
