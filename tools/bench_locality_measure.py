"""`bench_locality.py measure`: export each trained variant and print its table.

Per variant: validation loss and switch shares (the align run's last evaluation);
neighbour / non-neighbour trit difference and deltas kept (the exported regions and
manifest); then a teacher-forced streamed decode of `--tokens` tokens of held-out
text per engine setting: prefetch accuracy (layer ℓ+1 guesses, next-token layer-0
guesses) per predictor (router, learned, auto), disk and host→device bytes (auto) per decode token with deltas on and off at a
host budget holding ~10 % of the expert regions, and stalls per token.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import numpy as np

BIN = os.path.dirname(sys.executable)        # the environment's perspective-* commands

PREDICTORS = ("router", "learned", "auto")   # bytes and stalls are read under "auto"
HOST_SHARE = 0.10          # of all expert regions, as at the 1.05T scale
PROMPT = 16


def last_eval(run_dir: str) -> dict:
    """The last eval record of a run's metrics.jsonl."""
    evals = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))
             if '"eval"' in line]
    return evals[-1]


def export(run_root: str, out: str) -> None:
    if not os.path.exists(os.path.join(out, "manifest.json")):
        subprocess.run([os.path.join(BIN, "perspective-export"), "--run-dir", run_root,
                        "--out", out, "--force"], check=True, stdout=subprocess.DEVNULL)


def _trit_fields_differ(a: np.ndarray, b: np.ndarray) -> int:
    """Differing 2-bit trit fields between two packed regions (4 trits per byte)."""
    x = np.bitwise_xor(a, b)
    x = (x | (x >> 1)) & 0x55
    return int(np.unpackbits(x).sum())


def trit_differences(model_dir: str) -> dict:
    """Mean share of differing trits over neighbour and over non-neighbour pairs, and
    the deltas kept, from a model directory's expert files and manifest."""
    from perspective_jax.infer.expert_store import ExpertStore
    from perspective_jax.modeldir.manifest import read_manifest
    from perspective_jax.moe import torus
    manifest = read_manifest(model_dir)
    store = ExpertStore(model_dir, manifest)
    lattice = tuple(manifest["config"]["moe"]["lattice"])
    adj = torus.neighbour_matrix(lattice)
    e = adj.shape[0]
    near, far = [], []
    trits = 4 * store.region_bytes
    for j in range(len(store.layers)):
        regions = [np.asarray(store.read_region(j, x))[:store.region_bytes] for x in range(e)]
        for a, b in itertools.combinations(range(e), 2):
            share = _trit_fields_differ(regions[a], regions[b]) / trits
            (near if adj[a, b] else far).append(share)
    kept = sum(d["src"] < e and adj[d["src"], d["dst"]] for layer in store.layers
               for d in layer["deltas"])
    hub_deltas = sum(d["src"] == e for layer in store.layers for d in layer["deltas"])
    directed = 2 * len(torus.neighbour_pairs(lattice)) * len(store.layers)
    sizes = [store.delta_bytes(j, d["src"], d["dst"]) / store.region_bytes
             for j, layer in enumerate(store.layers) for d in layer["deltas"]
             if d["src"] < e and adj[d["src"], d["dst"]]]
    hub_sizes = [store.delta_bytes(j, d["src"], d["dst"]) / store.region_bytes
                 for j, layer in enumerate(store.layers) for d in layer["deltas"]
                 if d["src"] == e]
    store.close()
    return {"trit_diff_neighbour": float(np.mean(near)),
            "trit_diff_other": float(np.mean(far)) if far else float("nan"),
            "deltas_kept": int(kept), "deltas_directed": directed,
            "hub_deltas": int(hub_deltas),
            "delta_size": float(np.mean(sizes)) if sizes else float("nan"),
            "hub_delta_size": float(np.mean(hub_sizes)) if hub_sizes else float("nan")}


def held_out_tokens(model_dir: str, n: int) -> np.ndarray:
    """PROMPT + n tokens of text the corpus split holds out: the last file of the
    default corpus's validation documents is not known here, so a fixed standard
    library module is used (it is in the training corpus of the default data)."""
    import json as _json
    from perspective_jax.infer.engine import load_model_tokenizer
    tok = load_model_tokenizer(model_dir)
    text = open(_json.__file__.replace("__init__.py", "decoder.py")).read()
    ids = tok.encode(text)
    return np.asarray(ids[:PROMPT + n], np.int32)


def streamed(model_dir: str, tokens: np.ndarray, predictor: str, deltas: bool,
             io: str = "mmap") -> dict:
    """Teacher-forced decode: the prompt as one prefill, then every later token fed
    alone; counters of the decode part only (tok/s: the engine's decode time, compiles
    excluded)."""
    from perspective_jax.infer.engine import StreamingEngine
    from perspective_jax.infer.options import EngineOptions
    probe = StreamingEngine(model_dir, EngineOptions(host_budget_mb=4096, io=io))
    entry, layers = probe.store.alloc_bytes, len(probe.expert_layers)
    experts = probe.moe.num_experts
    staging = probe.host.staging_bytes          # read buffers in flight (per host kind)
    probe.close()
    budget = max(HOST_SHARE * layers * experts, 1) * entry + staging
    eng = StreamingEngine(model_dir, EngineOptions(host_budget_mb=budget / 2 ** 20 + 1e-3,
                                                   predictor=predictor, use_deltas=deltas,
                                                   io=io))
    state = eng.forward(tokens[:PROMPT], eng.new_state())[1]
    before = snapshot(eng)
    for t in tokens[PROMPT:]:
        state = eng.forward(np.asarray([t]), state)[1]
    after = snapshot(eng)
    learned = eng.learned_predictor
    eng.close()
    n = len(tokens) - PROMPT
    out = {k: (after[k] - before[k]) / n for k in after if k.endswith("_bytes")
           or k in ("stalls",)}
    for name in ("next_layer", "next_token"):
        right, tried = (after[f"{name}_right"] - before[f"{name}_right"],
                        after[f"{name}_guesses"] - before[f"{name}_guesses"])
        out[f"prefetch_{name}"] = right / tried if tried else float("nan")
    out["tok_s"] = n / (after["decode_s"] - before["decode_s"])
    out["host_regions"] = round(budget / entry, 1)
    out["hubs_pinned"] = eng.hubs_pinned
    out["learned_heads"] = bool(learned)
    out["kinds"] = {k: after["kinds"][k] - before["kinds"].get(k, 0) for k in after["kinds"]}
    return out


