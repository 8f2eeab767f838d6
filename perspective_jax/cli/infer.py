"""perspective-infer: generate from an exported model with layer-streamed experts.

    perspective-infer --model-dir models/tiny "def main(" --max-tokens 64 --stats
    perspective-infer --model-dir models/tiny "def main(" --mpd --show-confidence
    perspective-infer --model-dir models/tiny "import os" --safety --stats
    perspective-infer --model-dir models/tiny "qv1 = \"" --mpd --memory facts.hdm --stats

--show-confidence (with --mpd): on a terminal, tokens below --low-confidence are
underlined in red; otherwise stdout is a JSON Lines stream, one object per token
({"token", "id", "confidence", "mpd", "decision", "memory"}). --safety projects every token's
final state onto the model directory's safety polytope (SPEC §3.9; docs/inference.md).
--memory FILE (with --mpd): where the perspectives find no majority, the value the
memory recalls for the last tokens is injected and the token decided again (SPEC
§3.7; docs/memory.md); --stats counts lookups, hits and injections.
--adapter FILE: LoRA adapters written by perspective-adapt ride on every forward and
step, composed with the other extensions; --adapt-online then runs one adaptation
round on the prompt's text after generating and saves the adapters back to FILE
(SPEC §3.8; docs/inference.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from perspective_jax.cli import compile_cache
from perspective_jax.config.choices import TEMPERATURE_RANGE
from perspective_jax.cli.common import (OneLineParser, add_adapter_flags, add_engine_flags,
                                        add_memory_flags, add_mpd_flags, check_output_file,
                                        cli_entry, engine_options_from_args, exit_with,
                                        float_in, int_in, mpd_from_args,
                                        recall_config_from_args)
from perspective_jax.errors import UserError
from perspective_jax.model import footprint


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="perspective-infer", description=__doc__.splitlines()[0])
    p.add_argument("prompt", nargs="?", default="",
                   help="prompt text ('-' reads standard input)")
    p.add_argument("--model-dir", required=True, help="directory written by perspective-export")
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int_in(1), default=128)
    g.add_argument("--temperature", type=float_in(*TEMPERATURE_RANGE), default=0.8,
                   help="0 = greedy")
    g.add_argument("--top-k", type=int_in(0), default=40, help="0 = off")
    g.add_argument("--top-p", type=float_in(0.0, 1.0, open_low=True), default=1.0,
                   help="1 = off")
    g.add_argument("--seed", type=int_in(0, 2**32 - 1), default=None,
                   help="sampling seed (default 0; a resumed conversation keeps its own)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop before this text (repeatable)")
    add_engine_flags(p)
    add_mpd_flags(p, switch=True)
    add_memory_flags(p)
    add_adapter_flags(p, online=True)
    p.add_argument("--safety", action="store_true",
                   help="project every token's final state onto the model's safety "
                        "polytope, so flagged strings are not completed")
    c = p.add_argument_group("confidence")
    c.add_argument("--show-confidence", action="store_true",
                   help="per-token confidence (needs --mpd): marked on a terminal, JSON "
                        "Lines otherwise")
    c.add_argument("--low-confidence", type=float_in(0.0, 1.0), default=0.5,
                   help="tokens below this confidence are marked on a terminal")
    s = p.add_argument_group("state and statistics")
    s.add_argument("--save-state", metavar="FILE", help="save the conversation afterwards")
    s.add_argument("--resume-state", metavar="FILE", help="continue a saved conversation")
    s.add_argument("--stats", action="store_true", help="print run statistics to stderr")
    s.add_argument("--stats-json", metavar="FILE", help="write run statistics as JSON")
    compile_cache.add_flag(s)
    p.add_argument("--allow-oversize", action="store_true", help=footprint.OVERRIDE_HELP)
    return p


@cli_entry
def run(argv=None) -> int:
    a = _parser().parse_args(argv)
    prompt = _prompt_text(a.prompt)
    if not prompt and not a.resume_state:
        raise UserError("the prompt is empty; pass the text to continue, e.g. "
                        "perspective-infer --model-dir M \"Once upon a time\"")
    if a.show_confidence and not a.mpd:
        raise UserError("--show-confidence needs --mpd (the confidence comes from the "
                        "routing perspectives)")
    if a.memory and not a.mpd:
        raise UserError("--memory is consulted when MPD's perspectives disagree; add --mpd")
    recall_cfg = recall_config_from_args(a)
    mpd = mpd_from_args(a) if a.mpd else None
    if a.adapt_online and not a.adapter:
        raise UserError("--adapt-online needs --adapter FILE: where the adapters are kept "
                        "(a new file when it does not exist)")
    if a.adapter and os.path.isdir(a.adapter):
        raise UserError(f"--adapter {a.adapter} is a directory; give an adapter file")
    if a.adapter and not a.adapt_online and not os.path.isfile(a.adapter):
        raise UserError(f"--adapter {a.adapter}: no such file; write one with "
                        "perspective-adapt (or add --adapt-online to start one)")
    for flag, path in (("--save-state", a.save_state), ("--stats-json", a.stats_json),
                       ("--adapter", a.adapter if a.adapt_online else None)):
        if path:
            check_output_file(path, flag)
    from perspective_jax.model.sampling import Sampling
    from perspective_jax.modeldir.manifest import read_manifest
    from perspective_jax.infer.engine import StreamingEngine, load_model_tokenizer
    from perspective_jax.infer.session import Conversation, describe
    from perspective_jax.infer.safety_guard import SafetyGuard, model_polytope

    manifest = read_manifest(a.model_dir)      # clear errors before any heavy work; read once
    polytope = model_polytope(a.model_dir, manifest, required=True) if a.safety else None
    footprint.refuse_oversize_engine(manifest, a.host_budget_mb, a.device_slots,
                                     a.prefill_chunk, a.allow_oversize)
    tokenizer = load_model_tokenizer(a.model_dir, manifest)    # checked against its sha256
    compile_cache.enable(a.compilation_cache)
    sampling = Sampling(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p)
    options = engine_options_from_args(a)
    engine = StreamingEngine(a.model_dir, options, manifest=manifest)
    base, adapter = engine, None
    try:
        if a.adapter and os.path.exists(a.adapter):
            from perspective_jax.adapt.attach import AdaptedEngine, attach_adapter
            adapter = attach_adapter(base, a.adapter)
            engine = AdaptedEngine(base, adapter)
        guard = (None if polytope is None
                 else SafetyGuard.for_engine(polytope, base, tokenizer))
        memory = None
        if a.memory:
            from perspective_jax.infer.memory_codec import engine_recall
            memory = engine_recall(base, tokenizer, a.memory, recall_cfg)
        if a.resume_state:
            conv = Conversation.load(engine, tokenizer, a.resume_state, sampling,
                                     seed=a.seed, mpd=mpd, guard=guard, memory=memory)
        else:
            conv = Conversation(engine, tokenizer, sampling, seed=a.seed or 0, mpd=mpd,
                                guard=guard, memory=memory)
    except BaseException:
        base.close()
        raise
    shower = _confidence_printer(a.low_confidence) if a.show_confidence else None
    if not a.resume_state and (shower is None or shower.terminal):
        sys.stdout.write(prompt)
    on_text = None if shower else (lambda t: (sys.stdout.write(t), sys.stdout.flush()))
    try:
        try:
            conv.generate(prompt, a.max_tokens, stop=a.stop,
                          eos_id=getattr(tokenizer, "eos_id", None), on_text=on_text,
                          on_token=shower)
        except BaseException:                 # Ctrl-C, an unreadable expert: the state is
            if a.save_state:                  # that before the feed that failed — keep it
                conv.save(a.save_state)
                print(f"\nconversation so far saved to {a.save_state}", file=sys.stderr)
            _warn_damaged_deltas(base.stats.damaged_deltas)
            raise
        if shower is None or shower.terminal:
            sys.stdout.write("\n")
        sys.stdout.flush()
        _warn_damaged_deltas(base.stats.damaged_deltas)
        if a.save_state:
            conv.save(a.save_state)
        report = base.report()                # generation's own, before any adaptation
        if a.adapt_online:
            report["adaptation"] = _adapt_online(a, base, adapter, tokenizer, prompt,
                                                 conv.steps)
    finally:
        base.close()
    if a.stats:
        print(describe(report), file=sys.stderr)
    if a.stats_json:
        with open(a.stats_json, "w") as fh:
            json.dump(report, fh, indent=1)
    return 0


def _adapt_online(a, engine, adapter, tokenizer, prompt: str, turn_seed: int) -> dict:
    """--adapt-online: one round on the prompt's tokens, saved to --adapter (the
    directions seeded by the conversation's step count, so each turn draws anew)."""
    from perspective_jax.adapt.adapter_file import AdapterSpec
    from perspective_jax.adapt.loop import AdaptConfig
    from perspective_jax.cli.adapt import adapt_online
    spec = adapter.spec if adapter is not None else AdapterSpec()
    cfg = AdaptConfig(rank=spec.rank, targets=spec.targets, scale=spec.scale,
                      directions=a.adapt_directions, lr=a.adapt_lr, seed=turn_seed)
    ids = tokenizer.encode(prompt) if prompt else []
    block = adapt_online(engine, a.adapter, adapter, ids, a.adapt_seq_len, cfg)
    if "skipped" in block:
        print(f"note: --adapt-online: {block['skipped']}; nothing written to {a.adapter}",
              file=sys.stderr)
    return block


