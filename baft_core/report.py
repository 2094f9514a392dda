"""Benchmark outputs: the markdown table and the plots."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from . import metrics  # noqa: E402

COLUMNS = ("rel", "gen", "loc", "por", "rel_em", "gen_em")


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def write_report(summary: dict, path: Path) -> None:
    lines = [
        f"# {summary['method']} / {summary['mode']} / {summary['edits']} edits",
        "",
        f"Command: `{summary['command']}`",
        "",
        f"Model: {summary['model']}; adapter parameters: {summary['params']}; "
        f"unrelated pool: {summary['unrelated']}; threads: {summary['threads']}; {summary['date']}",
        "",
        "| " + " | ".join(COLUMNS) + " | s/edit (median) | steps (mean) |",
        "|" + "---|" * (len(COLUMNS) + 2),
        "| "
        + " | ".join(_fmt(summary[c]) for c in COLUMNS)
        + f" | {summary['sec_per_edit_median']:.3f} | {summary['steps_mean']:.1f} |",
    ]
    if summary.get("curve"):
        lines += ["", "Curve (all edits so far, measured on the model at that point):", ""]
        lines += ["| edits | " + " | ".join(COLUMNS) + " |", "|" + "---|" * (len(COLUMNS) + 1)]
        for point in summary["curve"]:
            lines.append(f"| {point['edits']} | " + " | ".join(_fmt(point[c]) for c in COLUMNS) + " |")
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
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_basis_weights(editor, requests, path: Path, limit: int = 200) -> None:
    """The paper's Fig. 2: mean weight of each basis on edit prompts vs unrelated prompts."""
    requests = requests[:limit]
    edit = metrics.basis_weights(editor, [editor.encode(r.prompt, r.target) for r in requests])
    probes = [editor.encode(p.prompt, p.answer) for r in requests for p in r.locality]
    unrelated = metrics.basis_weights(editor, probes) if probes else {}
    layers = sorted(edit)
    fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers), 3), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        rank = edit[layer].shape[1]
        xs = range(rank)
        ax.bar([x - 0.2 for x in xs], edit[layer].mean(0).tolist(), width=0.4, label="edit prompts")
        if layer in unrelated:
            ax.bar([x + 0.2 for x in xs], unrelated[layer].mean(0).tolist(), width=0.4, label="unrelated")
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("basis")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("mean weight w_k")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
