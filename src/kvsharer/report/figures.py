"""Seaborn figures (PNG + PDF) from policy, evaluation and distance files (stage ``figures``,
:mod:`kvsharer.stages.figures`).

Always writes the same files under ``--out-dir`` (``<name>.png`` and ``<name>.pdf`` for every name in
``FIGURES``), so Snakemake outputs stay fixed; a figure (or a panel) whose inputs are absent shows an
empty axis saying "no data". Several models are panels of one figure.

* ``ppl_vs_rate`` (the headline): PPL vs requested sharing rate, one line for the paper's order (dissimilar) and one
  for each of ours (measured, fitted: ``names.HEADLINE_ORDERS``), the plain model as a dashed line, log y axis;
  main metric and threshold;
* ``order_ablation``: the same with every order, the controls (similar, random) included (random: mean over
  seeds, band = min..max over seeds);
* ``distance_heatmap``: the layer distance matrix of every distances file (lower triangle) with the
  accepted pairs of the main dissimilar policy (largest requested rate <= ``--main-rate``) marked;
* ``acceptance_vs_rank``: accepted share of evaluated candidates per dissimilarity-rank bin, hue = T;
* ``threshold_ablation``: PPL and layers shared vs threshold T, one line per rate;
* ``metric_ablation``: PPL vs rate, one line per distance metric;
* ``passkey``: passkey retrieval accuracy over context length x needle depth, for the plain model and
  every rate of the main dissimilar policies (small multiples);
* ``search_scaling``: measured search seconds vs FLOPs with the fitted cost model, and the projected
  search time of 7B-405B models (from ``search-scaling``'s JSON, ``--scaling``);
* ``profile_memory``, ``profile_throughput``: KV bytes (measured and from the model shape) and decode
  throughput vs sharing rate, with and without each cache method (``profile`` CSVs, ``--profile``);
* ``compose``: PPL vs KV held (% of plain) for the plain model, sharing, each token method and both
  (the ``table2_compose`` rows), colour = token method, marker = sharing rate;
* ``quantization``: PPL vs KV held for every KV bit width, one line per sharing rate;
* ``minicache``: PPL vs KV held, KVSharer (every rate) against MiniCache (every rate): equal KV bytes
  are equal x positions;
* ``niah``: needle-in-a-haystack heatmaps (context length x needle depth) for the plain model, every
  sharing rate, each ``compose.niah`` method, and the method with sharing.

With a ``serving`` section in the config (``--serving``), also ``SERVING_FIGURES``:

* ``serving``: per model, output tokens/s and maximum concurrency vs KV-cache budget (vLLM), one line per
  policy served (plain in black; the ``serving`` table's rows).
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, no display

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from ..names import HEADLINE_ORDERS, ORDERS  # noqa: E402
from .collect import (METRICS, NO_CACHE, Collection, Distances, order_rank, passkey_cells_frame, plain,  # noqa: E402
                      results_frame, select, settings_frame, traces_frame)
from .tables import (DEFAULT_METRIC, DEFAULT_RANK_BIN, DEFAULT_THRESHOLD, acceptance_by_rank, metric_long,  # noqa: E402
                     minicache, quantization, rate_pct, serving, table2_compose, threshold_ablation)


DEFAULT_MAIN_RATE = 0.25
PANEL = (5.6, 3.6)  # inches per panel (about 1 inch of it for a legend outside the axes)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def grid(n_panels: int, ncols: int | None = None, nrows: int | None = None, panel=PANEL, **kwargs):
    """A figure with ``n_panels`` axes (a flat list); unused grid cells are hidden."""
    n_panels = max(n_panels, 1)
    if nrows is None:
        ncols = ncols or min(n_panels, 3)
        nrows = math.ceil(n_panels / ncols)
    ncols = ncols or math.ceil(n_panels / nrows)
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel[0] * ncols, panel[1] * nrows), squeeze=False, **kwargs)
    flat = list(axes.flat)
    for ax in flat[n_panels:]:
        ax.set_visible(False)
    return fig, flat[:n_panels]


def no_data(ax, what: str = "") -> None:
    ax.text(0.5, 0.5, "no data" + (f"\n({what})" if what else ""), ha="center", va="center",
            transform=ax.transAxes, fontsize=11, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def empty_figure(title: str, what: str):
    fig, (ax,) = grid(1)
    no_data(ax, what)
    ax.set_title(title)
    return fig


def with_rate_pct(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    frame["rate_pct"] = rate_pct(frame["rate_requested"])
    return frame


def log_scale(ax, axis: str = "y") -> None:
    """Log y (or x) axis with plain numbers (12.5, not 1.25x10^1); minor ticks labelled when it spans under two
    decades."""
    scale, limits, set_scale = ((ax.yaxis, ax.get_ylim, ax.set_yscale) if axis == "y"
                                else (ax.xaxis, ax.get_xlim, ax.set_xscale))
    set_scale("log")
    scale.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    low, high = limits()
    if low > 0 and high / low < 100:  # under a decade every minor tick, under two the 2s and 5s (2, 5, 20, 50)
        every = high / low < 10
        scale.set_minor_formatter(FuncFormatter(
            lambda v, _: f"{v:g}" if every or round(v / 10 ** math.floor(math.log10(v))) in (2, 5) else ""))
        ax.tick_params(axis=axis, which="minor", labelsize=7)
    else:
        scale.set_minor_formatter(NullFormatter())


BYTE_UNITS = (("GB", 1e9), ("MB", 1e6), ("kB", 1e3))  # decimal: ticks at round byte counts stay round


def bytes_axis(ax, axis: str = "y") -> None:
    """Tick labels in kB / MB / GB (one unit per axis, from its larger limit) instead of raw bytes under
    a ``1e9`` offset."""
    limits = ax.get_ylim if axis == "y" else ax.get_xlim

    def label(value, _pos):
        top = max(abs(v) for v in limits())
        unit, scale = next(((u, s) for u, s in BYTE_UNITS if top >= s), ("B", 1.0))
        return f"{value / scale:.4g} {unit}"

    (ax.yaxis if axis == "y" else ax.xaxis).set_major_formatter(FuncFormatter(label))


def _unique(handles, labels):
    """Legend entries without repeats (the same label drawn twice, e.g. one reference line per value)."""
    seen = {}
    for handle, label in zip(handles, labels):
        seen.setdefault(label, handle)
    return list(seen.values()), list(seen)


def _legend(ax, title: str | None = None) -> None:
    """The axis' legend outside it, on the right (it covers no data), each label once."""
    handles, labels = _unique(*ax.get_legend_handles_labels())
    if handles:
        ax.legend(handles, labels, title=title, fontsize=8, title_fontsize=8, loc="upper left",
                  bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


def _finish(ax, xlabel: str, ylabel: str, title: str, legend: bool = True, legend_title: str | None = None) -> None:
    """A panel's axis labels and title, then (``legend``) its legend outside it (``_legend``)."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if legend:
        _legend(ax, legend_title)


def main_policy(results: pd.DataFrame, model: str, metric: str, threshold: float, main_rate: float):
    """The dissimilar main policy of ``model`` whose accepted pairs a heatmap marks: the largest requested
    rate <= ``main_rate`` (else the smallest rate), at ``metric`` if there is one, else any metric."""
    sub = select(results, order="dissimilar", threshold=threshold)
    sub = sub[sub["model"].eq(model) & sub["policy_path"].notna()]
    for candidates in (sub[sub["metric"].eq(metric)], sub):
        if candidates.empty:
            continue
        rates = candidates["rate_requested"].astype(float)
        below = candidates[rates <= main_rate + 1e-9]
        pick = below.loc[[below["rate_requested"].astype(float).idxmax()]] if len(below) else \
            candidates.loc[[rates.idxmin()]]
        return pick.iloc[0]
    return None


# ------------------------------------------------------------------------------------------------
# the figures
# ------------------------------------------------------------------------------------------------


def fig_ppl_vs_rate(results: pd.DataFrame, metric: str, threshold: float, orders=HEADLINE_ORDERS):
    """PPL vs rate of ``orders`` (None: every order)."""
    sub = select(results, metric=metric, threshold=threshold)
    keep = sub["order"].isin(orders) if orders is not None else sub["order"].notna()
    sub = with_rate_pct(sub[keep & sub["ppl"].notna()])
    base = plain(results).dropna(subset=["ppl"])
    models = sorted(set(sub["model"]) | set(base["model"]))
    if not models:
        return empty_figure("PPL vs sharing rate", "no perplexity results")
    fig, axes = grid(len(models))
    for ax, model in zip(axes, models):
        part = sub[sub["model"] == model]
        # one value per (order, rate, seed): several procedures of one setting are averaged first;
        # the random order's band spans min..max over seeds (a +-sd band of a skewed PPL dips below zero)
        part = part.groupby(["order", "rate_pct", "seed"], as_index=False, dropna=False)["ppl"].mean()
        shown = sorted(set(part["order"]), key=lambda o: (order_rank(o), o))
        if len(part):  # an order has the same colour in every figure
            colours = sns.color_palette(n_colors=len(ORDERS) + 1)
            palette = {o: colours[order_rank(o)] for o in shown}
            sns.lineplot(data=part, x="rate_pct", y="ppl", hue="order", hue_order=shown, style="order",
                         style_order=shown, palette=palette, markers=True, dashes=False, errorbar=("pi", 100), ax=ax)
        for value in base.loc[base["model"] == model, "ppl"]:
            ax.axhline(value, color="0.3", linestyle="--", linewidth=1, label="plain model")
        log_scale(ax)
        _finish(ax, "requested sharing rate (%)", "perplexity (log scale)", f"{model} ({metric}, T={threshold:g})")
    return fig


def fig_distance_heatmap(distances: list[Distances], results: pd.DataFrame, traces: pd.DataFrame, metric: str,
                         threshold: float, main_rate: float):
    if not distances:
        return empty_figure("layer distances", "no distances files")
    fig, axes = grid(len(distances), panel=(5.2, 4.4))
    for ax, dist in zip(axes, distances):
        n = dist.matrix.shape[0]
        mask = np.triu(np.ones((n, n), dtype=bool))  # pairs are (i > j): the lower triangle
        step = max(1, n // 10)
        sns.heatmap(dist.matrix, mask=mask, cmap="viridis", square=True, ax=ax, xticklabels=step, yticklabels=step,
                    cbar_kws={"label": f"{dist.metric} distance", "shrink": 0.8})
        policy = main_policy(results, dist.model, dist.metric if dist.metric else metric, threshold, main_rate)
        title = f"{dist.model}: {dist.metric} distances"
        if policy is not None:
            accepted = traces[traces["policy_path"].eq(policy["policy_path"]) & traces["accepted"]]
            for layer, source in zip(accepted["layer"], accepted["source"]):
                ax.add_patch(Rectangle((int(source), int(layer)), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
            if len(accepted):
                proxy = Rectangle((0, 0), 1, 1, fill=False, edgecolor="red", linewidth=1.5)
                ax.legend([proxy], ["accepted pair (i shares j)"], loc="upper right", fontsize=7)
            title += f"\nmarked: {policy['policy']}"
        ax.grid(False)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("layer j (source)")
        ax.set_ylabel("layer i (shares j's KV)")
    return fig


def fig_acceptance_vs_rank(traces: pd.DataFrame, metric: str, rank_bin: int):
    table = acceptance_by_rank(traces, rank_bin)
    table = table[table["metric"].eq(metric)].copy()
    if table.empty:
        return empty_figure("acceptance vs dissimilarity rank", f"no dissimilar {metric} search traces")
    table["T"] = table["threshold"].map(lambda t: f"{t:g}")
    table["rank_mid"] = (table["rank_lo"].astype(float) + table["rank_hi"].astype(float)) / 2
    table["accepted_fraction"] = table["accepted_fraction"].astype(float)
    models = sorted(set(table["model"]))
    fig, axes = grid(len(models))
    for ax, model in zip(axes, models):
        part = table[table["model"] == model]
        hue_order = sorted(set(part["T"]), key=float)
        sns.lineplot(data=part, x="rank_mid", y="accepted_fraction", hue="T", hue_order=hue_order, marker="o", ax=ax)
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlim(0, float(part["rank_hi"].max()) + 1)
        _finish(ax, f"dissimilarity rank (bins of {rank_bin}; 0 = most dissimilar)", "accepted fraction of candidates",
                f"{model} ({metric}, dissimilar order)", legend_title="threshold T")
    return fig


def fig_threshold_ablation(results: pd.DataFrame, metric: str, threshold: float):
    table = threshold_ablation(results, metric, threshold)
    if table.empty:
        return empty_figure("threshold ablation", "no policies with a threshold besides the main one")
    table = table.copy()
    table["rate"] = table["rate_pct"].map(lambda r: f"{r:g} %")
    for column in ("threshold", "ppl", "layers_shared", "target"):
        table[column] = pd.to_numeric(table[column], errors="coerce").astype(float)
    models = sorted(set(table["model"]))
    fig, axes = grid(2 * len(models), ncols=2)
    for k, model in enumerate(models):
        part = table[table["model"] == model]
        rates = list(dict.fromkeys(part.sort_values("rate_pct")["rate"]))
        ax_ppl, ax_layers = axes[2 * k], axes[2 * k + 1]
        if part["ppl"].notna().any():
            sns.lineplot(data=part.dropna(subset=["ppl"]), x="threshold", y="ppl", hue="rate", hue_order=rates,
                         marker="o", ax=ax_ppl)
            log_scale(ax_ppl)
            _legend(ax_ppl, "requested rate")
        else:
            no_data(ax_ppl, "no perplexity results")
        _finish(ax_ppl, "threshold T", "perplexity (log scale)", f"{model}: PPL vs T ({metric})", legend=False)
        sns.lineplot(data=part, x="threshold", y="layers_shared", hue="rate", hue_order=rates, marker="o", ax=ax_layers)
        for _, row in part.drop_duplicates("rate").iterrows():
            if not math.isnan(row["target"]):
                ax_layers.axhline(row["target"], color="0.6", linestyle=":", linewidth=1)
        ax_layers.yaxis.set_major_locator(MaxNLocator(integer=True))
        _finish(ax_layers, "threshold T", "layers shared (dotted: target)", f"{model}: layers shared vs T",
                legend_title="requested rate")
    return fig


def fig_metric_ablation(results: pd.DataFrame, metric: str, threshold: float):
    sub = metric_long(results, metric, threshold)
    if sub.empty:
        return empty_figure("metric ablation", "no policies with a metric besides the main one")
    sub = with_rate_pct(sub)
    models = sorted(set(sub["model"]))
    fig, axes = grid(len(models))
    for ax, model in zip(axes, models):
        part = sub[sub["model"] == model].groupby(["metric", "rate_pct"], as_index=False)["ppl"].mean()
        metrics = sorted(set(part["metric"]), key=lambda m: (METRICS.index(m) if m in METRICS else 99, m))
        sns.lineplot(data=part, x="rate_pct", y="ppl", hue="metric", hue_order=metrics, style="metric",
                     style_order=metrics, markers=True, dashes=False, ax=ax)
        log_scale(ax)
        _finish(ax, "requested sharing rate (%)", "perplexity (log scale)", f"{model} (dissimilar order, T={threshold:g})",
                legend_title="distance metric")
    return fig


def _main_cells(cells: pd.DataFrame, metric: str, threshold: float) -> pd.DataFrame:
    return with_rate_pct(pd.concat([plain(cells), select(cells, order="dissimilar", metric=metric, threshold=threshold)]))


def _heatmaps(sub: pd.DataFrame, column: str, label, what: str):
    """Passkey heatmaps (depth x length), one row of panels per model, one panel per value of ``column``."""
    models = sorted(set(sub["model"]))
    keys = list(dict.fromkeys(sub[column]))
    fig, axes = grid(len(models) * len(keys), nrows=len(models), ncols=len(keys), panel=(3.4, 3.0))
    for r, model in enumerate(models):
        for c, key in enumerate(keys):
            ax = axes[r * len(keys) + c]
            part = sub[(sub["model"] == model) & (sub[column] == key)]
            ax.set_title(f"{model}: {label(key)}", fontsize=9)
            if part.empty:  # e.g. a model whose config leaves out the token methods (token_methods: false)
                no_data(ax, "not run for this model")
                continue
            # several policies of one panel (procedures): mean accuracy per cell
            table = (part.assign(accuracy=part["accuracy"].astype(float))
                         .pivot_table(index="depth", columns="length", values="accuracy", aggfunc="mean"))
            annotate = table.size <= 64
            sns.heatmap(table, vmin=0, vmax=1, cmap="RdYlGn", annot=annotate, fmt=".2f", ax=ax,
                        cbar=c == len(keys) - 1, cbar_kws={"label": "accuracy"}, annot_kws={"fontsize": 7})
            ax.grid(False)
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel("needle depth")
    return fig


def fig_passkey(cells: pd.DataFrame, metric: str, threshold: float):
    sub = _main_cells(cells[cells["cache"] == NO_CACHE], metric, threshold)
    if sub.empty:
        return empty_figure("passkey retrieval", "no evaluate-longctx results")
    sub = sub.sort_values("rate_pct", kind="stable")
    return _heatmaps(sub, "rate_pct", lambda rate: "plain" if rate == 0 else f"{rate:g} % shared", "passkey")


def fig_niah(cells: pd.DataFrame, metric: str, threshold: float):
    """Plain, every sharing rate, each needle-in-a-haystack cache method alone and with sharing."""
    sub = _main_cells(cells, metric, threshold)
    if sub.empty or (sub["cache"] == NO_CACHE).all():
        return empty_figure("needle in a haystack", "no evaluate-longctx results with a cache method")
    sub["setting"] = [("plain" if rate == 0 else f"{rate:g} % shared") + ("" if cache == NO_CACHE else f" + {cache}")
                      for rate, cache in zip(sub["rate_pct"], sub["cache"])]
    sub = sub.assign(composed=sub["cache"] != NO_CACHE).sort_values(["composed", "cache", "rate_pct"], kind="stable")
    return _heatmaps(sub, "setting", str, "needle in a haystack")


def _ppl_vs_kv(ax, frame: pd.DataFrame, hue: str, style: str | None = None, lines: bool = False) -> None:
    frame = frame[frame["kv_pct"].notna() & frame["ppl"].notna()]
    if frame.empty:
        no_data(ax)
        return
    if lines:
        sns.lineplot(data=frame.sort_values("kv_pct"), x="kv_pct", y="ppl", hue=hue, style=style, marker="o",
                     ax=ax, sort=False)
    else:
        sns.scatterplot(data=frame, x="kv_pct", y="ppl", hue=hue, style=style, s=60, ax=ax)
    log_scale(ax)
    ax.set_xlabel("KV cache held (% of plain)")
    ax.set_ylabel("PPL")
    _legend(ax)


def _per_model(frame: pd.DataFrame, what: str, draw):
    if frame.empty:
        return empty_figure(what, "no results")
    models = sorted(set(frame["model"]))
    fig, axes = grid(len(models))
    for ax, model in zip(axes, models):
        ax.set_title(f"{model}: {what}")
        draw(ax, frame[frame["model"] == model])
    return fig


def fig_compose(table: pd.DataFrame):
    frame = table.assign(method=table["cache"], sharing=table["rate_pct"].map(lambda r: f"{r:g} %"))
    return _per_model(frame, "sharing x token methods", lambda ax, part: _ppl_vs_kv(ax, part, "method", "sharing"))


def fig_quantization(table: pd.DataFrame):
    frame = table.assign(sharing=table["rate_pct"].map(lambda r: f"{r:g} % shared"))
    return _per_model(frame, "sharing x KV quantization", lambda ax, part: _ppl_vs_kv(ax, part, "sharing", lines=True))


def fig_minicache(table: pd.DataFrame):
    return _per_model(table, "KVSharer vs MiniCache", lambda ax, part: _ppl_vs_kv(ax, part, "method", lines=True))


def fig_search_scaling(scaling: dict | None):
    if not scaling:
        return empty_figure("search scaling", "no search-scaling results")
    fig, (ax_fit, ax_proj) = plt.subplots(1, 2, figsize=(12.5, 4))
    rows = pd.DataFrame(scaling["measurements"])
    # GFLOPs, so that both log axes read as plain numbers (0.2 s at 30 GFLOPs, not 2x10^-1 at 3x10^10)
    rows["gflops"] = rows["layers_computed"] * rows["samples"] * rows["tokens"] * rows["flops_per_layer_token"] / 1e9
    rows["depth x width"] = rows["layers"].astype(str) + " x " + rows["hidden"].astype(str)
    sns.scatterplot(data=rows, x="gflops", y="seconds", hue="depth x width", s=40, ax=ax_fit)
    fit = scaling["fit"]
    xs = pd.Series(sorted(rows["gflops"]))
    ax_fit.plot(xs, xs * 1e9 / fit["throughput_flops"] + fit["fixed_seconds_per_candidate"] * rows["candidates"].mean(),
                color="0.3", linestyle="--", label=f"fit: {fit['throughput_flops'] / 1e9:.3g} GFLOP/s")
    log_scale(ax_fit, "x")
    log_scale(ax_fit)
    ax_fit.set_xlabel("GFLOPs of one search (fast procedure)")
    ax_fit.set_ylabel("seconds (this machine)")
    ax_fit.set_title(f"measured, R$^2$ = {fit['r2']:.2f}")
    _legend(ax_fit, "layers x hidden")
    proj = pd.DataFrame(scaling["projection"]).melt(
        id_vars="model", value_vars=["gpu_seconds_expected", "gpu_seconds_official_expected", "gpu_seconds_worst"],
        var_name="case", value_name="seconds")
    proj["case"] = proj["case"].map({"gpu_seconds_expected": "fast, expected candidates",
                                     "gpu_seconds_official_expected": "official, expected candidates",
                                     "gpu_seconds_worst": "fast, every pair tried"})
    sns.barplot(data=proj, x="model", y="seconds", hue="case", ax=ax_proj)
    log_scale(ax_proj)
    ax_proj.set_xlabel("")
    ax_proj.set_ylabel(f"compute seconds at {scaling['assumptions']['gpu_flops'] / 1e12:.0f} TFLOP/s (assumed)")
    ax_proj.set_title("projected search compute")
    ax_proj.tick_params(axis="x", labelrotation=20)
    _legend(ax_proj)
    fig.tight_layout()
    return fig


def _profile_panels(profile: pd.DataFrame | None, what: str):
    if profile is None or profile.empty:
        return None
    grid_rows = profile[(profile["kind"] == "grid") & profile[what].notna()].copy()
    if grid_rows.empty:
        return None
    if "cache" not in grid_rows:  # written before cache methods other than token methods existed
        grid_rows["cache"] = [NO_CACHE if i == "none" else f"{i}:{float(b):g}"
                              for i, b in zip(grid_rows["intra"], grid_rows["budget"])]
    grid_rows["method"] = ["sharing only" if c == NO_CACHE else f"+ {c}" for c in grid_rows["cache"]]
    grid_rows["rate_pct"] = grid_rows["rate"].astype(float) * 100
    grid_rows["setting"] = ("batch " + grid_rows["batch"].astype(int).astype(str) + ", "
                            + grid_rows["context"].astype(int).astype(str) + " tokens")
    return grid_rows


def _drawn_under(rows: pd.DataFrame, column: str, methods: list[str]) -> dict[str, str]:
    """``{method: a later-drawn method with the same value at every point}``: its line is hidden under that
    one's (H2O and PyramidInfer at one budget hold the same KV bytes), which the legend says."""
    keys = ["setting", "model", "rate_pct"]
    values = {m: rows[rows["method"] == m].astype({column: float}).groupby(keys)[column].mean() for m in methods}
    hidden = {}
    for k, method in enumerate(methods):
        mine = values[method]
        for later in reversed(methods[k + 1:]):  # the last drawn is on top
            other = values[later]
            if not mine.empty and mine.index.isin(other.index).all() and np.allclose(mine, other.loc[mine.index]):
                hidden[method] = later
                break
    return hidden


MODEL_DASHES = ("", (4, 1.5), (1, 1.2), (3, 1.2, 1, 1.2), (6, 2))  # seaborn dash specs: "" is solid


def _fig_profile(profile: pd.DataFrame | None, column: str, ylabel: str, what: str, expected: bool = False,
                 in_bytes: bool = False):
    """One panel per (batch, context): ``column`` vs sharing rate; colour = cache method, line style = model
    (when there are several); one legend for the whole figure, right of the panels."""
    rows = _profile_panels(profile, column)
    if rows is None:
        return empty_figure(what, "no profile results")
    settings = list(dict.fromkeys(rows.sort_values(["batch", "context"])["setting"]))
    methods = sorted(set(rows["method"]), key=lambda m: (m != "sharing only", m))
    palette = dict(zip(methods, sns.color_palette(n_colors=len(methods))))
    models = sorted(set(rows["model"]))
    dashes = {m: MODEL_DASHES[k % len(MODEL_DASHES)] for k, m in enumerate(models)}
    several = len(models) > 1
    fig, axes = grid(len(settings))
    for ax, setting in zip(axes, settings):
        part = rows[rows["setting"] == setting]
        sns.lineplot(data=part, x="rate_pct", y=column, hue="method", hue_order=methods, palette=palette,
                     style="model" if several else None, style_order=models if several else None,
                     dashes=dashes if several else True, marker="o", legend=False, ax=ax)
        if expected:  # what the model shape predicts, as crosses on the measured lines
            shape = part.drop_duplicates(["model", "rate", "cache"])
            ax.scatter(shape["rate_pct"], shape["expected_kv_bytes"].astype(float), marker="x", color="0.2", s=18,
                       zorder=3)
        if in_bytes:
            bytes_axis(ax)
        ax.set_xlabel("sharing rate (%)")
        ax.set_ylabel(ylabel)
        ax.set_title(setting)
    hidden = _drawn_under(rows, column, methods)
    handles = [Line2D([], [], color=palette[m], marker="o", label=m if m not in hidden else f"{m} (= {hidden[m]})")
               for m in methods]
    if several:
        handles.append(Line2D([], [], linestyle="none", label="model:"))
        handles += [Line2D([], [], color="0.3", label=m, **({"dashes": d} if d else {})) for m, d in dashes.items()]
    if expected:
        handles.append(Line2D([], [], color="0.2", marker="x", linestyle="none", label="from the model shape"))
    fig.tight_layout()
    fig.legend(handles=handles, title="cache method", loc="upper left", bbox_to_anchor=(1.0, 0.97), fontsize=8,
               title_fontsize=8, frameon=False)
    return fig


def fig_profile_memory(profile: pd.DataFrame | None):
    return _fig_profile(profile, "kv_bytes", "KV cache held (measured)", "KV memory vs sharing rate", expected=True,
                        in_bytes=True)


def fig_profile_throughput(profile: pd.DataFrame | None):
    return _fig_profile(profile, "decode_tok_s", "decode throughput (tokens/s)", "decode throughput vs sharing rate")


def fig_serving(table: pd.DataFrame):
    """A row of two panels per model: output tokens/s and maximum concurrency vs KV budget, a line per policy."""
    if table.empty:
        return empty_figure("serving in vLLM", "no serving results")
    frame = table.assign(policy=[m if m == "plain" else f"{m} {r:g} %" for m, r in zip(table["method"], table["rate_pct"])],
                         max_concurrency=table["max_concurrency"].astype(float))
    models = sorted(set(frame["model"]))
    fig, axes = grid(2 * len(models), ncols=2)
    for k, model in enumerate(models):
        part = frame[frame["model"] == model]
        policies = list(dict.fromkeys(part["policy"]))  # the table's order: plain, then by rate and order
        colours = iter(sns.color_palette(n_colors=len(policies)))
        palette = {p: "black" if p == "plain" else next(colours) for p in policies}
        for ax, column, ylabel in ((axes[2 * k], "output_tok_s", "output tokens/s"),
                                   (axes[2 * k + 1], "max_concurrency", "max concurrency (requests at full length)")):
            for policy in policies:  # one line each, labelled by the policy (plain dashed)
                rows = part[part["policy"] == policy].sort_values("kv_mib")
                ax.plot(rows["kv_mib"], rows[column], marker="o", color=palette[policy], label=policy,
                        linestyle="--" if policy == "plain" else "-")
            _finish(ax, "KV-cache budget (MiB)", ylabel, f"{model}: {ylabel.split(' (')[0]} vs KV budget",
                    legend=ax is axes[2 * k + 1], legend_title="policy")
    return fig


def build_figures(collection: Collection, distances: list[Distances], metric: str = DEFAULT_METRIC,
                  threshold: float = DEFAULT_THRESHOLD, rank_bin: int = DEFAULT_RANK_BIN, main_rate: float = DEFAULT_MAIN_RATE,
                  scaling: dict | None = None, profile: pd.DataFrame | None = None,
                  serving_results: pd.DataFrame | None = None):
    """``{name: function drawing that figure}`` for every name in ``FIGURES`` and ``SERVING_FIGURES``."""
    results = results_frame(collection)
    traces = traces_frame(collection)
    settings = settings_frame(collection)
    cells = passkey_cells_frame(collection)
    return {
        "compose": lambda: fig_compose(table2_compose(settings, profile, metric, threshold)),
        "quantization": lambda: fig_quantization(quantization(settings, metric, threshold)),
        "minicache": lambda: fig_minicache(minicache(settings, metric, threshold)),
        "niah": lambda: fig_niah(cells, metric, threshold),
        "ppl_vs_rate": lambda: fig_ppl_vs_rate(results, metric, threshold),
        "order_ablation": lambda: fig_ppl_vs_rate(results, metric, threshold, orders=None),
        "distance_heatmap": lambda: fig_distance_heatmap(distances, results, traces, metric, threshold, main_rate),
        "acceptance_vs_rank": lambda: fig_acceptance_vs_rank(traces, metric, rank_bin),
        "threshold_ablation": lambda: fig_threshold_ablation(results, metric, threshold),
        "metric_ablation": lambda: fig_metric_ablation(results, metric, threshold),
        "passkey": lambda: fig_passkey(cells, metric, threshold),
        "search_scaling": lambda: fig_search_scaling(scaling),
        "profile_memory": lambda: fig_profile_memory(profile),
        "profile_throughput": lambda: fig_profile_throughput(profile),
        "serving": lambda: fig_serving(serving(serving_results)),
    }
