"""A safetensors file written piece by piece (`export.tensor_file`) is byte for byte the
file `safetensors.numpy.save` writes for the same tensors, whatever order the pieces
come in; a piece of the wrong type, or a tensor left unwritten, is refused."""

import numpy as np
import pytest
from safetensors.numpy import load_file, save

from perspective_jax.export.tensor_file import TensorFile

DTYPES = (np.float32, np.float16, np.float64, np.int8, np.uint8, np.int32, np.int64,
          np.uint16, np.bool_)


def _random_tensors(rng) -> dict:
    out = {}
    for _ in range(rng.integers(1, 10)):
        name = "".join(rng.choice(list("ab/._019zé"), rng.integers(1, 7)))
        shape = tuple(int(n) for n in rng.integers(0, 4, rng.integers(1, 4)))
        out[name] = (rng.normal(size=shape) * 9).astype(rng.choice(DTYPES))
    return out


@pytest.mark.parametrize("seed", range(20))
def test_the_file_is_what_safetensors_writes(tmp_path, seed):
    rng = np.random.default_rng(seed)
    tensors = _random_tensors(rng)
    path = str(tmp_path / "t.safetensors")
    f = TensorFile(path, {k: (v.dtype, v.shape) for k, v in tensors.items()})
    pieces = [(k, (i,)) for k, v in tensors.items() for i in range(v.shape[0])]
    for i in rng.permutation(len(pieces)):             # rows of every tensor, any order
        name, at = pieces[i]
        f.write(name, tensors[name][at], at=at)
    f.close()
    with open(path, "rb") as fh:
        assert fh.read() == save(tensors)
    loaded = load_file(path)
    assert all(np.array_equal(loaded[k], v) for k, v in tensors.items())


def test_a_wrong_piece_or_a_missing_tensor_is_refused(tmp_path):
    f = TensorFile(str(tmp_path / "t"), {"a": (np.float32, (2, 3)), "b": (np.int8, (4,))})
    with pytest.raises(ValueError, match=r"a\[0\]: got float64 \(3,\), the file holds "
                                         r"float32 \(3,\)"):
        f.write("a", np.zeros(3), at=(0,))
    with pytest.raises(ValueError, match="holds int8"):
        f.write("b", np.zeros((2,), np.int8))
    f.write("a", np.zeros((2, 3), np.float32))
    with pytest.raises(RuntimeError, match=r"not written exactly once: \['b'\]"):
        f.close()
