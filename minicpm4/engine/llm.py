"""`LLM`: the engine's step loop (issue 5; docs/architecture.md "Request lifecycle").

`add_request` validates and queues a request (thread-safe, like `abort`); `step` admits new
requests, applies aborts, asks the `Scheduler` for this step's tokens, runs them through the
`ModelRunner` over the paged cache, samples the sequences whose tokens are all computed, applies
stop rules, frees finished sequences and returns one `RequestOutput` delta per request that
produced something. `generate` is the offline API: queue everything, step until done.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Sequence as Seq

import torch

from minicpm4.engine.config import EngineConfig
from minicpm4.engine.errors import EngineBusyError
from minicpm4.engine.generate import GenerationOutput
from minicpm4.engine.kv_cache import BlockPool, block_bytes
from minicpm4.engine.outputs import RequestOutput, TokenLogprob
from minicpm4.engine.request import SamplingParams, check_prompt
from minicpm4.engine.runner import ModelRunner
from minicpm4.engine.sampler import apply_penalties, sample, token_counts
from minicpm4.engine.scheduler import Scheduler
from minicpm4.engine.sequence import Sequence
from minicpm4.engine.stopping import StopChecker
from minicpm4.kernels.greedy import argmax_rows
from minicpm4.model.transformer import MiniCPM4ForCausalLM
from minicpm4.utils import hugepages
from minicpm4.utils.histogram import Histogram


class LLM:
    def __init__(self, model: MiniCPM4ForCausalLM, tokenizer=None,
                 config: EngineConfig | None = None) -> None:
        self.model = model.eval()
        if model.device.type == "cpu":  # decode streams the weights: keep them in huge pages
            hugepages.move_to_huge_pages(model)
        self.tokenizer = tokenizer
        self.config = config = config or EngineConfig()
        cfg = model.config
        self.max_model_len = config.max_model_len or cfg.max_position_embeddings
        if self.max_model_len > cfg.max_position_embeddings:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's "
                             f"max_position_embeddings {cfg.max_position_embeddings}")
        num_blocks = config.num_kv_blocks or max(
            2, config.kv_cache_bytes // block_bytes(cfg, config.block_size, model.dtype))
        self.pool = BlockPool(cfg, num_blocks=num_blocks, block_size=config.block_size,
                              dtype=model.dtype, device=model.device,
                              enable_prefix_caching=config.enable_prefix_caching)
        nope = cfg.sparse_config is not None and cfg.sparse_config.use_nope
        self.scheduler = Scheduler(self.pool, config, whole_prefill=nope)
        self.runner = ModelRunner(model, self.pool, pad_id=cfg.pad_token_id or 0)
        self.eos_ids = set(cfg.eos_token_id) | (set(tokenizer.stop_token_ids)
                                                if tokenizer is not None else set())
        self._seqs: dict[str, Sequence] = {}
        self._lock = threading.Lock()
        self._incoming: list[Sequence] = []
        self._aborts: set[str] = set()
        self._ids = itertools.count()
        self.counters = dict(prompt_tokens_total=0, generation_tokens_total=0,
                             requests_finished_total=0, requests_aborted_total=0,
                             steps_total=0)
        self.timings = {k: Histogram() for k in
                        ("time_to_first_token_seconds", "time_per_output_token_seconds",
                         "queue_time_seconds", "e2e_latency_seconds")}

    # ---------------------------------------------------------------- requests
    def add_request(self, prompt_ids: Seq[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Validate and queue; returns the request id. Raises ValueError for a bad request."""
        params = params or SamplingParams()
        prompt = [int(t) for t in prompt_ids]
        vocab = self.model.config.vocab_size
        check_prompt(len(prompt), params, self.max_model_len)
        if any(not 0 <= t < vocab for t in prompt):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        need = self.pool.blocks_for(len(prompt) + params.max_tokens)
        if need > self.pool.num_usable:
            raise ValueError(f"the request needs {need} KV blocks; the pool has "
                             f"{self.pool.num_usable}")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        request_id = request_id or f"req-{next(self._ids)}"
        stop = StopChecker(params, self.eos_ids, self.tokenizer, prompt)
        seq = Sequence(request_id, prompt, params, stop=stop, device=self.model.device)
        with self._lock:
            if request_id in self._seqs or any(s.request_id == request_id
                                               for s in self._incoming):
                raise ValueError(f"request id {request_id!r} is already in use")
            queued = len(self.scheduler.waiting) + len(self._incoming)
            if queued >= self.config.max_queued_requests:
                raise EngineBusyError(f"{queued} requests are already queued (limit "
                                      f"{self.config.max_queued_requests}); retry later")
            self._incoming.append(seq)
        return request_id

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.add(request_id)

    def abort_all(self) -> list[str]:
        """End every admitted request now (after a failed step): their pages and decode
        state are freed. Requests added since the step began are kept. Returns the ids."""
        ended = list(self._seqs)
        for seq in self._seqs.values():
            if not seq.finished:
                seq.finish("abort")
                self.counters["requests_aborted_total"] += 1
            self.scheduler.remove(seq)
        self._seqs.clear()
        self.pool.sparse_states.clear()
        return ended

    def load(self) -> tuple[int, int]:
        """(running, waiting) requests, cheaply (for admission control and health checks)."""
        return len(self.scheduler.running), len(self.scheduler.waiting) + len(self._incoming)

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._seqs or self._incoming or self._aborts)

    # ---------------------------------------------------------------- one step
    def step(self) -> list[RequestOutput]:
        with self._lock:
            incoming, self._incoming = self._incoming, []
            aborts, self._aborts = self._aborts, set()
        for seq in incoming:
            self._seqs[seq.request_id] = seq
            self.scheduler.add(seq)
            self.counters["prompt_tokens_total"] += len(seq.prompt_ids)
        for rid in aborts:
            seq = self._seqs.get(rid)
            if seq is not None and not seq.finished:
                seq.finish("abort")
                self.counters["requests_aborted_total"] += 1
        outputs = self._reap()  # aborted requests leave before scheduling
        sched = self.scheduler.schedule()
        if sched.scheduled:
            logits_RV, rows = self.runner.run(sched.scheduled)
            for seq, n in sched.scheduled:
                self.scheduler.commit(seq, n)
            self._sample([s for s, _ in sched.scheduled if s.request_id in rows],
                         logits_RV, rows)
            self.counters["steps_total"] += 1
        return outputs + self._reap()

    def _sample(self, seqs: list[Sequence], logits_RV: torch.Tensor,
                rows: dict[str, int]) -> None:
        if not seqs:
            return
        index = [rows[s.request_id] for s in seqs]
        logits_BV = logits_RV if index == list(range(logits_RV.shape[0])) else \
            logits_RV.index_select(0, torch.tensor(index, device=logits_RV.device))
        params = [s.params for s in seqs]
        if all(p.greedy and not p.penalized and p.logprobs is None for p in params):
            # greedy only: the maxima of the logits as they are (no fp32 copy)
            tokens = argmax_rows(logits_BV).tolist()
        else:
            logits_BV = logits_BV.float()
            if any(p.penalized for p in params):  # once, for the sample and its logprobs
                vocab, dev = logits_BV.shape[1], logits_BV.device
                logits_BV = apply_penalties(
                    logits_BV, params,
                    prompt_counts_BV=token_counts([s.prompt_ids for s in seqs], vocab, dev),
                    output_counts_BV=token_counts([s.output_ids for s in seqs], vocab, dev))
            tokens = sample(logits_BV, params, [s.generator for s in seqs]).tolist()
        logprob_rows = {i: j for j, i in enumerate(
            i for i, p in enumerate(params) if p.logprobs is not None)}
        lp_RV = None
        if logprob_rows:
            rows = torch.tensor(list(logprob_rows), device=logits_BV.device)
            lp_RV = torch.log_softmax(logits_BV.index_select(0, rows), dim=-1)
        for i, (seq, tok) in enumerate(zip(seqs, tokens)):
            entry = None
            if lp_RV is not None and i in logprob_rows:
                lp_V = lp_RV[logprob_rows[i]]
                top = lp_V.topk(seq.params.logprobs) if seq.params.logprobs else None
                entry = TokenLogprob(tok, float(lp_V[tok]), [] if top is None else
                                     list(zip(top.indices.tolist(), top.values.tolist())))
            seq.record_token(tok, entry)
            self.counters["generation_tokens_total"] += 1
            if not seq.finished and seq.num_tokens >= self.max_model_len:
                seq.finish("length")

    def _reap(self) -> list[RequestOutput]:
        """Deltas for every request with news; finished requests leave the engine."""
        outs = []
        for rid, seq in list(self._seqs.items()):
            if not (seq.pending_ids or seq.pending_text or seq.finished):
                continue
            outs.append(RequestOutput(
                request_id=rid, new_token_ids=seq.pending_ids, new_text=seq.pending_text,
                finish_reason=seq.finish_reason, num_prompt_tokens=len(seq.prompt_ids),
                num_generated_tokens=len(seq.output_ids),
                logprobs=seq.pending_logprobs if seq.params.logprobs is not None else None,
                metrics=seq.metrics if seq.finished else None))
            seq.pending_ids, seq.pending_text, seq.pending_logprobs = [], "", []
            if seq.finished:
                self.scheduler.remove(seq)
                del self._seqs[rid]
                self._record_finished(seq)
        return outs

    def _record_finished(self, seq: Sequence) -> None:
        m = seq.metrics
        self.counters["requests_finished_total"] += 1
        if m.time_to_first_token is not None:
            self.timings["time_to_first_token_seconds"].observe(m.time_to_first_token)
        if m.queue_time is not None:
            self.timings["queue_time_seconds"].observe(m.queue_time)
        self.timings["e2e_latency_seconds"].observe((m.finished_time or time.time())
                                                   - m.arrival_time)
        tpot = m.time_per_output_token(len(seq.output_ids))
        if tpot is not None:
            self.timings["time_per_output_token_seconds"].observe(tpot)

    # ---------------------------------------------------------------- offline API
    def generate(self, prompts: Seq[Seq[int] | str],
                 params: SamplingParams | Seq[SamplingParams] | None = None
                 ) -> list[GenerationOutput]:
        """Run every prompt (token ids, or text with a tokenizer) to completion, batched
        continuously; one `GenerationOutput` per prompt, in order."""
        plist = list(params) if isinstance(params, (list, tuple)) else \
            [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} SamplingParams for {len(prompts)} prompts")
        ids = []
        for p in prompts:
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError("text prompts need a tokenizer")
                p = self.tokenizer.encode(p)
            ids.append(list(p))
        rids = [self.add_request(p, sp) for p, sp in zip(ids, plist)]
        results = {rid: GenerationOutput(prompt_tokens=len(p)) for rid, p in zip(rids, ids)}
        while any(r.finish_reason is None for r in results.values()):
            for out in self.step():
                res = results.get(out.request_id)
                if res is not None:
                    res.token_ids += out.new_token_ids
                    res.text += out.new_text
                    res.finish_reason = out.finish_reason
        return [results[r] for r in rids]

    # ---------------------------------------------------------------- metrics
    def stats(self) -> dict:
        s = dict(self.counters)
        s.update(num_running=len(self.scheduler.running),
                 num_waiting=len(self.scheduler.waiting) + len(self._incoming),
                 kv_blocks_used=self.pool.num_used, kv_blocks_total=self.pool.num_usable,
                 preemptions_total=self.scheduler.num_preemptions,
                 prefix_cache_hit_tokens_total=self.scheduler.prefix_hit_tokens)
        s.update({k: h.snapshot() for k, h in self.timings.items()})
        return s
