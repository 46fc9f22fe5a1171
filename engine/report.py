"""Reports: the probe errors per site as tables, the paper's figures and a monotonicity summary,
written as CSV, JSON, PNG and one self-contained HTML page.

``report(results, out)`` takes one :class:`ProbeResults` or several by model state (e.g.
``{"init": r0, "trained": r1}``, or one per training checkpoint) and writes::

    out/index.html      the tables and figures, images inlined: opens offline, mails whole
    out/results.csv     one row per (state, layer, split); with ``baseline=``, the
                        baseline's error (``baseline_top1_error``) and the ``gain`` over it
    out/results.json    the same plus the monotonicity summary and each run's config
    out/errors.png      the paper's Fig. 3: error per site in network order, a panel per state
    out/heatmap.png     test error, site x state (with three states or more: a sweep)
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import InvalidArgumentError, ReportError
from .format import json_safe
from .results import ProbeResults

__all__ = ["report", "monotonicity", "site_ticks"]

SPLITS = ("train", "valid", "test")


def _states(results) -> dict[str, ProbeResults]:
    if isinstance(results, ProbeResults):
        return {"probes": results}
    if isinstance(results, Mapping) and results and all(
            isinstance(r, ProbeResults) for r in results.values()):
        return {str(k): v for k, v in results.items()}
    raise InvalidArgumentError("report() takes a ProbeResults or a non-empty mapping of state "
                               "name -> ProbeResults")


def _split_for(table: pd.DataFrame) -> str:
    """The split a report judges by: test, else valid, else train."""
    have = set(table.split)
    return next(s for s in ("test", "valid", "train") if s in have)


def monotonicity(errors: pd.Series) -> dict:
    """How far error falls monotonically with depth.

    Args:
        errors: error per site, in network order.

    Returns:
        ``steps`` (site-to-site steps), ``increases`` (steps where the error rose),
        ``bumps`` (the sites where it rose, with the rise), ``spearman`` (rank correlation of
        error with depth: -1 is a perfectly monotone fall), ``monotone`` (no increase).
    """
    e = errors.astype(float)
    rises = [(str(site), float(e.iloc[i] - e.iloc[i - 1]))
             for i, site in enumerate(e.index) if i and e.iloc[i] > e.iloc[i - 1]]
    depth = pd.Series(np.arange(len(e)), index=e.index, dtype=float)
    rho = float(e.corr(depth, method="spearman")) if len(e) > 1 and e.nunique() > 1 else 0.0
    return {"steps": max(0, len(e) - 1), "increases": len(rises),
            "bumps": [{"site": s, "rise": r} for s, r in rises],
            "spearman": rho, "monotone": not rises}


def _against(res: ProbeResults, baseline: ProbeResults) -> pd.DataFrame:
    """``res.table`` with the baseline's top-1 error of the same (layer, split) and the
    ``gain`` over it (baseline error minus this one's; NaN where the baseline lacks it)."""
    other = baseline.table.set_index(["layer", "split"]).top1_error
    t = res.table.copy()
    t["baseline_top1_error"] = other.reindex(pd.MultiIndex.from_frame(
        t[["layer", "split"]])).to_numpy()
    t["gain"] = t.baseline_top1_error - t.top1_error
    return t


def _tables(states: dict[str, ProbeResults], against: dict[str, ProbeResults]
            ) -> dict[str, pd.DataFrame]:
    """Each state's table as the CSV and JSON hold it: with its baseline's columns."""
    return {state: _against(res, against[state]) if state in against else res.table
            for state, res in states.items()}


def _long_table(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    return pd.concat([t.assign(state=state)[["state", *t.columns]]
                      for state, t in tables.items()], ignore_index=True)


#: beyond this many sites, figures keep their size and label every k-th site only
LABELLED_SITES = 40


def site_ticks(layers: list[str]) -> tuple[list[int], list[str]]:
    """(positions, names) of the sites an axis labels: at most :data:`LABELLED_SITES`,
    evenly spaced, so that a 128-layer sweep stays readable."""
    step = math.ceil(len(layers) / LABELLED_SITES)
    idx = list(range(0, len(layers), step))
    return idx, [layers[i] for i in idx]


def highest_error(t: pd.DataFrame) -> float:
    """The highest value Fig. 3 draws of a table: errors, the upper ends of their bands and
    the control task's error on the judged split (at chance, above the probe's)."""
    values = [t.top1_error]
    if "top1_error_high" in t:
        values.append(t.top1_error_high)
    if "control_top1_error" in t:
        values.append(t.control_top1_error[t.split == _split_for(t)])
    top = pd.concat(values).max()
    return float(top) if pd.notna(top) else 1.0


def _errors_figure(states: dict[str, ProbeResults], path: Path) -> None:
    from matplotlib.figure import Figure

    n = len(states)
    layers = max((list(r.table.layer.drop_duplicates()) for r in states.values()), key=len)
    worst = max(highest_error(r.table) for r in states.values())
    top = min(1.0, 0.05 * math.ceil((worst * 1.1 + 0.02) / 0.05))  # one y-axis for all
    width = max(6.0, 0.45 * min(len(layers), LABELLED_SITES) + 2.0)
    ms = 4 if len(layers) <= LABELLED_SITES else 0
    fig = Figure(figsize=(width, 3.2 * n + 0.6), layout="constrained")
    axes = fig.subplots(n, 1, sharey=True, squeeze=False)[:, 0]
    styles = {"train": ("#4c72b0", ":"), "valid": ("#55a868", "--"), "test": ("#c44e52", "-")}
    legend: dict[str, object] = {}  # one legend for all panels, each entry once
    for ax, (state, res) in zip(axes, states.items(), strict=True):
        t = res.table
        # the control task's error on the judged split only: at chance on valid and test
        # alike, two lines would lie on each other (its train error is memorisation)
        control = _split_for(t) if "control_top1_error" in t else None
        for split in SPLITS:
            part = t[t.split == split]
            if part.empty:
                continue
            color, ls = styles[split]
            x = [layers.index(layer) for layer in part.layer]
            ax.plot(x, part.top1_error, ls, color=color, marker="o", ms=ms, lw=1.5,
                    label=f"{split} error")
            if "top1_error_low" in part and part.top1_error_low.notna().any():
                ax.fill_between(x, part.top1_error_low, part.top1_error_high, color=color,
                                alpha=0.18, lw=0, label=f"{split} 95% interval")
            if split == control and part.control_top1_error.notna().any():
                ax.plot(x, part.control_top1_error, ls, color=color, lw=0.8, alpha=0.6,
                        label=f"{split} control task")
        ax.set_title(state, loc="left", fontsize=11, fontweight="bold")
        ax.set_ylabel("top-1 error")
        ax.set_ylim(0, top)
        ax.grid(axis="y", alpha=0.3)
        ax.set_xticks(*site_ticks(layers), rotation=35, ha="right", fontsize=9)
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    axes[-1].set_xlabel("probe site, in network order")
    fig.suptitle("Linear probe error per site", fontsize=12)
    # under the panels: never over the data, a panel's name or the title
    fig.legend(list(legend.values()), list(legend), loc="outside lower center",
               ncol=min(len(legend), 3 if len(legend) > 4 else 4), fontsize=8,
               frameon=False)
    fig.savefig(path, dpi=110)


def _heatmap(states: dict[str, ProbeResults], split: str, path: Path) -> None:
    from matplotlib.figure import Figure

    layers = max((list(r.table.layer.drop_duplicates()) for r in states.values()), key=len)
    grid = np.full((len(layers), len(states)), np.nan)
    for j, res in enumerate(states.values()):
        err = res.error(split) if split in set(res.table.split) else res.error(_split_for(
            res.table))
        for layer, v in err.items():
            grid[layers.index(layer), j] = v
    shown = min(len(layers), LABELLED_SITES)
    fig = Figure(figsize=(max(5.0, 0.6 * len(states) + 3), 0.35 * shown + 1.8),
                 layout="constrained")
    ax = fig.subplots()
    top = float(np.nanmax(grid)) if np.isfinite(grid).any() else 1.0
    im = ax.imshow(grid, aspect="auto", cmap="viridis_r", vmin=0, vmax=max(top, 1e-6))
    numbers = len(layers) <= LABELLED_SITES  # the numbers too, while they fit
    for (i, j), v in np.ndenumerate(grid):
        if numbers and np.isfinite(v):
            ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=7,
                    color="white" if v > 0.6 * top else "black")
    ax.set_yticks(*site_ticks(layers), fontsize=9)
    ax.set_xticks(range(len(states)), list(states), rotation=35, ha="right", fontsize=9)
    ax.set_xlabel("model state (training step)")
    ax.set_ylabel("probe site")
    fig.colorbar(im, ax=ax, label=f"{split} top-1 error")
    ax.set_title(f"{split} error across training", loc="left", fontsize=11)
    fig.savefig(path, dpi=110)


def _png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _html(title: str, states: dict[str, ProbeResults], summary: dict, figures: list[Path],
          notes: list[str], baseline: dict[str, ProbeResults]) -> str:
    esc = html.escape
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
             f"<title>{esc(title)}</title><style>"
             "body{font:15px/1.45 system-ui,sans-serif;max-width:1100px;margin:2em auto;"
             "padding:0 1em;color:#222}table{border-collapse:collapse;font-size:13px;"
             "margin:.5em 0 1.5em}td,th{border-bottom:1px solid #ddd;padding:3px 9px;"
             "text-align:right}th{background:#f4f4f4}td:first-child,th:first-child"
             "{text-align:left}img{max-width:100%}code{background:#f4f4f4;padding:0 3px}"
             "</style></head><body>", f"<h1>{esc(title)}</h1>"]
    for note in notes:
        parts.append(f"<p>{esc(note)}</p>")
    for fig in figures:
        parts.append(f"<p><img alt='{esc(fig.stem)}' src='{_png(fig)}'></p>")
    for state, res in states.items():
        mono = summary[state]
        split = mono["split"]
        bumps = ", ".join(f"{b['site']} (+{b['rise']:.3f}" + (
            f", 95% interval {b['low']:+.3f} to {b['high']:+.3f}"
            f"{'' if b['significant'] else ', not significant'}" if "p" in b else "") + ")"
            for b in mono["bumps"]) or "none"
        parts.append(f"<h2>{esc(state)}</h2><p>On the <b>{split}</b> split the error rises "
                     f"at {mono['increases']} of {mono['steps']} steps along the depth "
                     f"(bumps: {esc(bumps)}); Spearman correlation of error with depth "
                     f"{mono['spearman']:+.2f}.</p>")
        shown = _layer_table(res, split, baseline.get(state))
        parts.append(shown.to_html(index=False, float_format=lambda v: f"{v:.4f}",
                                   border=0))
    parts.append("<p><small>Written by probe-engine: results.csv and results.json beside "
                 "this page hold every number.</small></p></body></html>")
    return "\n".join(parts)


