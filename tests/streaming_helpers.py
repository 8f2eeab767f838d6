"""Shared pieces of the streaming-inference tests: a small routed ternary model
exported to a model directory (`exported_model`, behind the `exported` fixture of
conftest.py) and the in-memory reference the engine's logits must equal."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from perspective_jax.config import MoEConfig, PerspectiveConfig, TernaryConfig
from perspective_jax.modeldir import format as md
from perspective_jax.export.exporter import with_ternary_experts, write_model_dir
from perspective_jax.model.transformer import PerspectiveLM, init_cache, init_params


def routed_cfg(small_cfg, **ternary) -> PerspectiveConfig:
    model = dataclasses.replace(small_cfg, vocab_size=259, routed=True)
    return PerspectiveConfig(model=model, moe=MoEConfig(),
                             ternary=TernaryConfig(enabled=True, **ternary))


def similar_experts(params, cfg, key, share=0.01):
    """Experts = expert 0 plus a sparse perturbation, so neighbour deltas are small."""
    for i, kind in enumerate(cfg.model.layer_pattern):
        if kind != "pdr":
            continue
        ffn = params["periods"][f"layer_{i}"]["ffn"]
        for name in md.EXPERT_MATRICES:
            w = np.array(ffn[name])                                  # [P, E, a, b]
            key, k1, k2 = jax.random.split(key, 3)
            hit = np.asarray(jax.random.bernoulli(k1, share, w.shape))
            bump = 3 * np.abs(w).mean() * np.asarray(jax.random.normal(k2, w.shape))
            ffn[name] = w[:, :1] + hit * bump
    return params


def export_model(tmp_path, cfg, params, name="model", **kw):
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir(exist_ok=True)
    (tok_dir / "tokenizer.byte").write_text("utf-8 bytes\n")
    out = tmp_path / name
    write_model_dir(str(out), cfg, params, str(tok_dir), log=lambda *_: None, **kw)
    return str(out)


def exported_model(tmp_path, small_cfg):
    """(config, float params, model dir) of a small routed model whose experts are
    near-copies of each other, so neighbour deltas are small (the `exported` fixture)."""
    cfg = routed_cfg(small_cfg)
    params = init_params(cfg.model, jax.random.key(0), moe=cfg.moe)
    params = similar_experts(params, cfg, jax.random.key(1))
    return cfg, params, export_model(tmp_path, cfg, params)


def distinct_model(tmp_path, small_cfg):
    """(config, float params, model dir) of a small routed model whose experts really
    differ (scaled-up down projections), so MPD's perspectives disagree."""
    cfg = routed_cfg(small_cfg)
    params = init_params(cfg.model, jax.random.key(0), moe=cfg.moe)
    params = jax.tree_util.tree_map_with_path(
        lambda p, a: a * 12.0 if "w_down" in jax.tree_util.keystr(p) else a, params)
    return cfg, params, export_model(tmp_path, cfg, params)


def reference_logits(cfg, params, prompt, steps, ext=None):
    """In-memory model with the exported (ternary) expert values (and int8 expert
    activations when the export's config has ternary.activation_bits=8), under the
    model extensions `ext` (None: the plain model)."""
    bits = cfg.ternary.activation_bits if cfg.ternary.enabled else 0
    model = PerspectiveLM(cfg.model, cfg.moe, activation_bits=bits)
    used = with_ternary_experts(jax.tree.map(np.asarray, params), cfg)
    cache = init_cache(cfg.model, 1)
    apply = jax.jit(lambda p, toks, c: model.apply({"params": p}, toks, cache=c, ext=ext))
    logits, cache = apply(used, jnp.asarray(prompt)[None], cache)
    out = [np.asarray(logits[0, -1])]
    for tok in steps:
        logits, cache = apply(used, jnp.asarray([[tok]]), cache)
        out.append(np.asarray(logits[0, -1]))
    return out


def assert_engine_matches(engine, ref, prompt, steps):
    """Prefill `prompt`, then feed `steps` one by one; logits must equal `ref`, and the
    read buffers alive outside the host cache never outnumber those its budget holds, nor
    the expert regions alive on the device its slots."""
    state = engine.new_state()
    got, state = engine.forward(prompt, state)
    np.testing.assert_allclose(got, ref[0], rtol=1e-4, atol=1e-4)
    for k, tok in enumerate(steps):
        got, state = engine.forward(np.array([tok]), state)
        np.testing.assert_allclose(got, ref[k + 1], rtol=1e-4, atol=1e-4, err_msg=f"step {k}")
    if engine.routed:
        engine.tiers.flush_admissions()
        assert engine.tiers.buffers_peak <= engine.tiers.buffers_budgeted
        assert 0 < engine.slots.regions_peak <= engine.n_slots


def token_logits(cfg, params):
    """f(tokens) -> logits [T, V] after each token of `tokens`, the in-memory model
    (exported expert values, as `reference_logits`) fed one token at a time from an
    empty cache: one compiled step for every call of f."""
    bits = cfg.ternary.activation_bits if cfg.ternary.enabled else 0
    model = PerspectiveLM(cfg.model, cfg.moe, activation_bits=bits)
    used = with_ternary_experts(jax.tree.map(np.asarray, params), cfg)
    apply = jax.jit(lambda p, tok, c: model.apply({"params": p}, tok, cache=c))

    def run(tokens):
        cache, out = init_cache(cfg.model, 1), []
        for tok in tokens:
            logits, cache = apply(used, jnp.asarray([[int(tok)]]), cache)
            out.append(np.asarray(logits[0, -1]))
        return np.stack(out)
    return run


def flip_bit(path, offset: int) -> None:
    """Flip the lowest bit of the byte at `offset` of the file `path` (damage)."""
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0x01]))


def train_heads(cfg, params, tokens, steps: int = 60, lr: float = 0.05):
    """params whose expert-predictor heads (only) took `steps` Adam steps on their loss
    (`train.objective.predictor_terms`) over `tokens` [B, T], with the exported
    expert values; the other parameters are returned unchanged."""
    import optax
    from perspective_jax.model.transformer import is_predictor_path
    from perspective_jax.train.objective import predictor_terms
    model = PerspectiveLM(cfg.model, cfg.moe)
    used = with_ternary_experts(jax.tree.map(np.asarray, params), cfg)
    mask = jax.tree_util.tree_map_with_path(
        lambda p, _: is_predictor_path("/".join(str(k.key) for k in p)), used)

    def loss(p):
        _, state = model.apply({"params": p}, tokens, mutable=["aux"])
        terms = predictor_terms(state["aux"], cfg)
        return terms["layer_loss"] + terms["token_loss"]

    tx = optax.masked(optax.adam(lr), mask)
    opt = tx.init(used)

    @jax.jit
    def step(p, opt):
        grads = jax.grad(loss)(p)
        updates, opt = tx.update(grads, opt, p)
        return optax.apply_updates(p, updates), opt

    for _ in range(steps):
        used, opt = step(used, opt)
    return jax.tree.map(lambda old, new, m: np.asarray(new) if m else old,
                        params, used, mask)
