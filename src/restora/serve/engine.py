"""The batching scheduler: iteration-level (continuous) batching of requests for many adapters.

Orca (Yu et al., OSDI 2022) schedules at the granularity of one decoding step: requests join
and leave the running batch between steps instead of waiting for a whole batch to finish.
Punica / S-LoRA (arXiv:2310.18547, 2311.03285) let the rows of that batch use different LoRA
adapters over one base. Here both meet: one engine thread owns the model and loops

    1. run queued commands (load / unload an adapter) -- the model changes only between steps
    2. drop rows whose client went away (their KV-cache rows go too)
    3. admit waiting requests up to max_batch (and max_prefill_tokens padded prompt tokens): make their adapters resident (lazy load, LRU),
       prefill them together (left-padded, one adapter per row via set_rows), sample their
       first token, and merge their KV cache into the running one
    4. one decode step for every running row: input (B, 1), one slot per row

Merging: the running cache holds, per layer, K and V of shape (B, H, T, D) with the prompts
left-padded and a (B, T) attention mask. A prefilled group (B', H, T', D) is left-padded with
zeros to max(T, T') (mask 0 there), like the running cache, and concatenated on the batch
axis. Every row keeps its own position ids, so a row decodes as it would alone: masked
columns contribute nothing to attention. Columns no row uses any more are cut off the left
when rows leave. This is exact up to float summation order, which is why greedy output
through the server equals restora.infer.generate.greedy_generate.

Failures stay with the request that causes them. An adapter that cannot be loaded answers its
own request (400). A prefill that raises leaves the running batch as it was (the running rows and
their cache change only once a forward and its sampling have succeeded); the joining requests are
then prefilled one at a time, so only the one that fails gets the error. A row whose logits are
not finite (an adapter that overflows) is answered with an error and leaves the batch; the other
rows decode on. Only a failed decode step, one forward for every row, fails the running rows.

Rows finish at EOS, at a stop string (text cut before it), or after max_tokens; sampling is
per row: temperature 0 = greedy (argmax), else softmax(logits / T) restricted to the top-p
nucleus, drawn with the row's own torch.Generator (seeded when the request gives a seed).
Results leave through each request's `emit` callback (thread-safe on the caller's side).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from restora.infer.generate import cache_kwargs, greedy_tokens, output_cache
from restora.kernels.packed import can_pack, packed_linears
from restora.serve.adapters_root import ResidentAdapters, public_message
from restora.serve.sequence import (
    EngineConfig,
    EngineStoppedError,
    QueueFullError,
    Request,
    SamplingParams,
    cut_at_stop,
    streamable_length,
)

__all__ = ["SamplingParams", "EngineConfig", "Request", "Engine", "QueueFullError", "EngineStoppedError"]

log = logging.getLogger("restora.serve")


def _left_pad(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    extra = length - t.shape[dim]
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class Engine:
    """One thread that owns `model` and batches every request for the base and its adapters."""

    def __init__(self, model: nn.Module, tokenizer: Any, adapters: ResidentAdapters, config: EngineConfig) -> None:
        self.model, self.tok, self.adapters, self.config = model.eval(), tokenizer, adapters, config
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos or 0)
        self.device = next(model.parameters()).device
        self._cv = threading.Condition()
        self._pending: deque[Request] = deque()
        self._commands: deque[tuple[Callable[[], Any], Future]] = deque()
        self._stopping = False
        self._abort = False  # past stop()'s bound: answer everything still here with 503 and end
        self._thread: threading.Thread | None = None
        # the running batch: rows[b] owns row b of cache, mask (B, T), last_pos (B,), next_tok (B,);
        # None = a finished row still in the tensors until the next compaction (see _compact)
        self.rows: list[Request | None] = []
        self._dead_steps = 0
        self._cache: Any = None
        self._mask = self._last_pos = self._next_tok = torch.empty(0)
        self._rows_changed = True
        self.counts = {"completed": 0, "cancelled": 0, "rejected": 0, "failed": 0, "tokens": 0, "steps": 0}

    # -- the public side (any thread) ---------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="restora-engine", daemon=True)
        self._thread.start()

    def submit(self, req: Request) -> None:
        with self._cv:
            if self._stopping:
                raise EngineStoppedError("the server is shutting down")
            if len(self._pending) >= self.config.max_queue:
                self.counts["rejected"] += 1
                raise QueueFullError(f"{len(self._pending)} requests are waiting (max_queue {self.config.max_queue})")
            if req.params.temperature > 0:
                req.generator = torch.Generator()
                if req.params.seed is not None:
                    req.generator.manual_seed(req.params.seed)
                else:
                    req.generator.seed()
            self._pending.append(req)
            self._cv.notify()

    def cancel(self, req: Request) -> None:
        """The client went away: the request leaves the queue or the batch before the next step."""
        with self._cv:
            req.cancelled = True
            self._cv.notify()

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run fn() on the engine thread between steps (adapter load / unload)."""
        fut: Future = Future()
        with self._cv:
            self._commands.append((fn, fut))
            self._cv.notify()
        return fut

    def pinned(self) -> set[str]:
        """Adapters that running or waiting requests need."""
        with self._cv:
            return {r.adapter for r in [*self.live, *self._pending] if r.adapter is not None}

    def stop(self, timeout: float | None = None) -> None:
        """Drain: finish running and waiting requests, refuse new ones, then end the thread. After `timeout`
        seconds (None: no bound) the requests still running or waiting are answered 503 and dropped."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is None:
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            with self._cv:
                self._abort = True
                self._cv.notify()
            self._thread.join(5.0)  # a forward that never returns keeps the (daemon) thread; the process still exits

    def stats(self) -> dict[str, Any]:
        with self._cv:
            return {"running": len(self.live), "waiting": len(self._pending), "draining": self._stopping, **self.counts}

    @property
    def live(self) -> list[Request]:
        return [r for r in self.rows if r is not None]

    # -- the engine thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        with self._packed_head():
            self._serve()

    def _packed_head(self) -> AbstractContextManager[int]:
        """The LM head as a packed bf16 copy while the engine runs (restora.kernels.packed), on a CPU with bf16 under
        autocast: otherwise every step casts a float head anew (57 MB for SmolLM2's tied fp32 head; the planner's
        "LM head bf16 copy" item). The decoder's layers stay as they are: packing them would copy the base."""
        decoder = self.model.get_decoder() if hasattr(self.model, "get_decoder") else None
        on = self.config.bf16 and decoder is not None and can_pack(self.device)
        return packed_linears(self.model, enabled=on, skip=decoder)

    def _serve(self) -> None:
        while True:
            with self._cv:
                while not (self._pending or self._commands or self.rows or self._stopping):
                    self._cv.wait()
                if self._stopping and not (self._pending or self._commands or self.rows):
                    return
                if self._abort:
                    for r in [*self.live, *self._pending]:
                        self._send(r, ("error", 503, "the server is shutting down"))
                    self._pending.clear()
                    for _, fut in self._commands:
                        fut.set_exception(EngineStoppedError("the server is shutting down"))
                    self._commands.clear()
                    self.rows, self._cache = [], None
                    return
                commands = list(self._commands)
                self._commands.clear()
            for fn, fut in commands:
                try:
                    fut.set_result(fn())
                except Exception as e:  # handed to the caller's future
                    fut.set_exception(e)
            try:
                self._drop_cancelled()
                self._admit()
                self._compact()
                if self.live:
                    self._step()
            except Exception as e:  # a failed forward fails the batch, not the server
                log.exception("engine step failed")
                for r in self.live:
                    self._send(r, ("error", 500, f"generation failed: {type(e).__name__}: {public_message(str(e))}"))
                self.counts["failed"] += len(self.live)
                self._keep([])

    def _send(self, req: Request, event: tuple[Any, ...]) -> None:
        try:
            req.emit(event)
        except Exception:  # the client's loop is gone; nothing to tell
            log.debug("emit failed", exc_info=True)

    def _drop_cancelled(self) -> None:
        with self._cv:
            gone = [r for r in self._pending if r.cancelled]
            for r in gone:
                self._pending.remove(r)
        for b, r in enumerate(self.rows):
            if r is not None and r.cancelled:
                self.rows[b] = None  # its row is free now; _compact drops it from the tensors
                self.counts["cancelled"] += 1
        self.counts["cancelled"] += len(gone)

    def _admit(self) -> None:
        room = self.config.max_batch - len(self.live)
        if room <= 0:
            return
        pinned = {r.adapter for r in self.live if r.adapter is not None}
        chosen: list[Request] = []
        longest = 0
        with self._cv:
            for req in list(self._pending):
                if len(chosen) == room:
                    break
                longest = max(longest, len(req.prompt_ids))
                if chosen and (len(chosen) + 1) * longest > self.config.max_prefill_tokens:
                    break  # the next step's prefill takes the rest
                if req.adapter is not None and not self.adapters.can_load(req.adapter, pinned):
                    continue  # every slot serves running rows: wait for one to finish
                self._pending.remove(req)
                chosen.append(req)
                if req.adapter is not None:
                    pinned.add(req.adapter)
        if not chosen:
            return
        self._compact(force=True)  # one change of the batch's rows for leaving and joining rows together
        ready = []
        for req in chosen:
            try:
                req.slot = 0 if req.adapter is None else self.adapters.ensure(req.adapter, pinned)
                ready.append(req)
            except Exception as e:  # AdapterLoadError names the adapter; anything else is said the same way
                msg = str(e) if str(e).startswith(f"adapter {req.adapter!r}") else \
                    f"adapter {req.adapter!r} cannot be loaded: {public_message(str(e)) or type(e).__name__}"
                self._send(req, ("error", 400, msg))
                self.counts["failed"] += 1
        if not ready:
            return
        try:  # one prefill for every joining row, whatever its adapter (a row-gathered forward)
            self._prefill(ready)
            return
        except Exception as e:
            if len(ready) == 1:
                self._fail(ready[0], e)
                return
            log.warning("a prefill of %d joining requests failed (%s): prefilling them one at a time", len(ready), e)
        for req in ready:  # only the request that fails hears of it
            try:
                self._prefill([req])
            except Exception as e:
                self._fail(req, e)

    def _fail(self, req: Request, e: BaseException) -> None:
        """A joining request whose prefill raised: answer it (500); the running batch is unchanged."""
        if req.failed:  # already answered by _sample
            return
        req.failed = True
        log.error("prefill failed for a request on %s", req.adapter or "the base", exc_info=e)
        self._send(req, ("error", 500, f"generation failed for this request: {type(e).__name__}"))
        self.counts["failed"] += 1

    def _forward(self, **kw: Any) -> Any:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.config.bf16 and self.device.type == "cpu"):
            return self.model(**kw, use_cache=True)

    def _prefill(self, reqs: list[Request]) -> None:
        T = max(len(r.prompt_ids) for r in reqs)
        ids = torch.full((len(reqs), T), self.pad, dtype=torch.long)
        mask = torch.zeros((len(reqs), T), dtype=torch.long)
        for j, r in enumerate(reqs):  # left padding
            ids[j, T - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[j, T - len(r.prompt_ids):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B', T) position of each real token
        self.adapters.bank.set_rows([r.slot for r in reqs])
        self._rows_changed = True
        out = self._forward(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                            position_ids=pos.to(self.device), logits_to_keep=1)
        first = self._sample(out.logits[:, -1], reqs)
        cache = output_cache(out)
        if not self.rows:
            self._cache, self._mask, self._last_pos, self._next_tok = cache, mask, pos[:, -1], first
        else:  # merge: left-pad the shorter of the two caches, stack on the batch axis
            L = max(self._mask.shape[1], T)
            merged = [(torch.cat([_left_pad(a.keys, L, 2), _left_pad(b.keys, L, 2)]),  # (B+B', H, L, D)
                       torch.cat([_left_pad(a.values, L, 2), _left_pad(b.values, L, 2)]))
                      for a, b in zip(self._cache.layers, cache.layers)]
            mask = torch.cat([_left_pad(self._mask, L, 1), _left_pad(mask, L, 1)])  # (B+B', L)
            for a, (k, v) in zip(self._cache.layers, merged):  # nothing below raises: the batch changes at once
                a.keys, a.values = k, v
            self._mask = mask
            self._last_pos = torch.cat([self._last_pos, pos[:, -1]])
            self._next_tok = torch.cat([self._next_tok, first])
        self.rows.extend(reqs)
        self._advance(len(self.rows) - len(reqs))

    def _step(self) -> None:
        if self._rows_changed:
            self.adapters.bank.set_rows([0 if r is None else r.slot for r in self.rows])
            self._rows_changed = False
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(self.rows), 1)], dim=1)  # (B, T+1)
        self._last_pos = self._last_pos + 1
        out = self._forward(input_ids=self._next_tok[:, None].to(self.device), attention_mask=self._mask.to(self.device),
                            position_ids=self._last_pos[:, None].to(self.device),
                            **cache_kwargs(self.model, self._cache))
        self._cache = output_cache(out)
        self._next_tok = self._sample(out.logits[:, -1], self.rows)
        self.counts["steps"] += 1
        self._advance(0)

    def _sample(self, logits: torch.Tensor, reqs: Sequence[Request | None]) -> torch.Tensor:
        """(B, V) logits -> (B,) tokens: argmax, or each row's temperature / top-p draw. A row whose logits are not
        finite is answered with an error and marked failed (it leaves the batch in _advance); the others go on."""
        toks = greedy_tokens(logits).cpu()
        finite = torch.isfinite(logits).all(-1).cpu()
        for j, r in enumerate(reqs):
            if r is None or r.failed:
                continue
            if not finite[j]:
                r.failed = True
                self._send(r, ("error", 500, f"{'adapter ' + repr(r.adapter) if r.adapter else 'the base'} produced "
                                             "NaN or infinite logits: generation stopped for this request"))
                self.counts["failed"] += 1
                continue
            p = r.params
            if p.temperature == 0:
                continue
            row = logits[j].double().cpu()  # shifted, in float64: any T > 0 (down to 1e-308) gives finite probs
            probs = torch.softmax((row - row.max()) / p.temperature, -1)  # (V,)
            if p.top_p < 1:
                sp, idx = probs.sort(descending=True)
                sp[(sp.cumsum(0) - sp) >= p.top_p] = 0.0  # keep the smallest prefix with mass >= top_p
                toks[j] = idx[torch.multinomial(sp, 1, generator=r.generator)]
            else:
                toks[j] = torch.multinomial(probs, 1, generator=r.generator)[0]
        return toks

    def _advance(self, start: int) -> None:
        """Take next_tok[b] for rows start.. : finish (the row becomes None), stream, or keep."""
        for b in range(start, len(self.rows)):
            r, t = self.rows[b], int(self._next_tok[b])
            if r is None:
                continue
            if r.failed:  # already answered (an error): its row leaves
                self.rows[b] = None
                continue
            finish = None
            if t == self.eos and not r.params.ignore_eos:
                finish = "stop"
            else:
                r.tokens.append(t)
                self.counts["tokens"] += 1
                if r.stream or r.params.stop:
                    r.text, hit = cut_at_stop(self.tok.decode(r.tokens, skip_special_tokens=True), r.params.stop)
                    finish = "stop" if hit else None
                if finish is None and len(r.tokens) >= r.params.max_tokens:
                    finish = "length"
            if finish is None:
                if r.stream:
                    n = streamable_length(r.text, r.params.stop)
                    if n > r.sent:
                        self._send(r, ("delta", r.text[r.sent:n]))
                        r.sent = n
                continue
            text = cut_at_stop(self.tok.decode(r.tokens, skip_special_tokens=True), r.params.stop)[0]
            self.rows[b] = None  # before the client hears "done": /health must not count it as running then
            self.counts["completed"] += 1
            if r.stream and len(text) > r.sent:
                self._send(r, ("delta", text[r.sent:]))
            self._send(r, ("done", finish, text, len(r.tokens)))

    def _compact(self, force: bool = False) -> None:
        """Drop finished rows from the tensors: at once when nothing runs, when rows join (force),
        when half the batch is finished, or after 8 steps. Until then they decode unused: changing
        the rows re-gathers every layer's adapter weights (set_rows), which costs more than a few
        spare rows, so leaving and joining rows share one change."""
        dead = sum(r is None for r in self.rows)
        if not dead:
            self._dead_steps = 0
            return
        self._dead_steps += 1
        if force or dead == len(self.rows) or 2 * dead >= len(self.rows) or self._dead_steps > 8:
            self._keep([b for b, r in enumerate(self.rows) if r is not None])
            self._dead_steps = 0

    def _keep(self, keep: list[int]) -> None:
        """Keep only batch rows `keep` (cache rows included); cut columns no row uses any more."""
        self._rows_changed = True
        if not keep:
            self.rows, self._cache = [], None
            return
        idx = torch.tensor(keep)
        self.rows = [self.rows[b] for b in keep]
        self._mask, self._last_pos, self._next_tok = self._mask[idx], self._last_pos[idx], self._next_tok[idx]
        first = int(self._mask.any(0).long().argmax())  # first column some row attends to
        for layer in self._cache.layers:
            layer.keys = layer.keys[idx.to(layer.keys.device), :, first:]  # (B', H, T', D)
            layer.values = layer.values[idx.to(layer.values.device), :, first:]
        self._mask = self._mask[:, first:]