class _confidence_printer:
    """on_token for --show-confidence: on a terminal the text, low-confidence tokens
    underlined in red; otherwise one JSON object per token."""

    DECISIONS = ("p0", "vote", "uncertain")      # model.mpd EMIT_P0, EMIT_VOTE, UNCERTAIN

    def __init__(self, low: float):
        self.low, self.terminal = low, sys.stdout.isatty()

    def __call__(self, info) -> None:
        if self.terminal:
            mark = info.confidence < self.low
            sys.stdout.write(f"\x1b[4;31m{info.text}\x1b[0m" if mark and info.text
                             else info.text)
        else:
            sys.stdout.write(json.dumps({
                "token": info.text, "id": info.id, "confidence": round(info.confidence, 6),
                "mpd": info.triggered, "decision": self.DECISIONS[info.kind],
                "memory": info.recalled}) + "\n")
        sys.stdout.flush()


def _warn_damaged_deltas(messages: list) -> None:
    """One line for all damaged deltas: decoding went on exactly (their experts were
    loaded in full), but the model directory needs re-exporting."""
    if messages:
        more = f" and {len(messages) - 1} more damaged deltas" if len(messages) > 1 else ""
        print(f"warning: {messages[0]}{more}; re-export the model directory",
              file=sys.stderr)


def _prompt_text(arg: str) -> str:
    """The prompt: the argument, or standard input for '-'; it must be valid UTF-8."""
    if arg == "-":
        stream = getattr(sys.stdin, "buffer", None)
        if stream is None:                    # a text stream without bytes (tests)
            return sys.stdin.read()
        raw = stream.read()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"the prompt on standard input is not valid UTF-8 (byte "
                            f"{raw[e.start]:#04x} at offset {e.start})") from None
    try:
        arg.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"the prompt is not valid UTF-8 (at character {e.start}); pass "
                        "UTF-8 text") from None
    return arg


main = exit_with(run)
