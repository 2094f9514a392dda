"""Edit metrics as EasyEdit computes them, plus greedy-generation exact match.

reliability / generality / portability: teacher-forced token accuracy of the answer after the
prompt / a rephrase / a dependent question. locality: share of answer tokens of an unrelated
prompt whose argmax is unchanged from the unedited model. *_em: greedy generation reproduces the
answer tokens exactly. rep: the answer comes again in the greedy continuation of the edit's prompt
(REPEAT_WINDOW tokens after it), a failure teacher-forced scores cannot see."""
from __future__ import annotations

from statistics import mean

import torch

from .data import EditRequest
from .encoding import Example, TeacherForced, encode_prompt, teacher_forced
from .generation import generate
from .routing import Routes, answer_offsets

BATCH = 32
REPEAT_WINDOW = 16


def teacher_forced_routes(tf: TeacherForced, device) -> Routes:
    """Routes decided on the batch's prompts, each position placed in the answer for the blocks'
    windows, as generation places it."""
    prompt = tf.prompt.to(device)
    return Routes(prompt=prompt, offsets=answer_offsets(prompt, tf.attention_mask.to(device)))


@torch.no_grad()
def answer_argmax(editor, examples: list[Example], edited: bool = True) -> list[list[int]]:
    """The model's argmax at each answer position, teacher-forced."""
    out: list[list[int]] = []
    cfg = editor.config
    for start in range(0, len(examples), BATCH):
        chunk = examples[start : start + BATCH]
        tf = teacher_forced(chunk, cfg.prompt_positions, editor.pad_id)
        device = editor.device
        mask = tf.intervene.to(device) if edited else None
        routes = teacher_forced_routes(tf, device)
        with editor.lock, editor.attachment.intervene(mask, routes=routes):
            logits = editor.model(
                input_ids=tf.input_ids.to(device), attention_mask=tf.attention_mask.to(device)
            ).logits
        predicted = logits.argmax(-1).cpu()
        for row in range(len(chunk)):
            out.append(predicted[row][tf.targets[row] != -100].tolist())
    return out


def token_accuracy(editor, examples: list[Example]) -> list[float]:
    predictions = answer_argmax(editor, examples)
    return [mean(float(p == t) for p, t in zip(pred, e.answer)) for pred, e in zip(predictions, examples)]


def generation_match(editor, examples: list[Example]) -> list[float]:
    """1.0 where greedy decoding yields exactly the answer tokens."""
    return [match for match, _ in _greedy_answers(editor, examples)]


def answer_repeated(editor, example: Example, after: list[int]) -> float:
    """1.0 where the answer occurs again in the tokens decoded `after` it."""
    answer = editor.tokenizer.decode(example.answer).strip()
    return float(bool(answer) and answer in editor.tokenizer.decode(after))


def _greedy_answers(editor, examples: list[Example], extra: int = 0) -> list[tuple[float, list[int]]]:
    """Per example: whether greedy decoding yields exactly the answer tokens, and the `extra`
    tokens it decodes after them."""
    out = []
    for start in range(0, len(examples), BATCH):
        chunk = examples[start : start + BATCH]
        rows = generate(
            editor.model,
            editor.tokenizer,
            [e.prompt for e in chunk],
            max(len(e.answer) for e in chunk) + extra,
            editor.attachment,
            editor.config.prompt_positions,
            stop_at_eos=False,
            lock=editor.lock,
        )
        for row, e in zip(rows, chunk):
            end = len(e.answer)
            out.append((float(row[:end] == e.answer), row[end : end + extra]))
    return out


def locality_baseline(editor, requests: list[EditRequest]) -> list[list[list[int]]]:
    """Unedited argmax on every locality probe, per request: compute once, before editing."""
    examples = [editor.encode(p.prompt, p.answer) for r in requests for p in r.locality]
    flat = iter(answer_argmax(editor, examples, edited=False))
    return [[next(flat) for _ in r.locality] for r in requests]


