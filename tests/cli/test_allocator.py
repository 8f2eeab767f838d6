"""The allocator choice of the console scripts (`cli.allocator`): every branch of the
pure decision, and a real re-execution in a subprocess."""

import os
import subprocess
import sys

import pytest

from perspective_jax.cli.allocator import (ENV_CHOICE, ENV_DONE, HUGETLB_TUNABLE, JEMALLOC_CONF,
                                           accelerator_installed, allocator_env)

JE = "libjemalloc.so.2"


def decide(env, jemalloc=JE, hugetlb=True, accelerator=False):
    return allocator_env(env, jemalloc=jemalloc, hugetlb=hugetlb, accelerator=accelerator)


def test_auto_prefers_jemalloc_and_keeps_existing_preloads_and_conf():
    env, why = decide({"LD_PRELOAD": "libfoo.so"})
    assert env["LD_PRELOAD"] == f"{JE}:libfoo.so" and env["MALLOC_CONF"] == JEMALLOC_CONF
    assert env[ENV_DONE] == why and "jemalloc" in why
    env, _ = decide({"MALLOC_CONF": "narenas:1"})
    assert env["MALLOC_CONF"] == "narenas:1"          # the user's setting wins


def test_auto_without_jemalloc_uses_the_glibc_tunable_and_keeps_others():
    env, why = decide({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, jemalloc=None)
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{HUGETLB_TUNABLE}"
    assert "LD_PRELOAD" not in env and "hugetlb" in why
    env, _ = decide({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, jemalloc=None)
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=0"      # not overridden


@pytest.mark.parametrize("env,kw,reason", [
    ({ENV_CHOICE: "system"}, {}, "PERSPECTIVE_ALLOCATOR=system"),
    ({}, {"accelerator": True}, "accelerator"),
    ({}, {"jemalloc": None, "hugetlb": False}, "glibc < 2.35"),
    ({ENV_DONE: "jemalloc (x)"}, {}, "jemalloc (x)"),       # already re-executed
])
def test_no_reexecution(env, kw, reason):
    new, why = decide(env, **kw)
    assert new is None and reason in why


def test_explicit_choices():
    env, _ = decide({ENV_CHOICE: "hugetlb"})
    assert HUGETLB_TUNABLE in env["GLIBC_TUNABLES"] and "LD_PRELOAD" not in env
    env, _ = decide({ENV_CHOICE: "jemalloc"}, accelerator=True)     # asked for: applied
    assert env["LD_PRELOAD"] == JE
    with pytest.raises(ValueError, match="no libjemalloc"):
        decide({ENV_CHOICE: "jemalloc"}, jemalloc=None)
    with pytest.raises(ValueError, match="PERSPECTIVE_ALLOCATOR='tcmalloc'"):
        decide({ENV_CHOICE: "tcmalloc"})


def test_accelerator_detection_follows_jax_platforms():
    assert not accelerator_installed({"JAX_PLATFORMS": "cpu"})
    assert accelerator_installed({"JAX_PLATFORMS": "cuda,cpu"})


SCRIPT = ("import os; from perspective_jax.cli.allocator import ensure_fast_allocator; "
          "ensure_fast_allocator(); print(os.environ.get('PERSPECTIVE_ALLOCATOR_APPLIED', '-'))")


def _run(**env):
    full = {k: v for k, v in os.environ.items() if k not in (ENV_DONE, ENV_CHOICE)}
    return subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=60, env={**full, "JAX_PLATFORMS": "cpu", **env})


def test_the_command_is_reexecuted_once_with_the_allocator():
    from perspective_jax.cli.allocator import find_jemalloc, glibc_has_hugetlb
    if not (find_jemalloc() or glibc_has_hugetlb()):
        pytest.skip("neither jemalloc nor glibc >= 2.35 on this machine")
    proc = _run()
    assert proc.returncode == 0, proc.stderr
    assert ("jemalloc" in proc.stdout) or ("hugetlb" in proc.stdout)
    assert _run(PERSPECTIVE_ALLOCATOR="system").stdout.strip() == "-"


def test_a_bad_choice_is_one_line_and_exit_2():
    proc = _run(PERSPECTIVE_ALLOCATOR="tcmalloc")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "PERSPECTIVE_ALLOCATOR" in proc.stderr


def test_console_scripts_go_through_the_launcher():
    """pyproject maps every perspective-* command to `cli.launch`, and the installed
    perspective-train (re-executed with the allocator) still answers --help."""
    import pathlib
    import tomllib
    root = pathlib.Path(__file__).resolve().parents[2]
    scripts = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]
    assert all(target.startswith("perspective_jax.cli.launch:") for target in scripts.values())
    from perspective_jax.cli import launch
    assert all(callable(getattr(launch, t.split(":")[1])) for t in scripts.values())
    exe = pathlib.Path(sys.executable).parent / "perspective-train"
    if not exe.exists():
        pytest.skip("perspective-train is not installed beside this interpreter")
    env = {k: v for k, v in os.environ.items() if k not in (ENV_DONE, ENV_CHOICE)}
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120,
                          env={**env, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0 and "--stage" in proc.stdout, proc.stderr
