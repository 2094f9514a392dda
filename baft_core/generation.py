"""Decoding with interventions: the last P prompt positions at prefill, then every generated
token, reusing the KV cache so that each step runs only the new token."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch.nn import functional as F
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .attach import Attachment, InterventionSet, RowGroup, final_logits
from .encoding import left_padded, pad_token_id, positions_from_mask
from .prefix_cache import attention_switched, kv_layers
from .routing import Routes


def _next_tokens(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p
        # The top token always stays, also where top_p underflows float32 (5e-324 compares as 0).
        keep[..., 0] = True
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def stream(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    attachment: Attachment | None = None,
    positions: int = 3,
    pad_id: int = 0,
    eos_ids: set[int] | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    interventions: InterventionSet | None = None,
    lock: AbstractContextManager | None = None,
) -> Iterator[torch.Tensor]:
    """Yields the next token of every row, step by step; rows that finished repeat pad_id.
    `interventions` picks an adapter other than the attached one (default: the one attached when
    decoding starts, kept to the end even if another is published meanwhile); `lock` is held per
    step. Routes are decided on the prompt at prefill and held for every generated token, each
    open block acting within its window (routing.py)."""
    device = next(model.parameters()).device
    input_ids, attention = left_padded(prompts, pad_id)
    input_ids, attention = input_ids.to(device), attention.to(device)
    width = input_ids.shape[1]
    intervene = attention.bool() & (torch.arange(width, device=device) >= width - positions)
    position_ids = positions_from_mask(attention)
    cache = DynamicCache(config=model.config)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    eos = torch.tensor(sorted(eos_ids or []), dtype=torch.long, device=device)
    if attachment is not None and interventions is None:
        interventions = attachment.interventions
    routes = Routes(prompt=attention.bool(), offsets=torch.zeros_like(attention))
    for fed in range(1, max_new_tokens + 1):
        edited: AbstractContextManager[object] = nullcontext()
        if attachment is not None:
            edited = attachment.intervene(intervene, interventions=interventions, routes=routes)
        with lock or nullcontext(), edited:
            hidden = model.base_model(
                input_ids=input_ids,
                attention_mask=attention,
                position_ids=position_ids,
                cache=cache,
                use_cache=True,
            ).last_hidden_state
            logits = final_logits(model, hidden[:, -1])  # 2-D: see final_logits
        token = _next_tokens(logits, temperature, top_p, generator)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        yield token
        done |= torch.isin(token, eos)
        if bool(done.all()):
            return
        routes.prompt = None
        input_ids = token.unsqueeze(-1)
        routes.offsets = torch.full_like(input_ids, fed)  # the answer tokens fed so far
        attention = torch.cat([attention, torch.ones_like(input_ids)], dim=-1)
        position_ids = position_ids[:, -1:] + 1
        intervene = torch.ones_like(input_ids, dtype=torch.bool)


def generate(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    attachment: Attachment | None = None,
    positions: int = 3,
    stop_at_eos: bool = True,
    **sampling,
) -> list[list[int]]:
    """New token ids for each prompt (without the prompt, without padding after EOS)."""
    eos = {tokenizer.eos_token_id} if stop_at_eos and tokenizer.eos_token_id is not None else set()
    rows: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    for step in stream(
        model, prompts, max_new_tokens, attachment, positions, pad_token_id(tokenizer), eos, **sampling
    ):
        for row, token in enumerate(step.tolist()):
            if not finished[row]:
                rows[row].append(token)
                finished[row] = token in eos
    return rows


FinishReason = Literal["stop", "length"]  # an end-of-sequence token, or max_new_tokens


@dataclass(eq=False)
class Row:
    """One request in a `ContinuousBatch`: its prompt, limits, adapter and sampling, and what it
    has generated so far (`tokens`, the end-of-sequence token included where it stopped there)."""

    prompt: list[int]
    max_new_tokens: int
    interventions: InterventionSet | None = None  # None: the adapter attached when it joins
    temperature: float = 0.0
    top_p: float = 1.0
    generator: torch.Generator | None = None
    eos_ids: frozenset[int] = frozenset()
    tokens: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None  # "stop" (an end-of-sequence token) or "length"
    cancelled: bool = False  # set by the caller: the row leaves at the next step boundary
    blocks_open: torch.Tensor | None = None  # [sealed blocks] its prompt opened (routing.py)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.cancelled


# Attention for rows of a continuous batch: each row attends over its own tokens only, laid out
# as they are when it decodes alone. Over the left-padded batch, SDPA's blocked reduction sees
# the row's keys shifted by the padding; in bf16 that moved logits by an ulp, enough to flip a
# greedy near-tie (measured: the tiny test model, 13th token). The linear layers need nothing:
# their rows do not depend on the batch (checked bitwise for 1 to 16 rows).
ROW_ATTENTION = "baft_rows"


def _row_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, row_groups=(), **_):
    """query [batch, heads, q, d], key and value [batch, kv heads, width, d] (left-padded): rows
    of equal length n together, each over its last n positions, causal where q > 1, as SDPA
    computes a lone row without a mask. Padding positions get zeros."""
    batch, heads, q_len, dim = query.shape
    width = key.shape[2]
    out = query.new_zeros(batch, q_len, heads, dim)
    for n, rows in row_groups:
        q = query[rows, :, q_len - min(n, q_len) :]
        attended, _ = sdpa_attention_forward(module, q, key[rows, :, width - n :], value[rows, :, width - n :], None,
                                             dropout=0.0, scaling=scaling)
        out[rows, q_len - q.shape[2] :] = attended
    return out, None


AttentionInterface.register(ROW_ATTENTION, _row_attention)


def _row_groups(lengths: list[int]) -> list[tuple[int, slice]]:
    """Runs of neighbouring rows of one length, as slices: views of the batch, not copies."""
    groups: list[tuple[int, slice]] = []
    start = 0
    for row in range(1, len(lengths) + 1):
        if row == len(lengths) or lengths[row] != lengths[start]:
            groups.append((lengths[start], slice(start, row)))
            start = row
    return groups


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if not missing:
        return tensor
    pad = [0, 0] * (tensor.dim() - 1 - dim % tensor.dim()) + [missing, 0]
    return F.pad(tensor, pad)


class ContinuousBatch:
    """Rows that decode together (continuous batching): new rows join at a step boundary (their
    prompts are prefilled together, their KV cache left-padded into the running one), each step
    feeds every row its last token, and finished rows leave. Each row keeps its own adapter,
    routes, answer offsets and sampling, and attends over its own tokens as if alone
    (`_row_attention`), so its tokens are those `stream` gives it alone, bit for bit in fp32 and
    bf16 (the tests hold it token for token). `lock` is held around each forward.

    Full-attention caches only: a sliding-window layer's cache cannot be left-padded into another
    (`batchable`)."""

    def __init__(
        self,
        model,
        attachment: Attachment | None,
        positions: int,
        pad_id: int,
        lock: AbstractContextManager | None = None,
    ):
        self.model, self.attachment, self.positions, self.pad_id = model, attachment, positions, pad_id
        self.lock = lock or nullcontext()
        self.device = next(model.parameters()).device
        self.rows: list[Row] = []
        self._cache: DynamicCache | None = None
        self._attention: torch.Tensor | None = None  # [rows, cached columns], left-padded

    @staticmethod
    def batchable(model) -> bool:
        """Whether rows of this model can share a batch (every layer attends to the whole past)."""
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        return all(kind == "full_attention" for kind in getattr(config, "layer_types", None) or ["full_attention"])

    def __len__(self) -> int:
        return len(self.rows)

    @torch.no_grad()
    def join(self, rows: list[Row]) -> None:
        """Prefills `rows`, samples the first token of each and adds those still going to the
        batch."""
        for row in rows:
            if row.interventions is None and self.attachment is not None:
                row.interventions = self.attachment.interventions
        input_ids, attention = left_padded([r.prompt for r in rows], self.pad_id)
        input_ids, attention = input_ids.to(self.device), attention.to(self.device)
        width = input_ids.shape[1]
        mask = attention.bool() & (torch.arange(width, device=self.device) >= width - self.positions)
        routes = [Routes(prompt=attention[[i]].bool(), offsets=torch.zeros_like(attention[[i]])) for i in range(len(rows))]
        cache = DynamicCache(config=self.model.config)
        with self.lock, self._intervene(rows, mask, routes) as routes_of, attention_switched(self.model, ROW_ATTENTION):
            hidden = self.model.base_model(
                input_ids=input_ids,
                attention_mask=attention,
                position_ids=positions_from_mask(attention),
                cache=cache,
                use_cache=True,
                row_groups=_row_groups([len(r.prompt) for r in rows]),
            ).last_hidden_state
            logits = final_logits(self.model, hidden[:, -1])
        for row, group_routes in zip(rows, routes_of):
            row.blocks_open = group_routes
        self._sample(rows, logits)
        keep = [i for i, row in enumerate(rows) if not row.finished]
        if keep:
            self._merge(cache, attention, [rows[i] for i in keep], keep)

    @torch.no_grad()
    def step(self) -> None:
        """One token for every row of the batch; finished and cancelled rows leave first."""
        self._leave()
        if not self.rows:
            return
        assert self._cache is not None and self._attention is not None  # a batch with rows has both
        rows = self.rows
        input_ids = torch.tensor([[row.tokens[-1]] for row in rows], device=self.device)
        position_ids = self._attention.sum(-1, keepdim=True)  # real tokens so far: the next position
        self._attention = torch.cat([self._attention, torch.ones_like(input_ids)], dim=-1)
        lengths = [len(row.prompt) + len(row.tokens) for row in rows]  # with the token fed now
        mask = torch.ones_like(input_ids, dtype=torch.bool)
        routes = [
            Routes(open=None if row.blocks_open is None else row.blocks_open.unsqueeze(0),
                   offsets=torch.full((1, 1), len(row.tokens), device=self.device))
            for row in rows
        ]
        with self.lock, self._intervene(rows, mask, routes), attention_switched(self.model, ROW_ATTENTION):
            hidden = self.model.base_model(
                input_ids=input_ids,
                attention_mask=self._attention,
                position_ids=position_ids,
                cache=self._cache,
                use_cache=True,
                row_groups=_row_groups(lengths),
            ).last_hidden_state
            logits = final_logits(self.model, hidden[:, -1])
        self._sample(rows, logits)
        self._leave()

    def _intervene(self, rows: list[Row], mask: torch.Tensor, routes: list[Routes]):
        """The attachment's context for this forward: rows grouped by adapter, each group with
        its rows' routes stacked; yields each row's open blocks after the forward."""
        if self.attachment is None:
            return _NoRoutes(len(rows))
        groups: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(id(row.interventions), []).append(i)
        return _Grouped(self.attachment, rows, mask, routes, list(groups.values()))

    def _sample(self, rows: list[Row], logits: torch.Tensor) -> None:
        greedy = logits.argmax(-1).tolist()
        for i, row in enumerate(rows):
            if row.temperature > 0:
                token = int(_next_tokens(logits[i : i + 1], row.temperature, row.top_p, row.generator))
            else:
                token = greedy[i]
            row.tokens.append(token)
            if token in row.eos_ids:
                row.finish_reason = "stop"
            elif len(row.tokens) >= row.max_new_tokens:
                row.finish_reason = "length"

    def _merge(self, cache: DynamicCache, attention: torch.Tensor, rows: list[Row], keep: list[int]) -> None:
        index = torch.tensor(keep, device=self.device)
        attention = attention[index]
        if self._cache is None:
            cache.batch_select_indices(index)
            self._cache, self._attention, self.rows = cache, attention, rows
            self._trim()
            return
        assert self._attention is not None  # set with the cache
        width = max(self._attention.shape[1], attention.shape[1])
        for mine, new in zip(kv_layers(self._cache), kv_layers(cache)):
            mine.keys = torch.cat([_pad_left(mine.keys, width, -2), _pad_left(new.keys[index], width, -2)])
            mine.values = torch.cat([_pad_left(mine.values, width, -2), _pad_left(new.values[index], width, -2)])
        self._attention = torch.cat([_pad_left(self._attention, width, 1), _pad_left(attention, width, 1)])
        self.rows = self.rows + rows

    def _leave(self) -> None:
        keep = [i for i, row in enumerate(self.rows) if not row.finished]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self._cache, self._attention = [], None, None
            return
        assert self._cache is not None and self._attention is not None  # a batch with rows has both
        index = torch.tensor(keep, device=self.device)
        self._cache.batch_select_indices(index)
        self._attention = self._attention[index]
        self.rows = [self.rows[i] for i in keep]
        self._trim()

    def _trim(self) -> None:
        """Drops the leading columns that are padding in every row (left by rows that left)."""
        assert self._cache is not None and self._attention is not None  # a batch with rows has both
        first = int(self._attention.any(0).long().argmax())
        if first:
            self._attention = self._attention[:, first:]
            for layer in kv_layers(self._cache):
                layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]


class _NoRoutes(nullcontext):
    def __init__(self, rows: int):
        super().__init__([None] * rows)


def _cat(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    """The rows' tensors of one kind concatenated, None where they have none (a forward's routes
    all set the same fields)."""
    if parts[0] is None:
        return None
    tensors = [part for part in parts if part is not None]
    assert len(tensors) == len(parts), "routes that set different fields"
    return torch.cat(tensors)


class _Grouped:
    """`ContinuousBatch._intervene`: one adapter for the whole batch takes the single-adapter
    path, several take `Attachment.intervene_rows`."""

    def __init__(self, attachment: Attachment, rows: list[Row], mask, routes: list[Routes], groups: list[list[int]]):
        self.rows, self.groups = rows, groups
        self.routes = []
        device = mask.device
        for members in groups:
            stacked = [routes[i] for i in members]
            prompt = _cat([r.prompt for r in stacked])
            opened = _cat([r.open for r in stacked])
            self.routes.append(Routes(prompt=prompt, open=opened, offsets=_cat([r.offsets for r in stacked])))
        adapters = [rows[members[0]].interventions for members in groups]
        self.context: AbstractContextManager[object]
        if len(groups) == 1:
            self.context = attachment.intervene(mask, interventions=adapters[0], routes=self.routes[0])
        else:
            row_groups = []
            for adapter, members, group_routes in zip(adapters, groups, self.routes):
                assert adapter is not None  # `ContinuousBatch.join` gives every row one
                row_groups.append(RowGroup(adapter, torch.tensor(members, device=device), group_routes))
            self.context = attachment.intervene_rows(mask, row_groups)

    def __enter__(self) -> list[torch.Tensor | None]:
        self.context.__enter__()
        self.opened: list[torch.Tensor | None] = [None] * len(self.rows)
        return self.opened

    def __exit__(self, *exc) -> bool | None:
        result = self.context.__exit__(*exc)
        for members, routes in zip(self.groups, self.routes):
            if routes.open is not None:
                for k, i in enumerate(members):
                    self.opened[i] = routes.open[k]
        return result
