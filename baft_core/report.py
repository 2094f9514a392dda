"""Benchmark outputs: the markdown table and the plots."""
from __future__ import annotations

import io
from pathlib import Path

import matplotlib
import torch
from PIL import Image

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from . import metrics  # noqa: E402

COLUMNS = ("rel", "gen", "loc", "por", "rel_em", "gen_em", "rep")


def save_png(fig, path: Path) -> None:
    """The figure as a PNG of 64 colours: a third of the bytes of matplotlib's, for plots of a few
    lines and bars (every run commits two)."""
    rendered = io.BytesIO()
    fig.savefig(rendered, format="png", dpi=120)
    plt.close(fig)
    compact_png(Image.open(rendered), path)


def compact_png(image: Image.Image, path: Path) -> None:
    image.convert("RGB").quantize(colors=64, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def write_report(summary: dict, path: Path) -> None:
    lines = [
        f"# {summary['method']} / {summary['mode']} / {summary['edits']} edits",
        "",
        f"Command: `{summary['command']}`",
        "",
        f"Model: {summary['model']}; adapter parameters: {summary['params']}; "
        f"unrelated pool: {summary['unrelated']} ({summary.get('unrelated_count', '?')} prompts); threads: {summary['threads']}; {summary['date']}",
        "",
        "| " + " | ".join(COLUMNS) + " | s/edit (median) | steps (mean) |",
        "|" + "---|" * (len(COLUMNS) + 2),
        "| "
        + " | ".join(_fmt(summary.get(c)) for c in COLUMNS)
        + f" | {summary['sec_per_edit_median']:.3f} | {summary['steps_mean']:.1f} |",
    ]
    if summary.get("curve"):
        lines += ["", "Curve (all edits so far, measured on the model at that point):", ""]
        lines += ["| edits | " + " | ".join(COLUMNS) + " |", "|" + "---|" * (len(COLUMNS) + 1)]
        for point in summary["curve"]:
            lines.append(f"| {point['edits']} | " + " | ".join(_fmt(point.get(c)) for c in COLUMNS) + " |")
    if summary.get("gates_open"):
        lines += ["", "Share of positions where some basis acts (weight above the sealed cutoff):", ""]
        kinds = list(next(iter(summary["gates_open"].values())))
        lines += ["| layer | " + " | ".join(kinds) + " |", "|" + "---|" * (len(kinds) + 1)]
        for layer, shares in summary["gates_open"].items():
            lines.append(f"| {layer} | " + " | ".join(f"{shares[k]:.3f}" for k in kinds) + " |")
    if summary.get("routing"):
        routing = summary["routing"]
        lines += [
            "",
            "Prompt-level routing: rephrases that open their own edit's block "
            f"{_fmt(routing.get('rephrase_opens_own'))}, other blocks a rephrase opens (mean) "
            f"{_fmt(routing.get('rephrase_other_blocks_mean'))}, locality prompts that open any block "
            f"{_fmt(routing.get('locality_opens_any'))}.",
        ]
    if "generation_speed_ratio" in summary:
        lines += [
            "",
            f"Time per edit, median: first 100 edits {summary['sec_per_edit_first100_median']:.3f} s, "
            f"last 100 {summary['sec_per_edit_last100_median']:.3f} s. Greedy generation speed, edited / "
            f"unedited (interleaved, same run): {summary['generation_speed_ratio']:.3f}. Sealed blocks: "
            f"{summary['sealed_blocks']}; adapter memory per edit: {summary['adapter_bytes_per_edit'] / 1024:.1f} KiB.",
        ]
    if summary.get("piqa"):
        piqa = summary["piqa"]
        lines += [
            "",
            f"Downstream task (PIQA, first {piqa['items']} validation items): accuracy unedited "
            f"{piqa['accuracy_unedited']:.3f}, edited {piqa['accuracy_edited']:.3f}; items whose pick the edits "
            f"changed {piqa['pick_changed']:.3f}; goals that open some block {piqa['prompts_opening_a_block']:.3f}.",
        ]
    path.write_text("\n".join(lines) + "\n")


def plot_curve(curve: list[dict], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [p["edits"] for p in curve]
    for name in ("rel", "gen", "loc", "rel_em"):
        ys = [p[name] for p in curve]
        if all(y is not None for y in ys):
            ax.plot(xs, ys, marker="o", label=name)
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("edits applied")
    ax.set_ylabel("score on all edits so far")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    save_png(fig, path)


def plot_basis_weights(editor, requests, path: Path, limit: int = 200) -> dict[int, dict[str, float]]:
    """How the gates tell edits from unrelated inputs. With few bases, the paper's Fig. 2 (mean
    weight of each basis on edit vs unrelated prompts); with many (a block per edit), the
    distribution over positions of the largest weight any basis takes there, on the edits, their
    rephrases and the locality prompts. Returns, per layer, the share of positions where some
    basis acts (weight above the sealed cutoff) for each kind of input."""
    requests = requests[:limit]
    kinds = {
        "edit prompts": [editor.encode(r.prompt, r.target) for r in requests],
        "rephrases": [editor.encode(q, r.target) for r in requests for q in r.rephrases],
        "unrelated (locality)": [editor.encode(p.prompt, p.answer) for r in requests for p in r.locality],
    }
    weights = {kind: metrics.basis_weights(editor, ex) for kind, ex in kinds.items() if ex}
    layers = sorted(weights["edit prompts"])
    bases = len(weights["edit prompts"][layers[0]][0])
    cutoff = editor.config.sealed_cutoff
    fig, axes = plt.subplots(1, len(layers), figsize=(3.6 * len(layers), 3.2), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        if bases <= 64:
            xs = range(bases)
            for offset, kind in ((-0.2, "edit prompts"), (0.2, "unrelated (locality)")):
                if kind in weights:
                    ax.bar([x + offset for x in xs], weights[kind][layer][0].tolist(), width=0.4, label=kind)
            ax.set_xlabel("basis")
            ax.set_ylim(0, 1)
        else:
            bins = torch.linspace(0, 1, 41).tolist()
            for kind, per_layer in weights.items():
                ax.hist(per_layer[layer][1].tolist(), bins=bins, histtype="step", density=True, label=kind)
            ax.axvline(cutoff, color="grey", linestyle=":", label="sealed cutoff")
            ax.set_yscale("log")
            ax.set_xlabel("largest basis weight at a position")
        ax.set_title(f"layer {layer} ({bases} bases)")
    axes[0][0].set_ylabel("mean weight w_k" if bases <= 64 else "density")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)
    return {
        layer: {kind: float((w[layer][1] > cutoff).float().mean()) for kind, w in weights.items()}
        for layer in layers
    }
