"""Forward-Mode Evolutionary Adaptation (SPEC §3.8), being built (issue 26): the
forward-gradient estimator (`forward_grad`), NES on expert coordinates (`nes`), the
adapter file (`adapter_file`) and the rollback rails (`rails`). The update loop on
the in-memory model and the streaming engine, and `perspective-adapt`, are to come."""