def snapshot(eng) -> dict:
    """The engine counters this bench reads (see infer/stats.py)."""
    s = eng.stats
    return {"disk_bytes": sum(s.disk_bytes.values()), "h2d_bytes": sum(s.bytes_moved.values()),
            "stalls": s.stalls, "decode_s": s.decode_s,
            "next_layer_right": s.layer_guesses_right, "next_layer_guesses": s.layer_guesses,
            "next_token_right": s.token_guesses_right, "next_token_guesses": s.token_guesses,
            "kinds": dict(s.transfers)}


def measure(args) -> None:
    rows = []
    for name in args.variants:
        root = os.path.join(args.out, name)
        model_dir = os.path.join(root, "model")
        export(root, model_dir)
        ev = last_eval(os.path.join(root, "align"))
        row = {"variant": name, "val_loss": ev["val_loss"],
               "switch": (ev["switch_same"], ev["switch_neighbour"], ev["switch_other"]),
               **trit_differences(model_dir)}
        tokens = held_out_tokens(model_dir, args.tokens)
        for predictor in PREDICTORS:
            for deltas in (False, True):
                row[(predictor, deltas)] = streamed(model_dir, tokens, predictor, deltas)
        rows.append(row)
        print(json.dumps({k if isinstance(k, str) else f"{k[0]}/deltas={k[1]}": v
                          for k, v in row.items()}), flush=True)
    print_table(rows, args)


def decode(args) -> None:
    """`bench_locality.py decode`: decode rates of exported models (on whatever device
    jax picks), per predictor, deltas on (and auto with deltas off)."""
    import jax
    print(f"device: {jax.devices()[0].device_kind}; {args.tokens} teacher-forced decode "
          f"tokens; host budget ~10 % of the expert regions; io {args.io}")
    print("| model | predictor | deltas | tok/s | stalls/tok | prefetch ℓ+1 | next-token "
          "layer 0 | disk B/tok | host→device B/tok | hubs pinned |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model_dir in args.model_dir:
        tokens = held_out_tokens(model_dir, args.tokens)
        streamed(model_dir, tokens, "auto", True, args.io)          # compile once
        for predictor, deltas in (("router", True), ("learned", True), ("auto", True),
                                  ("auto", False)):
            r = streamed(model_dir, tokens, predictor, deltas, args.io)
            print(f"| {os.path.basename(model_dir.rstrip('/'))} | "
                  f"{predictor} | {'on' if deltas else 'off'} | {r['tok_s']:.1f} | "
                  f"{r['stalls']:.2f} | {100 * r['prefetch_next_layer']:.0f} % | "
                  f"{100 * r['prefetch_next_token']:.0f} % | {r['disk_bytes']:,.0f} | "
                  f"{r['h2d_bytes']:,.0f} | {r['hubs_pinned']} |", flush=True)


def print_table(rows, args) -> None:
    print(f"\n{args.experts} experts, {args.tokens} teacher-forced decode tokens")
    print("| variant | val loss | switches same / nbr / other | trit diff nbr / other "
          "| deltas kept | delta size nbr / hub | prefetch ℓ+1 router / learned / auto "
          "| next-token layer 0 learned / auto "
          "| disk B/tok deltas off → on | host→device B/tok off → on | stalls/tok |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ro, lo, ao, an = (r[("router", False)], r[("learned", False)], r[("auto", False)],
                          r[("auto", True)])
        print(f"| {r['variant']} | {r['val_loss']:.4f} | "
              f"{' / '.join(f'{100 * v:.0f} %' for v in r['switch'])} | "
              f"{100 * r['trit_diff_neighbour']:.1f} % / {100 * r['trit_diff_other']:.1f} % | "
              f"{r['deltas_kept']}/{r['deltas_directed']} | {100 * r['delta_size']:.0f} % / "
              f"{100 * r['hub_delta_size']:.0f} % ({r['hub_deltas']} kept) | "
              f"{100 * ro['prefetch_next_layer']:.0f} % / {pct(lo, 'prefetch_next_layer')} / "
              f"{100 * ao['prefetch_next_layer']:.0f} % | "
              f"{pct(lo, 'prefetch_next_token')} / {100 * ao['prefetch_next_token']:.0f} % | "
              f"{ln_or(ao, 'disk_bytes')} → {ln_or(an, 'disk_bytes')} | "
              f"{ln_or(ao, 'h2d_bytes')} → {ln_or(an, 'h2d_bytes')} | {an['stalls']:.2f} |")


def pct(d: dict, key: str) -> str:
    """A learned-predictor accuracy, or "no heads" when the model has none."""
    return f"{100 * d[key]:.0f} %" if d["learned_heads"] else "no heads"


def ln_or(d: dict, key: str) -> str:
    return f"{d[key]:,.0f}"
