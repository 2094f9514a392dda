"""Edit metrics as EasyEdit computes them, plus greedy-generation exact match.

reliability / generality / portability: teacher-forced token accuracy of the answer after the
prompt / a rephrase / a dependent question. locality: share of answer tokens of an unrelated
prompt whose argmax is unchanged from the unedited model. *_em: greedy generation reproduces the
answer tokens exactly. rep: the answer comes again in the greedy continuation of the edit's prompt
(REPEAT_WINDOW tokens after it), a failure teacher-forced scores cannot see."""
from __future__ import annotations

from dataclasses import replace
from statistics import mean
from typing import NamedTuple

import torch

from .data import EditRequest, Probe
from .encoding import Example, TeacherForced, encode_prompt, left_padded, teacher_forced
from .generation import generate
from .routing import Routes, answer_offsets
from .subject_probes import SUBJECT_PROBE_GROUP

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


def with_subject_probes(editor, requests: list[EditRequest], tokens: int = 4) -> list[EditRequest]:
    """The requests with the editor's own same-subject probes added to their locality (group
    `SUBJECT_PROBE_GROUP`), each answered by the unedited model's greedy decoding (`tokens`
    tokens): what else about the subject an edit may not change, measured like any probe."""
    prompts = []
    for request in requests:
        given = {probe.prompt for probe in request.locality}
        prompts.append([p for p in editor.keep_prompts(request) if p not in given])
    flat = [encode_prompt(editor.tokenizer, p) for per in prompts for p in per]
    answers = iter(generate(editor.model, editor.tokenizer, flat, tokens, lock=editor.lock) if flat else [])
    out = []
    for request, per in zip(requests, prompts):
        probes = []
        for prompt in per:
            answer = editor.tokenizer.decode(next(answers), skip_special_tokens=True).strip()
            if answer:  # an answer of only EOS or blanks has no tokens to compare
                probes.append(Probe(prompt, answer, SUBJECT_PROBE_GROUP))
        out.append(replace(request, locality=[*request.locality, *probes]))
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

    def scored(groups: list[list[Example]], score) -> list[list[float]]:
        flat = [e for g in groups for e in g]
        values = iter(score(flat) if flat else [])
        return [[next(values) for _ in g] for g in groups]

    def per_request(scores: list[list[float]]) -> list[float | None]:
        return [mean(s) if s else None for s in scores]

    def locality(examples: list[Example]) -> list[float]:
        after = answer_argmax(editor, examples)
        before = [b for per in baseline for b in per]
        return [mean(float(x == y) for x, y in zip(a, b)) for a, b in zip(after, before)]

    def by_group(name: str, probes: list[list[Probe]], scores: list[list[float]]) -> dict[str, list[float | None]]:
        """`name/GROUP` columns: each request's mean over its probes of that group."""
        groups = sorted({p.group for per in probes for p in per if p.group})
        return {
            f"{name}/{group}": [
                mean(s for p, s in zip(per, row) if p.group == group) if any(p.group == group for p in per) else None
                for per, row in zip(probes, scores)
            ]
            for group in groups
        }

    accuracy = lambda ex: token_accuracy(editor, ex)  # noqa: E731
    loc_scores, por_scores = scored(kinds["loc"], locality), scored(kinds["por"], accuracy)
    # One greedy decode of each edit prompt (one per request) serves both rel_em and rep.
    prompts = [group[0] for group in kinds["rel"]]
    decoded = _greedy_answers(editor, prompts, REPEAT_WINDOW) if prompts else []
    columns: dict[str, list[float | None]] = {
        "rel": per_request(scored(kinds["rel"], accuracy)),
        "gen": per_request(scored(kinds["gen"], accuracy)),
        "loc": per_request(loc_scores),
        "por": per_request(por_scores),
        "rel_em": [match for match, _ in decoded],
        "gen_em": per_request(scored(kinds["gen"], lambda ex: generation_match(editor, ex))),
        "rep": [answer_repeated(editor, e, after) for e, (_, after) in zip(prompts, decoded)],
        **by_group("loc", [r.locality for r in requests], loc_scores),
        **by_group("por", [r.portability for r in requests], por_scores),
    }
    return [{name: values[i] for name, values in columns.items()} for i in range(len(requests))]


def summarize(rows: list[dict[str, float | None]]) -> dict[str, float | None]:
    """Mean of each metric over the requests that have it (None where none has)."""
    names = list(dict.fromkeys(name for row in rows for name in row))
    out: dict[str, float | None] = {}
    for name in names:
        values = [value for r in rows if (value := r.get(name)) is not None]
        out[name] = mean(values) if values else None
    # KnowEdit's summary figure of a grouped metric: the mean of its groups' means.
    for metric in dict.fromkeys(name.split("/")[0] for name in names if "/" in name):
        groups = [v for name, v in out.items() if name.startswith(metric + "/") and v is not None]
        out[f"{metric}_groups_mean"] = mean(groups) if groups else None
    return out


