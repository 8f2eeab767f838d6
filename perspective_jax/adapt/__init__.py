"""Forward-Mode Evolutionary Adaptation (SPEC §3.8), being built (issue 26): the
forward-gradient estimator (`forward_grad`) and NES on expert coordinates
(`nes`). Adapters, rails, the streamed path and `perspective-adapt` are to come."""
