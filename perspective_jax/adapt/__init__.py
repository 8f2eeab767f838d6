"""Forward-Mode Evolutionary Adaptation (SPEC §3.8): forward-gradient estimators
(`forward_grad`), NES on expert coordinates (`nes`, `coords`), the update loop with
rails (`loop`, `rails`) over the in-memory model or the streaming engine (`target`),
the adapter file and attaching it to an engine (`adapter_file`, `attach`)."""
