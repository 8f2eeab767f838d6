"""An engine start reads the manifest once and parses its config once."""

import perspective_jax.config as config_pkg
from perspective_jax.infer import engine as engine_mod
from perspective_jax.infer.engine import StreamingEngine
from perspective_jax.infer.options import EngineOptions
from perspective_jax.modeldir import manifest as manifest_mod


def test_engine_start_reads_and_parses_the_manifest_once(exported, monkeypatch):
    _, _, path = exported
    calls = {"read": 0, "parse": 0}
    real_read, real_parse = manifest_mod.read_manifest, config_pkg.from_dict

    def read(*a, **k):
        calls["read"] += 1
        return real_read(*a, **k)

    def parse(cls, data, *a, **k):
        if cls.__name__ == "PerspectiveConfig":
            calls["parse"] += 1
        return real_parse(cls, data, *a, **k)

    monkeypatch.setattr(manifest_mod, "read_manifest", read)
    monkeypatch.setattr(engine_mod, "read_manifest", read)
    monkeypatch.setattr(config_pkg, "from_dict", parse)
    monkeypatch.setattr(engine_mod, "from_dict", parse)
    engine = StreamingEngine(path, EngineOptions(host_budget_mb=64))
    try:
        assert calls == {"read": 1, "parse": 1}
        assert engine.cfg == engine.manifest.config
    finally:
        engine.close()