#: per-layer columns of the report's table, when the results have them: judged split's
#: interval, baselines and codelength
_EXTRA = {"top1_error_low": "low", "top1_error_high": "high",
          "balanced_accuracy": "balanced acc.", "selectivity": "selectivity",
          "control_top1_error": "control error", "shuffled_top1_error": "shuffled error",
          "codelength": "codelength (bits)", "compression": "compression"}


def _layer_table(res: ProbeResults, split: str, baseline: ProbeResults | None
                 ) -> pd.DataFrame:
    """One row per layer: width, lambda, top-1 error per split, then on the judged
    ``split`` whatever the results have of :data:`_EXTRA`, and the baseline's error."""
    t = res.table
    wide = t.pivot_table(index="layer", columns="split", values="top1_error", sort=False)
    wide = wide[[s for s in SPLITS if s in wide.columns]]
    info = t.drop_duplicates("layer").set_index("layer")[["dim", "l2"]]
    shown = info.join(wide)
    judged = t[t.split == split].set_index("layer")
    for col, name in _EXTRA.items():
        if col in judged and judged[col].notna().any():
            shown[f"{name}" if col in ("codelength", "compression") else
                  f"{split} {name}"] = judged[col]
    if baseline is not None:
        other = _against(res, baseline)
        other = other[other.split == split].set_index("layer")
        shown[f"{split} baseline error"] = other.baseline_top1_error
        shown["gain"] = other.gain
    return shown.reset_index()


