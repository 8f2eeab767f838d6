"""Which processes make up a run (flags, SLURM, Open MPI) and the supervisor's reasons."""

import argparse

import pytest

from perspective_jax.cli import cluster
from perspective_jax.cli.supervisor import reason
from perspective_jax.errors import UserError


def parse(argv):
    parser = argparse.ArgumentParser()
    cluster.add_flags(parser)
    return parser.parse_args(argv)


SLURM = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "3", "SLURM_NTASKS": "4",
         "SLURM_STEP_NUM_TASKS": "4"}
OMPI = {"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:3000", "OMPI_COMM_WORLD_SIZE": "2",
        "OMPI_COMM_WORLD_RANK": "1"}


@pytest.mark.parametrize("argv, env, source, label", [
    ([], {}, "single", None),
    ([], {**SLURM, "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1"}, "single", None),
    ([], SLURM, "slurm", "process 3 of 4"),
    ([], OMPI, "ompi", "process 1 of 2"),
    (["--distributed", "off"], SLURM, "single", None),
    (["--distributed", "on"], {}, "detect", None),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "1"], SLURM, "flags",
     "process 1 of 2"),
])
def test_the_spec_comes_from_flags_then_the_environment(argv, env, source, label):
    spec = cluster.cluster_spec(parse(argv), env)
    assert spec.source == source and spec.multi == (source != "single")
    if label:
        assert spec.label == label
    kw = spec.init_kwargs()
    assert kw["heartbeat_timeout_seconds"] == 60 and kw["initialization_timeout"] == 300
    assert ("coordinator_address" in kw) == (source == "flags")


def test_spec_from_argv_ignores_other_flags_and_leaves_errors_to_the_command():
    argv = ["--stage", "dense", "--run-dir", "r", "model.d_model=32", "--coordinator",
            "10.0.0.1:8476", "--num-processes", "4", "--process-id", "0"]
    spec = cluster.spec_from_argv(argv, {})
    assert spec is not None and spec.coordinator == "10.0.0.1:8476"
    assert cluster.spec_from_argv(["--stage", "dense"], {}) is None
    assert cluster.spec_from_argv(["--coordinator", "bad"], {}) is None   # the command says why
    with pytest.raises(UserError, match="HOST:PORT"):
        cluster.cluster_spec(parse(["--coordinator", "bad", "--num-processes", "2",
                                    "--process-id", "0"]), {})


def test_the_supervisor_names_why_the_runtime_stopped():
    heartbeat = ("E1203 coordination_service.cc:1549] ... The following tasks are unhealthy "
                 "(stopped sending heartbeats):\n1\nThe tasks have crashed.\n")
    assert reason(heartbeat, -6).startswith("process(es) 1 stopped sending heartbeats")
    assert "lost the coordinator" in reason(":UNKNOWN:Error received from peer "
                                            '{grpc_message:"Socket closed"}', -6)
    assert "not every process joined" in reason(
        "DEADLINE_EXCEEDED\nRPC: /xla.coordination.CoordinationService/RegisterTask", -6)
    assert reason("", -9) == "ended by SIGKILL"
    assert reason("", 3) == "ended with exit code 3"
