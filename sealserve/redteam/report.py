"""The red-team report: a markdown summary, the metrics as JSON, and PNG plots of
fidelity against queries with the defense events (throttle, challenge, suspension)
marked on each attack's curve. matplotlib (the ``redteam`` extra) is imported inside."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

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


def plot(runs: Sequence[RunMetrics], path: Path, *, title: str = "") -> Path:
    """Fidelity against admitted queries, one line per run, refusals marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    labelled: set[str] = set()
    for m in runs:
        if not m.curve:
            continue
        xs, ys = zip(*m.curve, strict=True)
        ax.plot(xs, ys, marker=".", label=f"{m.attack} ({m.budget})")
        for ev in m.ledger.get("events", []):
            kind = ev["kind"]
            if kind not in _MARKERS:
                continue
            earlier = [f for n, f in m.curve if n <= ev["admitted"]]
            y = earlier[-1] if earlier else 0.0
            marker, colour = _MARKERS[kind]
            ax.scatter([max(ev["admitted"], 1)], [y], marker=marker, color=colour, zorder=3,
                       label=None if kind in labelled else kind)  # fmt: skip
            labelled.add(kind)
            break  # the first event of the run is the one that matters on the plot
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.axhline(0.1, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("queries answered")
    ax.set_ylabel("replica fidelity (top-1 agreement)")
    ax.set_title(title or "Fidelity against queries")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
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
