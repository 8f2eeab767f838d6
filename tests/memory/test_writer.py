"""One writer per memory file: no lost update between processes or threads, a holder
named after the timeout, readers never see a damaged file, saves only on change."""

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from perspective_jax.errors import UserError
from perspective_jax.memory import hypervector as hv
from perspective_jax.memory.memory_file import load
from perspective_jax.memory.store import MemoryParams
from perspective_jax.memory.writer import lock_path, memory_writer

P = MemoryParams(dim=256, n_banks=4, seed=0)
CENTRE = np.zeros(4, np.float32)

# argv: path, tag, sessions, dim, banks. Waits for a line on stdin (a start barrier),
# then adds one entry per writer session, pausing inside each so that sessions of
# two processes would interleave without the lock.
ADDER = r"""
import sys, time
import numpy as np
from perspective_jax.memory import hypervector as hv
from perspective_jax.memory.store import MemoryParams
from perspective_jax.memory.writer import memory_writer
path, tag, k, dim, banks = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
p = MemoryParams(dim=dim, n_banks=banks, seed=0)
rng = np.random.default_rng(sum(map(ord, tag)))
print("ready", flush=True)
sys.stdin.readline()
for i in range(k):
    with memory_writer(path, params=p, model="m", centre=np.zeros(4, np.float32),
                       timeout=60) as mf:
        key, value = hv.random(rng, 2, dim)
        time.sleep(0.005)
        mf.memory.add(key, value, key=f"{tag}-{i}", value=f"{tag} value {i}")
"""

# argv: path. Holds the lock until a line arrives on stdin, then 0.3 s more.
HOLDER = r"""
import sys, time
from perspective_jax.memory.writer import memory_writer
with memory_writer(sys.argv[1], timeout=5):
    print("held", flush=True)
    sys.stdin.readline()
    time.sleep(0.3)
"""


def _start(script, *args):
    proc = subprocess.Popen([sys.executable, "-c", script, *map(str, args)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return proc


def _finish(proc):
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out


def _new(path, n=0, seed=0):
    rng = np.random.default_rng(seed)
    with memory_writer(str(path), params=P, model="m", centre=CENTRE) as mf:
        for i in range(n):
            key, value = hv.random(rng, 2, P.dim)
            mf.memory.add(key, value, key=f"start-{i}", value=str(i))


def test_two_writer_processes_lose_no_update(tmp_path):
    path, k = tmp_path / "m.hdm", 15
    procs = [_start(ADDER, path, tag, k, P.dim, P.n_banks) for tag in ("a", "b")]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready"
    for proc in procs:                       # start both together
        proc.stdin.write("go\n")
        proc.stdin.flush()
    for proc in procs:
        _finish(proc)
    mem = load(str(path)).memory
    assert len(mem) == 2 * k and mem.next_id == 2 * k
    assert sorted(key for key, _ in mem.texts) == sorted(
        f"{tag}-{i}" for tag in "ab" for i in range(k))
    assert not os.path.exists(lock_path(str(path)))


def test_a_writer_past_the_timeout_names_the_holder_then_gets_its_turn(tmp_path):
    path = str(tmp_path / "m.hdm")
    _new(path, 2)
    proc = _start(HOLDER, path)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(UserError) as err:
            with memory_writer(path, timeout=0.3):
                pass
        msg = str(err.value)
        assert f"PID {proc.pid}" in msg and "still locked after 0.3 s" in msg
        assert msg.startswith(f"memory file {path} is in use by") and "\n" not in msg
        proc.stdin.write("release\n")
        proc.stdin.flush()
        with memory_writer(path, timeout=30) as mf:      # retries until it is released
            mf.memory.add(*hv.random(np.random.default_rng(9), 2, P.dim), key="after")
    finally:
        _finish(proc)
    assert load(path).memory.find("after") is not None


def test_a_reader_never_sees_a_damaged_file_while_a_writer_saves(tmp_path):
    path, sessions = tmp_path / "m.hdm", 30
    big = MemoryParams(dim=4096, n_banks=64, seed=0)    # ~0.1 MB written per save
    proc = _start(ADDER, path, "w", sessions, big.dim, big.n_banks)
    try:
        assert proc.stdout.readline().strip() == "ready"
        with memory_writer(str(path), params=big, model="m", centre=CENTRE):
            pass                                         # the file exists, empty
        proc.stdin.write("go\n")
        proc.stdin.flush()
        seen, reads = [], 0
        while proc.poll() is None and reads < 5000:     # bounded: the writer ends
            mem = load(str(path)).memory                 # never a one-line error
            assert [k for k, _ in mem.texts] == [f"w-{i}" for i in range(len(mem))]
            seen.append(len(mem))
            reads += 1
    finally:
        _finish(proc)
    assert seen == sorted(seen) and reads > 0
    assert len(load(str(path)).memory) == sessions


def test_threads_of_one_process_take_turns(tmp_path):
    path, k = str(tmp_path / "m.hdm"), 10
    _new(path)

    def adder(tag):
        rng = np.random.default_rng(ord(tag))
        for i in range(k):
            with memory_writer(path, timeout=30) as mf:
                key, value = hv.random(rng, 2, P.dim)
                mf.memory.add(key, value, key=f"{tag}-{i}", value=str(i))

    threads = [threading.Thread(target=adder, args=(t,)) for t in "xyz"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(load(path).memory) == 3 * k


def test_saves_only_a_new_or_changed_memory_and_nothing_after_an_error(tmp_path):
    path = str(tmp_path / "m.hdm")
    with pytest.raises(UserError, match="no such file"):
        with memory_writer(path):                    # no creation parameters
            pass
    assert not os.path.exists(path) and not os.path.exists(lock_path(path))
    with memory_writer(path, params=P, model="m", centre=CENTRE) as mf:
        assert len(mf.memory) == 0
    assert load(path).model == "m"                   # created: saved though empty
    ino = os.stat(path).st_ino
    with memory_writer(path, params=P, model="m", centre=CENTRE) as mf:
        assert mf.memory.params == P                 # loaded, not re-created
    assert os.stat(path).st_ino == ino               # unchanged: not rewritten
    before = open(path, "rb").read()
    with pytest.raises(RuntimeError):
        with memory_writer(path) as mf:
            mf.memory.add(*hv.random(np.random.default_rng(1), 2, P.dim), key="lost")
            raise RuntimeError("the caller failed")
    assert open(path, "rb").read() == before and not os.path.exists(lock_path(path))
    with memory_writer(path) as mf:
        row = mf.memory.add(*hv.random(np.random.default_rng(1), 2, P.dim), key="kept")
    with memory_writer(path) as mf:
        mf.memory.remove_rows([mf.memory.find("kept")])
    assert row == 0 and len(load(path).memory) == 0 and load(path).memory.next_id == 1


def test_misuse_is_a_one_line_error(tmp_path):
    path = str(tmp_path / "m.hdm")
    _new(path)
    with memory_writer(path):
        with pytest.raises(UserError, match="already open for writing in this thread"):
            with memory_writer(path):
                pass
    with pytest.raises(UserError, match="does not exist"):
        with memory_writer(str(tmp_path / "no" / "m.hdm"), params=P, centre=CENTRE):
            pass
    with pytest.raises(UserError, match="timeout"):
        with memory_writer(path, timeout=-1):
            pass
