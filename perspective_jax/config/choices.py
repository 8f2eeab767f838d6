"""Every closed set of choices, defined once (config validation, CLIs and the code
that acts on a choice all import it from here)."""

from __future__ import annotations

# model.layer_pattern entries and model.dtype / param_dtype
LAYER_KINDS = ("pdr", "gqa")
DTYPES = ("float32", "bfloat16", "float16")
# model.pdr_impl: kernels_pallas.pdr_scan (auto: Pallas on a GPU where it fits, else chunked)
PDR_IMPLS = ("auto", "chunked", "matmul", "scan", "associative", "pallas")
# moe.dispatch: perspective_jax.moe.dispatch (auto: ragged on GPU/TPU, blocked on CPU)
DISPATCH_IMPLS = ("auto", "ragged", "blocked", "dense")
# moe.gate: perspective_jax.model.routed_ffn
GATES = ("straight_through", "softmax")
# moe.delta_form: perspective_jax.model.expert_sharing (distance between neighbour experts)
DELTA_FORMS = ("float", "ternary")
# routing perspectives (SPEC §3.6): perspective_jax.model.routed_ffn.select_expert
ROUTE_MODES = ("nearest", "kth", "antipode", "random")
# mpd.state: how the perspectives keep state (model/mpd.py)
MPD_STATES = ("forked", "persistent")
# mpd.confidence: what MPD reports as a token's confidence (model/mpd.py)
MPD_CONFIDENCES = ("ensemble", "agreement")
# what a recalled memory value injects (memory.recall.RecallConfig.inject): the
# embedding of the value token that follows the text so far, or the value's mean
INJECT_MODES = ("next_token", "mean")
# forward-gradient directions (adapt.forward_grad) and the adapter optimiser (adapt.loop)
FG_ESTIMATORS = ("plain", "orthogonal", "antithetic", "guided")
ADAPT_OPTIMIZERS = ("adam", "sgd")
# model.remat
REMAT_POLICIES = ("none", "full", "dots")
# ternary.scale_granularity
SCALE_GRANULARITIES = ("tensor", "row")
# data.tokenizer
TOKENIZERS = ("sentencepiece", "byte")
# data.binary_files: what reading the corpus does with a file that is not text
BINARY_FILES = ("skip", "refuse")
# perspective-train --stage (the curriculum in order, "safety" = the safety polytope of a
# trained model (not part of the curriculum), then "all" = every curriculum stage)
MESH_AXES = ("data", "fsdp", "expert", "tensor")   # the device mesh, in this order
BATCH_AXES = ("data", "fsdp", "expert")            # the global batch is split over these

CURRICULUM = ("dense", "upcycle", "sparse", "ternary", "align")
SAFETY_STAGE = "safety"
STAGES = (*CURRICULUM, SAFETY_STAGE, "all")
ROUTED_STAGES = ("upcycle", "sparse", "ternary", "align")
TERNARY_STAGES = ("ternary", "align")
# streaming engine: prefetch predictors and expert-store read paths
PREDICTORS = ("auto", "router", "previous", "learned")
IO_MODES = ("mmap", "direct")
# export: tied embedding/head storage
EMBEDDING_FORMATS = ("float32", "int8")
# sampling temperature range (model.sampling.Sampling, perspective-infer --temperature);
# beyond it sampling is uniform in all but rounding, and float32 overflows near 3e38
TEMPERATURE_RANGE = (0.0, 100.0)
# seeds (data.seed + train.seed seed grain's shuffle, which takes [0, 2**32))
SEED_RANGE = (0, 2**31 - 1)
