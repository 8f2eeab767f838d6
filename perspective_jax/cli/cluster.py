"""Which processes make up one training run: explicit flags or the cluster's environment.

    spec = cluster_spec(args, os.environ)     # ClusterSpec; spec.multi: several processes
    spec.init_kwargs()                        # for jax.distributed.initialize

`--coordinator HOST:PORT --num-processes N --process-id I` name the processes
explicitly (any launcher: a Kubernetes indexed Job passes its
`$(JOB_COMPLETION_INDEX)`); otherwise a SLURM step (`srun`, more than one task) or
an Open MPI job (`mpirun`, more than one rank) is detected, and JAX reads the rest
from its variables. `--distributed on` asks JAX to detect any cluster it knows
(Cloud TPU pods, Kubernetes with the `kubernetes` package); `off` ignores the
environment. Only the standard library is imported here: the supervisor
(`cli.supervisor`) reads the spec before JAX is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Mapping, Optional

from perspective_jax.cli.common import int_in
from perspective_jax.errors import UserError

MODES = ("auto", "on", "off")


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """How this process joins the run. `source`: single | flags | slurm | ompi |
    detect (JAX's own detection, `--distributed on`)."""

    source: str = "single"
    coordinator: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    init_timeout_s: int = 300
    heartbeat_timeout_s: int = 60

    def __post_init__(self):
        if self.source not in ("single", "flags", "slurm", "ompi", "detect"):
            raise ValueError(f"unknown cluster source {self.source!r}")
        if self.source == "flags":
            host, _, port = (self.coordinator or "").rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise UserError(f"--coordinator {self.coordinator!r}: give HOST:PORT, e.g. "
                                "10.0.0.1:8476 (the host of process 0 and a free port)")
            if self.num_processes is None or self.process_id is None:
                raise UserError("--coordinator needs --num-processes N and --process-id I "
                                "(the same N everywhere, I = 0 … N-1 once each)")
            if not 0 <= self.process_id < self.num_processes:
                raise UserError(f"--process-id {self.process_id}: must lie in 0 … "
                                f"{self.num_processes - 1} (--num-processes "
                                f"{self.num_processes})")
        if self.init_timeout_s < 1 or self.heartbeat_timeout_s < 1:
            raise UserError("--init-timeout and --heartbeat-timeout must be >= 1 second")

    @property
    def multi(self) -> bool:
        return self.source != "single"

    @property
    def label(self) -> str:
        """'process I of N' where known, else the launcher's name."""
        if self.process_id is not None and self.num_processes is not None:
            return f"process {self.process_id} of {self.num_processes}"
        return f"this {self.source} process"

    def init_kwargs(self) -> dict:
        """Keyword arguments of `jax.distributed.initialize`."""
        kw = {"initialization_timeout": self.init_timeout_s,
              "heartbeat_timeout_seconds": self.heartbeat_timeout_s}
        if self.source == "flags":
            kw.update(coordinator_address=self.coordinator,
                      num_processes=self.num_processes, process_id=self.process_id)
        return kw


def add_flags(parser: argparse.ArgumentParser) -> None:
    count_type, seconds_type = int_in(1), int_in(1, 86400)
    f = parser.add_argument
    f("--coordinator", metavar="HOST:PORT", help="several processes: the address of "
      "process 0 (with --num-processes and --process-id); see docs/training.md")
    f("--num-processes", type=count_type, metavar="N", help="several processes: how many")
    f("--process-id", type=int, metavar="I", help="several processes: this one's index "
      "(0 … N-1)")
    f("--distributed", choices=MODES, default="auto", help="auto: the flags above, else a "
      "SLURM step or Open MPI job of more than one process; on: let JAX detect the "
      "cluster (Cloud TPU, Kubernetes); off: one process, whatever the environment")
    f("--init-timeout", type=seconds_type, default=300, metavar="S",
      help="seconds to wait for every process to join")
    f("--heartbeat-timeout", type=seconds_type, default=60, metavar="S",
      help="seconds without a heartbeat after which a process counts as dead and the "
           "others stop")


def _count(env: Mapping[str, str], *names: str) -> int:
    for name in names:
        value = env.get(name, "")
        if value.isdigit():
            return int(value)
    return 1


def detected(env: Mapping[str, str]) -> Optional[str]:
    """'slurm' or 'ompi' when this process is one of several of such a job."""
    if "SLURM_JOB_ID" in env and "SLURM_PROCID" in env and _count(
            env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS") > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in env and _count(env, "OMPI_COMM_WORLD_SIZE") > 1:
        return "ompi"
    return None


def cluster_spec(args: argparse.Namespace, env: Mapping[str, str]) -> ClusterSpec:
    """The spec the parsed flags and the environment give."""
    timeouts = {"init_timeout_s": args.init_timeout, "heartbeat_timeout_s":
                args.heartbeat_timeout}
    explicit = [f for f, v in (("--coordinator", args.coordinator),
                               ("--num-processes", args.num_processes),
                               ("--process-id", args.process_id)) if v is not None]
    if explicit:
        if args.distributed == "off":
            raise UserError(f"{explicit[0]} cannot be used with --distributed off")
        if not args.coordinator:
            raise UserError(f"{explicit[0]} needs --coordinator HOST:PORT (and "
                            "--num-processes, --process-id)")
        return ClusterSpec("flags", args.coordinator, args.num_processes, args.process_id,
                           **timeouts)
    if args.distributed == "off":
        return ClusterSpec(**timeouts)
    if args.distributed == "on":
        return ClusterSpec("detect", **timeouts)
    source = detected(env)
    if source is None:
        return ClusterSpec(**timeouts)
    n = _count(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS") if source == "slurm" else \
        _count(env, "OMPI_COMM_WORLD_SIZE")
    rank = env.get("SLURM_PROCID") if source == "slurm" else env.get("OMPI_COMM_WORLD_RANK")
    return ClusterSpec(source, None, n, int(rank) if rank and rank.isdigit() else None,
                       **timeouts)


def spec_from_argv(argv: list[str], env: Mapping[str, str]) -> Optional[ClusterSpec]:
    """The spec of a multi-process command line, or None (one process, or flags the
    command itself will reject with its own one-line error)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_flags(parser)
    try:
        args, _ = parser.parse_known_args(argv)
        spec = cluster_spec(args, env)
    except (UserError, SystemExit):
        return None
    return spec if spec.multi else None