def report(results, out: str | Path = "report", *, title: str | None = None,
           notes: list[str] | None = None, baseline: str | ProbeResults | None = None
           ) -> Path:
    """Write the report of ``results`` into the folder ``out``; returns ``out/index.html``.

    Args:
        results: a :class:`ProbeResults`, or a mapping of model state -> ProbeResults
            (in display order), e.g. ``{"init": r0, "trained": r1}``.
        out: folder, created if needed; existing report files in it are replaced.
        title: the page title.
        notes: paragraphs printed under the title (findings, caveats).
        baseline: the results of a reference model, e.g. the same network at random
            initialisation, as a :class:`ProbeResults` or the name of one of the states:
            each other state's table gets its error per layer and ``gain`` (baseline error
            minus this one's), what training added beyond the architecture.
    """
    states = _states(results)
    if baseline is not None and not isinstance(baseline, (str, ProbeResults)):
        raise InvalidArgumentError(f"baseline= takes the name of one of the states "
                                   f"{list(states)} or a ProbeResults, not "
                                   f"{type(baseline).__name__}")
    if isinstance(baseline, str):
        if baseline not in states:
            raise InvalidArgumentError(f"baseline {baseline!r} is not one of the states "
                                       f"{list(states)}")
        reference = states[baseline]
        against = {state: reference for state in states if state != baseline}
    else:
        against = dict.fromkeys(states, baseline) if baseline is not None else {}
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".probe-engine-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ReportError(f"cannot write the report into {out}: {exc.strerror or exc}; choose a "
                      f"writable folder with out=") from exc
    title = title or "probe-engine report"
    tables = _tables(states, against)
    _long_table(tables).to_csv(out / "results.csv", index=False)
    summary = {}
    for state, res in states.items():
        split = _split_for(res.table)
        summary[state] = {"split": split, **monotonicity(res.error(split))}
        if split in res.resampled:  # which rises the paired bootstrap can tell from noise
            sig = res.significance(split)
            # the step into each site from the one before it in the table, as the bump's
            sig = sig.set_index(["layer", "next"])
            errors = res.error(split)
            before = dict(zip(errors.index[1:], errors.index[:-1], strict=True))
            for bump in summary[state]["bumps"]:
                step = (before[bump["site"]], bump["site"])
                if step not in sig.index:  # a layer without outputs (a partial run)
                    continue
                row = sig.loc[step]
                bump.update(low=float(row.low), high=float(row.high), p=float(row.p),
                            significant=bool(row.low > 0))
    payload = {"title": title, "notes": notes or [], "monotonicity": summary,
               "baseline": (baseline if isinstance(baseline, str) or baseline is None else
                            {"run": baseline.run, "path": baseline.path}),
               "states": {state: {"config": res.config, "run": res.run, "path": res.path,
                                  "backends": res.backends,
                                  "table": tables[state].to_dict(orient="records")}
                          for state, res in states.items()}}
    (out / "results.json").write_text(json.dumps(json_safe(payload), indent=2))
    figures = [out / "errors.png"]
    _errors_figure(states, figures[0])
    if len(states) >= 3:
        figures.append(out / "heatmap.png")
        _heatmap(states, "test", figures[-1])
    page = out / "index.html"
    page.write_text(_html(title, states, summary, figures, notes or [], against))
    return page
