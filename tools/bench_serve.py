"""perspective-serve under concurrent load: aggregate decode tok/s, time per output
token (p50/p95) and time to first token at concurrency 1, 4 and 16, with the
expert bytes moved per decode step and the host-cache hit rate (issue 21).

    .venv/bin/python tools/bench_serve.py --model-dir models/tiny
    .venv/bin/python tools/bench_serve.py --synthetic --work-dir /tmp/bench  # wide store

The server runs as its own process (`python -m perspective_jax.cli.serve`, as a
user starts it); the clients are one asyncio loop of streaming completions
(greedy, distinct prompts, the token count from the usage chunk). Time per output
token is per request, (last token − first token) / (tokens − 1), as vLLM reports it.
Each concurrency first runs once unmeasured (the engine compiles its batch shapes),
then `--rounds` times measured; the best round is reported, with all rounds' failures.
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time

import httpx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["def {}(self, value):\n    ", "import {}\n\n", "class {}Error(Exception):\n",
           "for {} in range(10):\n    ", "# {}\nif __name__ == '__main__':\n"]
NAMES = ("alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta", "iota",
         "kappa", "lam", "mu", "nu", "xi", "omi", "pi")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: str, port: int, extra: list) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "perspective_jax.cli.serve", "--model-dir", model_dir,
           "--port", str(port), "--served-model-name", "bench", "--log-level", "warning",
           *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": REPO})
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise SystemExit("the server did not become ready in 600 s")


def scrape(url: str) -> dict:
    """Metric name{labels} → value from /metrics."""
    out = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        m = re.match(r"^([a-z_]+(?:\{[^}]*\})?) ([-+0-9.eE]+|NaN)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


async def one_stream(client, url: str, prompt: str, tokens: int) -> dict:
    body = {"model": "bench", "prompt": prompt, "max_tokens": tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    arrivals, generated, done, reason = [], None, False, None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                return {"ok": False, "status": resp.status_code}
            async for line in resp.aiter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        generated = chunk["usage"]["completion_tokens"]
                    for ch in chunk.get("choices", ()):
                        reason = ch.get("finish_reason") or reason
                    if any(ch["text"] for ch in chunk.get("choices", ())):
                        arrivals.append(time.perf_counter())
                elif line == "data: [DONE]":
                    done = True
    except httpx.HTTPError as exc:
        return {"ok": False, "status": type(exc).__name__}
    # ok: answered in full (usage, a finish reason, [DONE]); EOS may end it early, and
    # a text of undecodable bytes arrives in one piece (then it is not timed)
    ok = done and generated is not None and reason in ("length", "stop")
    return {"ok": ok, "start": t0, "arrivals": arrivals, "tokens": generated or 0,
            "status": 200, "timed": ok and len(arrivals) > 1 and generated > 1}


async def load(url: str, concurrency: int, tokens: int) -> list:
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        prompts = [PROMPTS[i % len(PROMPTS)].format(NAMES[i % len(NAMES)])
                   for i in range(concurrency)]
        return await asyncio.gather(*(one_stream(client, url, p, tokens) for p in prompts))


def summarise(results: list) -> dict:
    failed = sum(not r["ok"] for r in results)
    good = [r for r in results if r.get("timed")]
    if not good:
        return {"tok_s": 0.0, "failed": failed}
    start = min(r["start"] for r in good)
    end = max(r["arrivals"][-1] for r in good)
    # time per output token of each request (vLLM's TPOT): after the first token
    tpot = [(r["arrivals"][-1] - r["arrivals"][0]) / (r["tokens"] - 1) for r in good]
    ttft = [r["arrivals"][0] - r["start"] for r in good]
    q = statistics.quantiles(tpot, n=20) if len(tpot) > 1 else [tpot[0]] * 19
    return {"tok_s": sum(r["tokens"] for r in good) / (end - start),
            "p50_ms": statistics.median(tpot) * 1e3, "p95_ms": q[18] * 1e3,
            "ttft_ms": statistics.median(ttft) * 1e3, "failed": failed}


def bench_model(label: str, model_dir: str, args) -> list:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    extra = ["--host-budget-mb", str(args.host_budget_mb), "--max-batch",
             str(max(args.concurrency)), *args.serve_arg]
    proc = start_server(model_dir, port, extra)
    rows = []
    try:
        for c in args.concurrency:
            asyncio.run(load(url, c, args.tokens))                     # compile, warm
            best, failed = None, 0
            for _ in range(args.rounds):
                before = scrape(url)
                s = summarise(asyncio.run(load(url, c, args.tokens)))
                after = scrape(url)
                failed += s["failed"]
                steps = (after["perspective_time_per_output_token_seconds_count"]
                         - before["perspective_time_per_output_token_seconds_count"])
                moved = sum(after.get(k, 0) - before.get(k, 0) for k in after
                            if k.startswith("perspective_expert_bytes_moved_total"))
                s["mb_per_step"] = moved / max(steps, 1) / 2**20
                s["hit_rate"] = after.get("perspective_host_cache_hit_rate", float("nan"))
                if best is None or s["tok_s"] > best["tok_s"]:
                    best = s
            best["failed"] = failed
            rows.append((label, c, best))
            print(f"{label} c={c}: {best}", file=sys.stderr, flush=True)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return rows


def synthetic_model(args) -> str:
    from streaming_models import build_synthetic, synthetic_cfg
    path = os.path.join(args.work_dir, "serve-synthetic-wide")
    if not os.path.exists(os.path.join(path, "manifest.json")):
        cfg = synthetic_cfg(args.synthetic_d_model, 4 * args.synthetic_d_model, n_layers=8,
                            experts=16)
        build_synthetic(path, cfg, lambda *a: print(*a, file=sys.stderr))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", action="append", default=[])
    p.add_argument("--synthetic", action="store_true",
                   help="also a synthetic wide store (built once under --work-dir)")
    p.add_argument("--synthetic-d-model", type=int, default=512)
    p.add_argument("--work-dir", default="bench-work")
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")],
                   default=[1, 4, 16])
    p.add_argument("--tokens", type=int, default=48, help="tokens per request")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--host-budget-mb", type=float, default=64)
    p.add_argument("--serve-arg", action="append", default=[],
                   help="another perspective-serve flag, e.g. --serve-arg=--device-slots=8")
    args = p.parse_args()
    models = [(os.path.basename(os.path.normpath(m)), m) for m in args.model_dir]
    if args.synthetic:
        models.append((f"synthetic d{args.synthetic_d_model}", synthetic_model(args)))
    if not models:
        p.error("give --model-dir and/or --synthetic")
    rows = [r for label, path in models for r in bench_model(label, path, args)]
    if args.serve_arg:
        print(f"server flags: {' '.join(args.serve_arg)}")
    print("| model | concurrency | aggregate tok/s | × one stream | p50 ms/token | "
          "p95 ms/token | TTFT p50 ms | failed | expert MB/step | host-cache hit rate |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = {}
    for label, c, s in rows:
        base.setdefault(label, s["tok_s"])
        print(f"| {label} | {c} | {s['tok_s']:.1f} | {s['tok_s'] / base[label]:.2f} | "
              f"{s.get('p50_ms', float('nan')):.1f} | {s.get('p95_ms', float('nan')):.1f} | "
              f"{s.get('ttft_ms', float('nan')):.0f} | {s['failed']} | "
              f"{s.get('mb_per_step', float('nan')):.3f} | {s.get('hit_rate', float('nan')):.3f} |")


if __name__ == "__main__":
    main()
