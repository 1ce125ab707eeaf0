"""Altair charts of the pages, built from the DataFrames of rayad.results."""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd

STATUS_COLORS = alt.Scale(domain=["completed", "stopped_early", "running", "error", "interrupted"],
                          range=["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#7f7f7f"])
COUNTS = alt.Axis(tickMinStep=1, format="d")  # trial numbers and training steps: whole ticks only


def optimisation_history(history: pd.DataFrame, metric: str) -> alt.Chart:
    """Each trial's best validation value in start order, and the best so far."""
    base = alt.Chart(history).encode(x=alt.X("number:Q", title="trial (start order)", axis=COUNTS))
    points = base.mark_circle(size=50, opacity=0.8).encode(
        y=alt.Y("best_value:Q", title=metric, scale=alt.Scale(zero=False)),
        color=alt.Color("status:N", scale=STATUS_COLORS, title="status"),
        tooltip=["number", "trial_id", "status", alt.Tooltip("best_value:Q", format=".4f")])
    best = base.mark_line(interpolate="step-after", color="black").encode(y="best_so_far:Q")
    return points + best


def parallel_coordinates(table: pd.DataFrame, params: list[str], metric: str) -> alt.Chart:
    """One line per trial across the searched parameters (each scaled to [0, 1]; log scale for parameters
    spanning two decades or more; categories evenly spaced) and the objective, coloured by the objective."""
    scored = table.dropna(subset=["best_value"])
    axes = {p: _axis_positions(scored[p]) for p in params}
    axes[metric] = _axis_positions(scored["best_value"])
    long = pd.concat([pd.DataFrame({"number": scored["number"].to_numpy(), "axis": name, "position": pos,
                                    "value": scored[name if name != metric else "best_value"].map(_label).to_numpy(),
                                    "objective": scored["best_value"].to_numpy()})
                      for name, pos in axes.items()])
    x = alt.X("axis:N", sort=list(axes), title=None, axis=alt.Axis(labelAngle=-30, labelLimit=200, labelOverlap=False))
    lines = alt.Chart(long).mark_line(opacity=0.5).encode(
        x=x, y=alt.Y("position:Q", axis=None), detail="number:N",
        color=alt.Color("objective:Q", title=metric, scale=alt.Scale(scheme="viridis")),
        tooltip=["number:Q", "axis:N", "value:N"])
    ends = long.groupby("axis", sort=False).apply(_axis_ends, include_groups=False).reset_index(level=0)
    rules = alt.Chart(pd.DataFrame({"axis": list(axes)})).mark_rule(color="gray").encode(x=x)
    labels = alt.Chart(ends).mark_text(align="left", dx=3, fontSize=10, color="gray").encode(
        x=x, y="position:Q", text="value:N")
    return rules + lines + labels


def _axis_ends(group: pd.DataFrame) -> pd.DataFrame:
    """The values at the bottom and top of one axis, as labels."""
    return group.sort_values("position").iloc[[0, -1]][["position", "value"]]


def _label(value) -> str:
    """Short text for a parameter value; conditional parameters a trial did not use show as 'n/a'."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "n/a"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _axis_positions(column: pd.Series) -> np.ndarray:
    values = pd.to_numeric(column, errors="coerce")
    if values.notna().all() and column.notna().all():
        values = values.to_numpy(float)
        if values.min() > 0 and values.max() / values.min() >= 100:
            values = np.log10(values)
        span = values.max() - values.min()
        return (values - values.min()) / span if span else np.full(len(values), 0.5)
    codes, uniques = pd.factorize(column.map(_label), sort=True)
    return codes / max(len(uniques) - 1, 1)


def importances(values: dict[str, float]) -> alt.Chart:
    data = pd.DataFrame({"parameter": list(values), "importance": list(values.values())})
    return alt.Chart(data).mark_bar().encode(x=alt.X("importance:Q", title="importance (PED-ANOVA)"),
                                             y=alt.Y("parameter:N", sort="-x", title=None),
                                             tooltip=["parameter", alt.Tooltip("importance:Q", format=".3f")])


def learning_curves(history: pd.DataFrame, metric: str) -> alt.Chart:
    return alt.Chart(history).mark_line(point=True).encode(
        x=alt.X("step:Q", title="training step", axis=COUNTS),
        y=alt.Y(f"{metric}:Q", title=metric, scale=alt.Scale(zero=False)),
        color=alt.Color("trial_id:N", title="trial"),
        tooltip=["trial_id", "step", alt.Tooltip(f"{metric}:Q", format=".4f")])


def curve(data: pd.DataFrame, x: str, y: str, title: str, diagonal: bool = False) -> alt.Chart:
    """A ROC (with the chance diagonal) or precision-recall curve."""
    line = alt.Chart(data).mark_line().encode(x=alt.X(f"{x}:Q", scale=alt.Scale(domain=[0, 1])),
                                              y=alt.Y(f"{y}:Q", scale=alt.Scale(domain=[0, 1]))).properties(title=title)
    if not diagonal:
        return line
    chance = alt.Chart(pd.DataFrame({x: [0, 1], y: [0, 1]})).mark_line(strokeDash=[4, 4], color="gray")
    return line + chance.encode(x=f"{x}:Q", y=f"{y}:Q")


def score_histogram(images: pd.DataFrame, calibrated: float, selected: float) -> alt.Chart:
    """Scores of good vs defective test images, with the calibrated (dashed) and selected (solid) thresholds.
    Positive scores are binned on a log scale: defects can score a hundred times the good images, and even bins
    would put every good image, the threshold and the hardest defects in one bar."""
    log = bool((images["score"] > 0).all()) and min(calibrated, selected) > 0
    x = np.log10 if log else (lambda v: v)
    data = images.assign(kind=np.where(images["label"] == 1, "defective", "good"), x=x(images["score"]))
    axis = alt.Axis(labelExpr="format(pow(10, datum.value), '.2g')") if log else alt.Axis()
    title = "image score (log scale)" if log else "image score"
    bars = alt.Chart(data).mark_bar(opacity=0.6, binSpacing=0).encode(
        x=alt.X("x:Q", bin=alt.Bin(maxbins=40), title=title, axis=axis),
        y=alt.Y("count():Q", stack=None, title="images"),
        color=alt.Color("kind:N", scale=alt.Scale(domain=["good", "defective"], range=["#1f77b4", "#d62728"]),
                        title=None))
    marks = pd.DataFrame({"threshold": [calibrated, selected], "which": ["calibrated", "selected"]})
    rules = alt.Chart(marks.assign(x=x(marks["threshold"]))).mark_rule(color="black", size=2).encode(
        x="x:Q", strokeDash=alt.StrokeDash("which:N", scale=alt.Scale(
            domain=["calibrated", "selected"], range=[[6, 4], [1, 0]]), title="threshold"),
        tooltip=["which", alt.Tooltip("threshold:Q", format=".6f")])
    return bars + rules
