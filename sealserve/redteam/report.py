"""The red-team report: a markdown summary, the metrics as JSON, and PNG plots of
fidelity against queries with the defense events (throttle, challenge, suspension)
marked on each attack's curve. matplotlib (the ``redteam`` extra) is imported inside."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sealserve.redteam.metrics import HonestUtility, RunMetrics

_MARKERS = {"throttle": ("v", "tab:orange"), "challenge": ("s", "tab:purple"),
            "suspend": ("X", "tab:red")}  # fmt: skip


def _fmt(v: float | int | None, spec: str = "") -> str:
    return "-" if v is None else format(v, spec)


def markdown(
    runs: Sequence[RunMetrics], *, target: str, honest: HonestUtility | None = None
) -> str:
    """The summary table (one row per run) and the honest-user line."""
    lines = [
        f"# Red-team report: {target}",
        "",
        "Fidelity: top-1 agreement of the attacker's final replica with the unperturbed "
        "model on held-out inputs. First throttle/challenge/suspension: requests the "
        "attacker had sent when it first saw that refusal.",
        "",
        "| attack | budget | sent | admitted | admitted/s | fidelity | accuracy | first throttle"
        " | first challenge | first suspension | stopped because | watermark p |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for m in runs:
        lines.append(
            f"| {m.attack} | {m.budget} | {m.sent} | {m.admitted} | {m.admitted_rate:.0f} | "
            f"{m.fidelity:.3f} | {m.accuracy:.3f} | {_fmt(m.first_throttle)} | "
            f"{_fmt(m.first_challenge)} | {_fmt(m.first_suspension)} | {m.stopped_because} | "
            f"{'n/a' if m.watermark_pvalue is None else f'{m.watermark_pvalue:.2e}'} |"
        )
    if honest is not None:
        lines += [
            "",
            f"Honest users: {honest.accounts} accounts, {honest.answered}/{honest.queries} "
            f"answered, top-1 agreement {honest.agreement:.4f}, mean |p - p_true| "
            f"{honest.prob_error:.4f}, accounts refused {honest.refused_accounts}.",
        ]
    for m in runs:
        if m.server_status:
            lines += ["", f"Server-side status after `{m.attack}`:", ""]
            lines += [f"- {a}: `{json.dumps(s)}`" for a, s in sorted(m.server_status.items())]
    return "\n".join(lines) + "\n"


def _mark_events(ax: Any, m: RunMetrics, labelled: set[str]) -> None:
    """Mark the first event of each kind of run ``m`` on its curve."""
    seen: set[str] = set()
    for ev in m.ledger.get("events", []):
        kind = ev["kind"]
        if kind not in _MARKERS or kind in seen:
            continue
        seen.add(kind)
        earlier = [f for n, f in m.curve if n <= ev["admitted"]]
        y = earlier[-1] if earlier else (m.curve[0][1] if m.curve else m.fidelity)
        marker, colour = _MARKERS[kind]
        ax.scatter([max(ev["admitted"], 1)], [y], marker=marker, color=colour, s=60, zorder=3,
                   label=None if kind in labelled else f"first {kind}")  # fmt: skip
        labelled.add(kind)


def _axes(ax: Any, title: str) -> None:
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.axhline(0.1, color="grey", linestyle=":", linewidth=1)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(runs: Sequence[RunMetrics], path: Path, *, title: str = "") -> Path:
    """Fidelity against admitted queries, one line per run, first refusals marked."""
    plt = _pyplot()
    fig = figure(runs, title=title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def figure(runs: Sequence[RunMetrics], *, title: str = "") -> Any:
    """The fidelity plot as a matplotlib ``Figure``; its legend sits right of the axes,
    where it hides no curve or marker."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    labelled: set[str] = set()
    for m in runs:
        if m.curve:
            xs, ys = zip(*m.curve, strict=True)
            ax.plot(xs, ys, marker=".", label=f"{m.attack} ({m.budget})")
        _mark_events(ax, m, labelled)
    _axes(ax, title or "Fidelity against queries")
    ax.set_xlabel("queries answered")
    ax.set_ylabel("replica fidelity (top-1 agreement)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.tight_layout()
    return fig


def plot_pairs(
    pairs: Sequence[tuple[RunMetrics, RunMetrics]], path: Path, *, title: str = ""
) -> Path:
    """One panel per attack: undefended (solid) and defended (dashed) fidelity against
    queries answered, the defended run's first throttle/challenge/suspension marked."""
    plt = _pyplot()
    cols = 3
    rows = max(1, -(-len(pairs) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    labelled: set[str] = set()
    for k, (und, dfd) in enumerate(pairs):
        ax = axes[k // cols][k % cols]
        for m, style, name in ((und, "-", "undefended"), (dfd, "--", "defended")):
            if m.curve:
                xs, ys = zip(*m.curve, strict=True)
                ax.plot(xs, ys, style, marker=".", label=None if name in labelled else name)
                labelled.add(name)
        _mark_events(ax, dfd, labelled)
        _axes(ax, f"{und.attack}")
        ax.set_xlabel("queries answered", fontsize=8)
        ax.set_ylabel("fidelity", fontsize=8)
    for k in range(len(pairs), rows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.legend(loc="lower center", ncol=5, fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write(
    runs: Sequence[RunMetrics],
    out: Path,
    *,
    target: str,
    honest: HonestUtility | None = None,
) -> Path:
    """Write report.md, metrics.json and fidelity.png into ``out``; returns report.md."""
    out.mkdir(parents=True, exist_ok=True)
    plot(runs, out / "fidelity.png", title=f"Extraction against {target}")
    text = markdown(runs, target=target, honest=honest)
    text += "\n![fidelity against queries](fidelity.png)\n"
    (out / "report.md").write_text(text)
    payload = {
        "runs": [json.loads(m.to_json()) for m in runs],
        "honest": None if honest is None else json.loads(honest.to_json()),
    }
    (out / "metrics.json").write_text(json.dumps(payload, indent=2))
    return out / "report.md"
