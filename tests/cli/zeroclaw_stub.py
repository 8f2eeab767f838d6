#!python
"""A stand-in `zeroclaw` for perspective-agent's tests (installed as `zeroclaw`, the
first line replaced by the running interpreter). It accepts only `zeroclaw agent -m
TASK`, finds config.toml where ZeroClaw does (ZEROCLAW_CONFIG_DIR, ZEROCLAW_WORKSPACE,
the ~/.zeroclaw/active_workspace.toml marker, ~/.zeroclaw), applies ZeroClaw's
environment overrides (ZEROCLAW_API_KEY | API_KEY, ZEROCLAW_PROVIDER |
ZEROCLAW_MODEL_PROVIDER | MODEL_PROVIDER | PROVIDER, ZEROCLAW_MODEL | MODEL), and
sends TASK to the `custom:URL` provider with the official openai client, a small
function tool included. It prints `stub-report {json}` and the reply, and exits
with $STUB_EXIT (default 3).

Knobs: STUB_DRY=1 reports without calling the server; STUB_SLEEP=S sleeps S seconds
after calling it; STUB_PIDFILE gets its pid.
"""

import json
import os
import pathlib
import sys
import time
import tomllib


def config_dir() -> pathlib.Path:
    env = os.environ
    if env.get("ZEROCLAW_CONFIG_DIR", "").strip():
        return pathlib.Path(env["ZEROCLAW_CONFIG_DIR"].strip()).expanduser()
    if env.get("ZEROCLAW_WORKSPACE"):
        ws = pathlib.Path(env["ZEROCLAW_WORKSPACE"]).expanduser()
        if (ws / "config.toml").exists():
            return ws
        legacy = ws.parent / ".zeroclaw"
        return legacy if (legacy / "config.toml").exists() or ws.name == "workspace" else ws
    home = pathlib.Path(env["HOME"]) / ".zeroclaw"
    marker = home / "active_workspace.toml"
    if marker.exists():
        named = tomllib.loads(marker.read_text()).get("config_dir", "").strip()
        if named:
            path = pathlib.Path(named).expanduser()
            return path if path.is_absolute() else home / path
    return home


def first(*names):
    """Rust's env::var(a).or_else(|_| env::var(b)): the first variable that is set."""
    return next((os.environ[n] for n in names if n in os.environ), None)


def settings(cfg: dict) -> tuple:
    env = os.environ
    key, provider, model = cfg.get("api_key"), cfg.get("default_provider"), cfg.get(
        "default_model")
    if first("ZEROCLAW_API_KEY", "API_KEY"):
        key = first("ZEROCLAW_API_KEY", "API_KEY")
    if "ZEROCLAW_PROVIDER" in env:
        provider = env["ZEROCLAW_PROVIDER"] or provider
    elif first("ZEROCLAW_MODEL_PROVIDER", "MODEL_PROVIDER") is not None:
        provider = first("ZEROCLAW_MODEL_PROVIDER", "MODEL_PROVIDER") or provider
    elif env.get("PROVIDER") and (provider or "openrouter").strip().lower() == "openrouter":
        provider = env["PROVIDER"]
    if first("ZEROCLAW_MODEL", "MODEL"):
        model = first("ZEROCLAW_MODEL", "MODEL")
    return key, provider or "openrouter", model


def main() -> int:
    args = sys.argv[1:]
    if len(args) != 3 or args[:2] != ["agent", "-m"]:
        print(f"stub zeroclaw: expected `zeroclaw agent -m TASK`, got {args}",
              file=sys.stderr)
        return 64
    if os.environ.get("STUB_PIDFILE"):
        pathlib.Path(os.environ["STUB_PIDFILE"]).write_text(str(os.getpid()))
    task = args[2]
    cdir = config_dir()
    path = cdir / "config.toml"
    cfg = tomllib.loads(path.read_text())
    key, provider, model = settings(cfg)
    if not provider.startswith("custom:"):
        print(f"stub zeroclaw: provider {provider!r} is not custom:URL", file=sys.stderr)
        return 65
    base_url = provider[len("custom:"):]
    report = {"task": task, "config_dir": str(cdir), "config": cfg,
              "dir_mode": oct(cdir.stat().st_mode & 0o777),
              "file_mode": oct(path.stat().st_mode & 0o777),
              "base_url": base_url, "model": model, "key": key}
    reply = None
    if not os.environ.get("STUB_DRY"):
        import openai
        client = openai.OpenAI(base_url=base_url, api_key=key or "none", timeout=120,
                               max_retries=0)
        out = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": task}], max_tokens=8,
            temperature=0, tools=[{"type": "function", "function": {
                "name": "get_time", "description": "The current time.",
                "parameters": {"type": "object", "properties": {}}}}])
        message = out.choices[0].message
        reply = {"content": message.content,
                 "tool_calls": [c.model_dump() for c in message.tool_calls or []]}
    report["reply"] = reply
    print("stub-report " + json.dumps(report), flush=True)
    print(f"reply: {reply and reply['content']}", flush=True)
    print("stub zeroclaw: done", file=sys.stderr, flush=True)
    time.sleep(float(os.environ.get("STUB_SLEEP", "0")))
    return int(os.environ.get("STUB_EXIT", "3"))


if __name__ == "__main__":
    sys.exit(main())