@torch.no_grad()
def basis_weights(editor, examples: list[Example]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Gate weights w(h) at every intervened position, teacher-forced, per layer: their mean over
    the positions [bases] and each position's largest [positions]. Reduced batch by batch: with
    10,000 sealed blocks the whole [positions, bases] matrices of a few thousand prompts would not
    fit in memory."""
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    largest: dict[int, list[torch.Tensor]] = {}
    for start in range(0, len(examples), BATCH):
        tf = teacher_forced(examples[start : start + BATCH], editor.config.prompt_positions, editor.pad_id)
        device = editor.device
        routes = teacher_forced_routes(tf, device)
        mask = tf.intervene.to(device)
        with editor.lock, editor.attachment.intervene(mask, record=True, routes=routes) as record:
            editor.model(input_ids=tf.input_ids.to(device), attention_mask=tf.attention_mask.to(device))
        for layer, (weights, _) in record.items():
            sums[layer] = sums[layer] + weights.sum(0).cpu() if layer in sums else weights.sum(0).cpu()
            counts[layer] = counts.get(layer, 0) + len(weights)
            largest.setdefault(layer, []).append(weights.amax(1).cpu())
    return {layer: (sums[layer] / counts[layer], torch.cat(largest[layer])) for layer in sums}


class RoutingInputs(NamedTuple):
    """A batch of prompts as routing and the relation check read them."""

    hidden: list[torch.Tensor]  # the routing layer's output, then the relation layer's (if enabled)
    prompt: torch.Tensor  # [batch, seq] the prompt positions (left-padded)
    tokens: torch.Tensor  # [batch, seq]


@torch.no_grad()
def routing_inputs(editor, prompts: list[str]) -> list[RoutingInputs]:
    """The prompts in batches, each from one unedited forward that stops at those layers."""
    interventions = editor.interventions
    relations = interventions.relations
    layers = [interventions.routing_layer, *([relations.layer] if relations.enabled else [])]
    batches = []
    for start in range(0, len(prompts), BATCH):
        ids = [encode_prompt(editor.tokenizer, p, editor.context) for p in prompts[start : start + BATCH]]
        hidden, attention = editor.outputs_at_layers(ids, layers)
        tokens = left_padded(ids, editor.pad_id)[0].to(attention.device)
        batches.append(RoutingInputs(hidden, attention.bool(), tokens))
    return batches


@torch.no_grad()
def opened_blocks(editor, batches: list[RoutingInputs], blocks: int) -> torch.Tensor:
    """[prompts, blocks]: which of the first `blocks` blocks each prompt opens (routing.py) and
    the relation check leaves open (relations.py)."""
    interventions, classes = editor.interventions, editor.attachment.classes
    parts = []
    for batch in batches:
        opened = interventions.router.open_blocks(batch.hidden[0], batch.prompt, blocks, batch.tokens, classes)
        if interventions.relations.enabled:
            opened = interventions.relations.shut(batch.hidden[1], batch.prompt, batch.tokens, opened)
        parts.append(opened.cpu())
    return torch.cat(parts)


def open_blocks(editor, prompts: list[str]) -> torch.Tensor:
    """[prompts, sealed blocks]: `opened_blocks` of the adapter's sealed blocks."""
    return opened_blocks(editor, routing_inputs(editor, prompts), editor.interventions.sealed_blocks)


def routing_separation(editor, requests: list[EditRequest], sample: list[int] | None = None) -> dict[str, float] | None:
    """How prompt-level routing separates, for requests that were each sealed into a block of
    their own in order (continual editing, block_edits=1): the share of rephrases that open their
    own edit's block, the mean number of other blocks they open, and the share of locality
    prompts that open any block, over the requests `sample` names (default: all). None where that
    layout does not hold."""
    interventions = editor.interventions
    one_block_each = interventions.sealed_blocks == len(requests) and editor.config.block_edits == 1
    if not interventions.router.enabled or not one_block_each:
        return None
    chosen = range(len(requests)) if sample is None else sample
    rephrases = [(i, p) for i in chosen for p in requests[i].rephrases]
    local = [p.prompt for i in chosen for p in requests[i].locality]
    out: dict[str, float] = {}
    if rephrases:
        opened = open_blocks(editor, [p for _, p in rephrases])
        own = opened[torch.arange(len(rephrases)), torch.tensor([i for i, _ in rephrases])]
        out["rephrase_opens_own"] = own.float().mean().item()
        out["rephrase_other_blocks_mean"] = (opened.sum(1) - own.long()).float().mean().item()
    if local:
        out["locality_opens_any"] = open_blocks(editor, local).any(1).float().mean().item()
    return out
