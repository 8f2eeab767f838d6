"""Continuous batching: one thread owns the streaming engine and decodes every
running sequence together, one batched step at a time.

    sched = Scheduler(load, max_batch=16, max_queue=64)   # load() → (engine, tokenizer)
    sched.start()                                         # loads on its own thread
    job = Job(prompts=[[ids…]], decoding=Decoding(...), emit=callback)
    sched.submit(job)            # APIError 429 when the queue is full, 503 if not ready
    job.cancel()                 # a client went away: its rows leave before the next step

Between two steps the scheduler drops cancelled sequences, admits queued jobs while
there is room (a job's `n` choices join together), prefills each new prompt on its
own (`engine.forward`) and samples its first token, then runs one
`engine.step_batch` over all running sequences. They stay stacked between steps
(`infer.state.Batch`, rebuilt only when sequences join or leave, padded to a power
of two by `batch_bucket` so few batch shapes are compiled); each expert a step
needs is brought to the device once for the batch. Sampling is the one rule
(`model.sampling.sample_rows`, one draw for the batch) with the key
`fold_in(key(seed), step)` per sequence, so a request with a seed reproduces — and
equals `perspective-infer --seed` for the same prompt — whatever else is running.
Choice j of a request uses seed + j. Text is cut and released by
`infer.text_stream.TextStream`; MPD (the request's `perspective.mpd`) by
`infer.mpd_engine.mpd_on_engine`, the same steps `perspective-infer --mpd` takes.
The safety projection (`perspective.safety`; `polytope` given) by
`infer.safety_guard.SafetyGuard`, built on the engine once it is loaded: each
guarded sequence keeps its text's tail, and a step whose batch holds any builds the
[B, F] flag mask with the other rows (and the padding) not `enabled`, so their
logits are the plain model's; a step without any runs as before. The memory
(`perspective.memory`, with MPD; `memory` given) is consulted by the same
`mpd_on_engine` where the views find no majority, each sequence keeping the last
ids it fed as the query.
The adapter (`adapter` given: `perspective-serve --adapter`; `perspective.adapter`,
on by default) runs through `serve.adapter.ServedAdapter`: a sequence with it makes
every engine call — prefill, its MPD views, a memory injection — on the adapted
view of the engine, one without on the engine itself. A step whose batch holds
both kinds runs each kind's rows as a batch of its own (padded to `batch_bucket`),
then puts the rows back in their order, so each row gets the model it asked for;
a step of one kind runs as before.

Events (`serve.jobs`) go to `job.emit` from the scheduler thread.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import threading
import time
from typing import Callable, Optional

import numpy as np

from perspective_jax.config.schema import MPDConfig
from perspective_jax.errors import UserError
from perspective_jax.infer import state as S
from perspective_jax.infer.mpd_engine import mpd_on_engine
from perspective_jax.infer.safety_guard import SafetyGuard
from perspective_jax.infer.session import top_probability
from perspective_jax.infer.text_stream import TextStream
from perspective_jax.model.sampling import log_probs, sample_rows
from perspective_jax.serve.api_errors import APIError
from perspective_jax.serve.jobs import Done, Failed, Finished, Job, Prompt, Token, TopLogprob
from perspective_jax.serve.protocol import SEED_MODULUS, Decoding


@dataclasses.dataclass
class _Seq:
    """One choice being decoded."""
    job: Job
    index: int
    state: object                      # its EngineState until it joins the batch
    logits: np.ndarray                 # the logits its next token is sampled from
    before: object                     # state before the token last fed (MPD): an
    fed: int                           # EngineState, or (Batch, row) read when needed
    stream: TextStream
    seed: int
    steps: int = 0
    pending: int = -1
    mpd_spent: int = 0
    row: Optional[int] = None          # its row in the scheduler's Batch
    tail: Optional[bytes] = None       # its text's tail when guarded (safety), else None
    context: Optional[list] = None     # its last ids fed when it consults the memory


class Scheduler:
    def __init__(self, load: Callable, max_batch: int = 16, max_queue: int = 64,
                 mpd: MPDConfig = MPDConfig(), metrics=None, polytope=None,
                 memory: Optional[Callable] = None, adapter: Optional[Callable] = None):
        if max_batch < 1 or max_queue < 1:
            raise UserError("the batch and the queue must each hold at least 1")
        self.load, self.max_batch, self.max_queue = load, max_batch, max_queue
        self.mpd_config, self.metrics, self.polytope = mpd, metrics, polytope
        self.engine = self.tokenizer = self.guard = None
        self.memory, self.recall = memory, None   # memory(engine, tokenizer) → MemoryRecall
        self.adapter, self.served = adapter, None  # adapter(engine) → ServedAdapter
        self.ready = threading.Event()
        self.load_error: Optional[str] = None
        self.waiting: collections.deque = collections.deque()
        self.running: list[_Seq] = []
        self.batch: Optional[S.Batch] = None     # the running sequences, stacked
        self.dirty = True                        # running changed since the batch
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="perspective-scheduler",
                                       daemon=True)

    # ---------------------------------------------------------------- control
    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Fail what is queued or running with 503 and end the thread."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def submit(self, job: Job) -> None:
        if self.load_error is not None:
            raise APIError(503, f"the model failed to load: {self.load_error}")
        if not self.ready.is_set():
            raise APIError(503, "the model is still loading; retry shortly (GET /health)",
                           code="loading")
        if job.rows > self.max_batch:
            raise APIError(400, f"n × prompts = {job.rows} sequences is more than the "
                                f"server runs at once ({self.max_batch}, --max-batch)",
                           param="n")
        with self.cond:
            if self.stopping:
                raise APIError(503, "the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise APIError(429, f"the queue is full ({self.max_queue} requests waiting, "
                                    "--max-queue); retry later", code="queue_full")
            self.waiting.append(job)
            self.cond.notify_all()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def running_sequences(self) -> int:
        return len(self.running)

    # ---------------------------------------------------------------- the thread
    def _run(self) -> None:
        try:
            self.engine, self.tokenizer = self.load()
            if self.polytope is not None:
                self.guard = SafetyGuard.for_engine(self.polytope, self.engine,
                                                    self.tokenizer)
            if self.memory is not None:
                self.recall = self.memory(self.engine, self.tokenizer)
                self.engine.stats.memory_on = True
            if self.adapter is not None:
                self.served = self.adapter(self.engine)
        except BaseException as exc:                       # noqa: BLE001 — reported
            self.load_error = str(exc) or type(exc).__name__
            if self.engine is not None:
                self.engine.close()
            return
        self.ready.set()
        try:
            while True:
                with self.cond:
                    while not (self.stopping or self.waiting or self.running):
                        self.cond.wait(0.5)
                    if self.stopping:
                        break
                try:
                    self._drop_cancelled()
                    self._admit()
                    if self.running:
                        self._step()
                except Exception as exc:                    # noqa: BLE001 — a bug or a
                    for job in {id(s.job): s.job for s in self.running}.values():
                        self._fail(job, exc)                # failed device: those jobs
                    self.running, self.batch = [], None     # end with 500, others go on
        finally:
            self._fail_all(APIError(503, "the server is shutting down"))
            self.engine.close()

    def _drop_cancelled(self) -> None:
        gone = [s for s in self.running if s.job.cancelled.is_set()]
        if gone:
            self.running = [s for s in self.running if not s.job.cancelled.is_set()]
            self.dirty = True

    def _admit(self) -> None:
        while True:
            with self.cond:
                if not self.waiting:
                    return
                job = self.waiting[0]
                if job.cancelled.is_set():
                    self.waiting.popleft()
                    continue
                if self.running and len(self.running) + job.rows > self.max_batch:
                    return
                self.waiting.popleft()
            try:
                self._start(job)
            except (APIError, UserError) as exc:
                self._fail(job, exc)
            except Exception as exc:                        # noqa: BLE001 — the engine
                self._fail(job, exc)

    def _start(self, job: Job) -> None:
        """Prefill each prompt, then sample each choice's first token."""
        d, guard = job.decoding, self.guard
        if d.safety and guard is None:
            raise APIError(400, "perspective.safety: this server has no safety polytope",
                           param="perspective.safety")
        if d.adapter and self.served is None:
            raise APIError(400, "perspective.adapter: this server has no adapter",
                           param="perspective.adapter")
        engine = self._engine_for(d)
        if d.adapter and self.metrics is not None:
            self.metrics.adapter_request()
        for p, ids in enumerate(job.prompts):
            tokens = np.asarray(ids, np.int32)
            state0 = engine.new_state()
            tail = ext = None
            if d.safety:                       # the last position, or every one (echo)
                if d.echo:
                    ext, tail = guard.prefill_extensions(b"", ids)
                else:
                    tail = guard.extend(b"", ids)
                    ext = guard.extensions([tail])
            if d.echo:
                every, state = self._feed(engine, tokens, state0, ext, all_logits=True)
                job.emit(self._prompt_event(p, ids, every, d.logprobs))
                last = every[-1]
            before, fed = state0, int(tokens[-1])
            if d.mpd and tokens.size > 1:
                _, before = engine.forward(tokens[:-1], state0)
                if not d.echo:
                    last, state = self._feed(engine, tokens[-1:], before, ext)
            elif not d.echo:
                last, state = self._feed(engine, tokens, state0, ext)
            for c in range(d.n):
                seq = _Seq(job, p * d.n + c, state, last, before, fed,
                           TextStream(self.tokenizer, d.stop), (job.seed + c) % SEED_MODULUS,
                           tail=tail, context=self._window(list(ids)) if d.memory else None)
                if d.max_tokens == 0:                       # echo only: nothing to generate
                    self._finish(seq, "length")
                    continue
                if self._advance(seq):
                    self.running.append(seq)
                    self.dirty = True

    def _engine_for(self, d: Decoding):
        """The engine a request's calls go to: the adapted view or the plain engine."""
        return self.engine if not d.adapter else self.served.engine_for(True)

    def _feed(self, engine, tokens, state, ext, all_logits: bool = False):
        """engine.forward; with `ext` (the guard's), its projections are counted."""
        out = engine.forward(tokens, state, ext, all_logits=all_logits)
        if ext is not None:
            self.guard.observe(self.engine)
        return out

    def _rebuild(self) -> None:
        """The Batch of the running sequences: rows kept from the last one, then the
        sequences that joined, then padding (repeats of row 0) up to `batch_bucket`."""
        old = [s for s in self.running if s.row is not None]
        new = [s for s in self.running if s.row is None]
        parts = []
        if old:
            parts.append(S.take_rows(self.batch, [s.row for s in old]))
        if new:
            parts.append(S.batch_of([s.state for s in new]))
        batch = parts[0] if len(parts) == 1 else S.concat(*parts)
        self.running = old + new
        n = len(self.running)
        pad = batch_bucket(n, self.max_batch) - n
        if pad:
            batch = S.take_rows(batch, list(range(n)) + [0] * pad)
        for i, seq in enumerate(self.running):
            seq.row, seq.state = i, None
        self.batch, self.dirty = batch, False

    def _step(self) -> None:
        t0 = time.perf_counter()
        try:
            if self.dirty or self.batch is None:
                self._rebuild()
            rows = self.running
            kinds = [s.job.decoding.adapter for s in rows]
            if all(k == kinds[0] for k in kinds):
                logits, batch = self._step_rows(self.batch, rows)
            else:
                logits, batch = self._step_split(rows, kinds)
        except Exception as exc:                            # noqa: BLE001 — reported
            for job in {id(s.job): s.job for s in self.running}.values():
                self._fail(job, exc)
            self.running, self.batch = [], None
            return
        if self.metrics is not None:
            self.metrics.step(len(rows), time.perf_counter() - t0)
        previous, self.batch = self.batch, batch
        for r, seq in enumerate(rows):
            seq.before, seq.fed, seq.logits = (previous, r), seq.pending, logits[r]
        tokens = self._sample(rows, logits)
        lp = (np.asarray(log_probs(logits, self.tokenizer.vocab_size))   # one call for all
              if any(s.job.decoding.logprobs is not None for s in rows) else None)
        keep = [seq for r, (seq, tok) in enumerate(zip(rows, tokens))
                if self._advance(seq, tok, None if lp is None else lp[r])]
        if len(keep) != len(rows):
            self.dirty = True
        self.running = keep

    def _step_rows(self, batch: S.Batch, rows: list):
        """One engine step of `batch`, whose first rows are `rows` (all with the adapter
        or all without) and the rest padding: (logits [B, V], the next Batch)."""
        engine = self._engine_for(rows[0].job.decoding)
        pad = batch.size - len(rows)
        guarded = [r for r, s in enumerate(rows) if s.tail is not None]
        ext = (None if not guarded else self.guard.extensions(
            [s.tail or b"" for s in rows] + [b""] * pad,
            enabled=[s.tail is not None for s in rows] + [False] * pad))
        logits, batch = engine.step_batch(
            batch, [s.pending for s in rows] + [rows[0].pending] * pad, ext)
        if guarded:
            self.guard.observe(self.engine, guarded)
        return logits, batch

    def _step_split(self, rows: list, kinds: list):
        """`_step_rows` on the rows with the adapter and on those without, each taken
        out of the batch (padded to `batch_bucket`); the results put back in the
        batch's row order (its padding again repeats row 0)."""
        parts, outs, where, offset = [], [], {}, 0
        for kind in (True, False):
            idx = [r for r, k in enumerate(kinds) if k == kind]
            size = batch_bucket(len(idx), self.max_batch)
            sub = S.take_rows(self.batch, idx + [idx[0]] * (size - len(idx)))
            logits, batch = self._step_rows(sub, [rows[r] for r in idx])
            where.update({r: offset + j for j, r in enumerate(idx)})
            offset += size
            parts.append(batch)
            outs.append(np.asarray(logits))
        order = [where[r] for r in range(len(rows))]
        order += [where[0]] * (self.batch.size - len(rows))
        return np.concatenate(outs)[order], S.take_rows(functools.reduce(S.concat, parts),
                                                        order)

    def _sample(self, rows: list, logits: np.ndarray) -> list:
        """Each row's next token from logits [≥ len(rows), V] (padding rows beyond):
        one batched draw per distinct sampling rule (`model.sampling.sample_rows`,
        key fold_in(key(seed), step) per row — as a sequence alone draws)."""
        out = [0] * len(rows)
        n = logits.shape[0]
        pad = [rows[0]] * (n - len(rows))
        seeds = [s.seed for s in rows + pad]
        steps = [s.steps for s in rows + pad]
        for rule in {s.job.decoding.sampling for s in rows}:
            ids = sample_rows(logits, seeds, steps, rule, self.tokenizer.vocab_size)
            for b, seq in enumerate(rows):
                if seq.job.decoding.sampling == rule:
                    out[b] = int(ids[b])
        return out

    def _advance(self, seq: _Seq, tok: Optional[int] = None,
                 lp: Optional[np.ndarray] = None) -> bool:
        """Emit seq's next token (`tok`, or sampled from seq.logits; `lp` its
        log-probabilities when already computed); True while the sequence goes on."""
        job, d = seq.job, seq.job.decoding
        if job.cancelled.is_set():
            return False
        if tok is None:
            tok = self._sample([seq], seq.logits[None])[0]
        info = None
        if d.mpd:
            before = seq.before if isinstance(seq.before, S.EngineState) else S.row(*seq.before)
            recall = self.recall if d.memory else None
            info = mpd_on_engine(self._engine_for(d), seq.logits, tok, seq.steps, self.mpd_config,
                                 seq.mpd_spent, before, seq.fed,
                                 None if seq.tail is None else self.guard, seq.tail,
                                 recall, seq.context,
                                 lambda logits: self._sample([seq], logits[None])[0])
            tok = int(info.token[0])
            seq.mpd_spent += int(info.triggered[0])
        seq.steps += 1
        job.completion_tokens += 1
        eos = getattr(self.tokenizer, "eos_id", None)
        last = tok == eos or seq.steps >= d.max_tokens
        text, stopped = seq.stream.push(tok, last)
        logprob = top = conf = None
        if d.logprobs is not None:
            if lp is None:
                lp = np.asarray(log_probs(seq.logits, self.tokenizer.vocab_size))
            logprob, top = float(lp[tok]), _top(lp, d.logprobs)
        if d.confidence:
            conf = top_probability(seq.logits) if info is None else float(info.confidence[0])
        if job.first_token is None:
            job.first_token = time.perf_counter()
            if self.metrics is not None:
                self.metrics.first_token(job.first_token - job.submitted)
        job.emit(Token(seq.index, tok, text, logprob, top, conf,
                       info is not None and bool(info.triggered[0])))
        if stopped or last:
            self._finish(seq, "stop" if stopped or tok == eos else "length")
            return False
        seq.pending = tok
        if seq.tail is not None:                  # the text the next step is guarded after
            seq.tail = self.guard.extend(seq.tail, [tok])
        if seq.context is not None:               # the memory's query after the next feed
            seq.context = self._window(seq.context + [tok])
        return True

    def _window(self, ids: list) -> list:
        """The last ids a memory query is made of."""
        return ids[-self.recall.cfg.window:] if self.recall is not None else ids

    def _finish(self, seq: _Seq, reason: str) -> None:
        job = seq.job
        job.emit(Finished(seq.index, reason, seq.stream.text, seq.steps))
        job.open -= 1
        if job.open == 0:
            job.emit(Done(sum(len(p) for p in job.prompts), job.completion_tokens))

    def _prompt_event(self, p: int, ids: list, every: np.ndarray,
                      k: Optional[int]) -> Prompt:
        lp = np.asarray(log_probs(every[:-1], self.tokenizer.vocab_size))   # [T-1, V]
        logprobs = [None] + [float(lp[t, ids[t + 1]]) for t in range(len(ids) - 1)]
        top = [None] + [_top(lp[t], k or 0) for t in range(len(ids) - 1)]
        return Prompt(p, list(ids), logprobs, top)

    def _fail(self, job: Job, exc: BaseException) -> None:
        if isinstance(exc, APIError):
            err = exc
        elif isinstance(exc, UserError):
            err = APIError(400, str(exc))
        else:
            err = APIError(500, f"the engine failed: {type(exc).__name__}: {exc}")
        job.emit(Failed(err))
        job.cancel()

    def _fail_all(self, err: APIError) -> None:
        with self.cond:
            jobs = list(self.waiting) + [s.job for s in self.running]
            self.waiting.clear()
        self.running, self.batch = [], None
        for job in {id(j): j for j in jobs}.values():
            self._fail(job, err)


def batch_bucket(rows: int, max_batch: int) -> int:
    """Rows a step of `rows` sequences runs: the next power of two (at most max_batch,
    at least rows), so the engine's programs are compiled for log2(max_batch) + 1 batch
    shapes, not for every count. Padding rows repeat row 0 (its experts: no extra
    transfers) and are dropped."""
    return max(rows, min(1 << (rows - 1).bit_length(), max_batch))


def _top(lp: np.ndarray, k: int) -> list:
    """The k most likely ids of log-probabilities lp [V], most likely first."""
    if k <= 0:
        return []
    ids = np.argsort(-lp, kind="stable")[:k]
    return [TopLogprob(int(i), float(lp[i])) for i in ids]
