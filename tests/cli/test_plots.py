"""The report plots read right: legends hide no point, count axes never go below 0
and turn logarithmic when counts span decades (checked on the matplotlib objects)."""

from __future__ import annotations

from typing import Any

import pytest

from sealserve.defense.audit.report import AccountSummary

pytest.importorskip("matplotlib")


def _overlaps_any_point(fig: Any, ax: Any, legend: Any) -> bool:
    fig.canvas.draw()
    box = legend.get_window_extent(fig.canvas.get_renderer())
    points = [
        ax.transData.transform(xy) for coll in ax.collections for xy in coll.get_offsets()
    ] + [ax.transData.transform(xy) for line in ax.lines for xy in line.get_xydata()]
    return any(box.contains(x, y) for x, y in points)


def _summaries() -> list[AccountSummary]:
    out = []
    for i, queries in enumerate((0, 3, 40, 900, 25_000)):
        a = AccountSummary(f"acct-{i}", queries=queries)
        a.max_scores = {"prada": 0.1 + 0.2 * i}
        a.coverage_ratio, a.outlier_rate = 0.5 + i, 0.1 * i
        out.append(a)
    return out


def test_audit_report_counts_are_non_negative_and_log_when_spread() -> None:
    import matplotlib.pyplot as plt

    from sealserve.cli.audit import report_figure

    fig = report_figure(_summaries(), top=10)
    try:
        volume, score, coverage = fig.axes
        for ax in (volume, score):
            assert ax.get_xlim()[0] >= 0
            assert ax.get_xscale() == "symlog"  # 3 .. 25,000 spans four decades
            fig.canvas.draw()
            assert all(t >= 0 for t in ax.get_xticks() if ax.get_xlim()[0] <= t)
            labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
            assert not any(label.lstrip().startswith(("-", "\u2212")) for label in labels)
        for ax in (score, coverage):
            legend = ax.get_legend()
            assert legend is not None and not _overlaps_any_point(fig, ax, legend)
    finally:
        plt.close(fig)


def test_a_narrow_count_range_stays_linear() -> None:
    import matplotlib.pyplot as plt

    from sealserve.cli.audit import report_figure

    few = [AccountSummary(f"a{i}", queries=10 + i) for i in range(3)]
    fig = report_figure(few, top=10)
    try:
        assert fig.axes[1].get_xscale() == "linear" and fig.axes[1].get_xlim()[0] == 0
    finally:
        plt.close(fig)


def test_redteam_fidelity_legend_is_outside_the_points() -> None:
    import matplotlib.pyplot as plt

    from sealserve.redteam.metrics import RunMetrics
    from sealserve.redteam.report import figure

    runs = []
    for name, end in (("random", 0.02), ("knockoff", 0.5), ("jacobian", 0.98)):
        m = RunMetrics(name, 1000, 1)
        m.curve = [(10, 0.5), (100, end), (300, end), (1000, end)]  # every corner taken
        m.ledger = {"events": [{"kind": "throttle", "admitted": 100}]}
        runs.append(m)
    fig = figure(runs)
    try:
        (ax,) = fig.axes
        legend = ax.get_legend()
        assert legend is not None and not _overlaps_any_point(fig, ax, legend)
        fig.canvas.draw()
        box = legend.get_window_extent(fig.canvas.get_renderer())
        assert box.x0 >= ax.get_window_extent().x1  # right of the axes
        assert ax.get_xscale() == "log" and ax.get_xlim()[0] > 0
    finally:
        plt.close(fig)