def evaluate(
    editor, requests: list[EditRequest], baseline: list[list[list[int]]] | None = None
) -> list[dict[str, float | None]]:
    """Metrics of each request on the editor's current adapter. `baseline` from locality_baseline;
    computed now (from the unedited model, same weights) when not given."""
    if baseline is None:
        baseline = locality_baseline(editor, requests)
    kinds = {
        "rel": [[editor.encode(r.prompt, r.target)] for r in requests],
        "gen": [[editor.encode(p, r.target) for p in r.rephrases] for r in requests],
        "loc": [[editor.encode(p.prompt, p.answer) for p in r.locality] for r in requests],
        "por": [[editor.encode(p.prompt, p.answer) for p in r.portability] for r in requests],
    }

    def per_request(groups: list[list[Example]], score) -> list[float | None]:
        flat = [e for g in groups for e in g]
        values = iter(score(flat) if flat else [])
        return [mean(next(values) for _ in g) if g else None for g in groups]

    def locality(examples: list[Example]) -> list[float]:
        after = answer_argmax(editor, examples)
        before = [b for per in baseline for b in per]
        return [mean(float(x == y) for x, y in zip(a, b)) for a, b in zip(after, before)]

    # One greedy decode of each edit prompt (one per request) serves both rel_em and rep.
    prompts = [group[0] for group in kinds["rel"]]
    decoded = _greedy_answers(editor, prompts, REPEAT_WINDOW) if prompts else []
    columns = {
        "rel": per_request(kinds["rel"], lambda ex: token_accuracy(editor, ex)),
        "gen": per_request(kinds["gen"], lambda ex: token_accuracy(editor, ex)),
        "loc": per_request(kinds["loc"], locality),
        "por": per_request(kinds["por"], lambda ex: token_accuracy(editor, ex)),
        "rel_em": [match for match, _ in decoded],
        "gen_em": per_request(kinds["gen"], lambda ex: generation_match(editor, ex)),
        "rep": [answer_repeated(editor, e, after) for e, (_, after) in zip(prompts, decoded)],
    }
    return [{name: values[i] for name, values in columns.items()} for i in range(len(requests))]


def summarize(rows: list[dict[str, float | None]]) -> dict[str, float | None]:
    """Mean of each metric over the requests that have it (None where none has)."""
    names = rows[0].keys() if rows else []
    out = {}
    for name in names:
        values = [r[name] for r in rows if r[name] is not None]
        out[name] = mean(values) if values else None
    return out


@torch.no_grad()
def basis_weights(editor, examples: list[Example]) -> dict[int, torch.Tensor]:
    """Gate weights w(h) [positions, rank] per layer at every intervened position, teacher-forced."""
    collected: dict[int, list[torch.Tensor]] = {}
    for start in range(0, len(examples), BATCH):
        tf = teacher_forced(examples[start : start + BATCH], editor.config.prompt_positions, editor.pad_id)
        device = editor.device
        routes = teacher_forced_routes(tf, device)
        mask = tf.intervene.to(device)
        with editor.lock, editor.attachment.intervene(mask, record=True, routes=routes) as record:
            editor.model(input_ids=tf.input_ids.to(device), attention_mask=tf.attention_mask.to(device))
        for layer, (weights, _) in record.items():
            collected.setdefault(layer, []).append(weights.cpu())
    return {layer: torch.cat(parts) for layer, parts in collected.items()}


@torch.no_grad()
def open_blocks(editor, prompts: list[str]) -> torch.Tensor:
    """[prompts, sealed blocks]: which sealed blocks each prompt opens (routing.py), from a forward
    that stops at the routing layer."""
    parts = []
    for start in range(0, len(prompts), BATCH):
        ids = [encode_prompt(editor.tokenizer, p, editor.context) for p in prompts[start : start + BATCH]]
        hidden, attention = editor.routing_layer_output(ids)
        parts.append(editor.interventions.route(hidden, attention.bool()).cpu())
    return torch.cat(parts)


def routing_separation(editor, requests: list[EditRequest]) -> dict[str, float] | None:
    """How prompt-level routing separates, for requests that were each sealed into a block of
    their own in order (continual editing, block_edits=1): the share of rephrases that open their
    own edit's block, the mean number of other blocks they open, and the share of locality
    prompts that open any block. None where that layout does not hold."""
    interventions = editor.interventions
    one_block_each = interventions.sealed_blocks == len(requests) and editor.config.block_edits == 1
    if not interventions.router.enabled or not one_block_each:
        return None
    rephrases = [(i, p) for i, r in enumerate(requests) for p in r.rephrases]
    local = [p.prompt for r in requests for p in r.locality]
    out: dict[str, float] = {}
    if rephrases:
        opened = open_blocks(editor, [p for _, p in rephrases])
        own = opened[torch.arange(len(rephrases)), torch.tensor([i for i, _ in rephrases])]
        out["rephrase_opens_own"] = own.float().mean().item()
        out["rephrase_other_blocks_mean"] = (opened.sum(1) - own.long()).float().mean().item()
    if local:
        out["locality_opens_any"] = open_blocks(editor, local).any(1).float().mean().item()
    return out
