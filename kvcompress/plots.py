"""PNG plots of ``kvcompress.eval`` results (needs matplotlib: ``pip install 'kvcompress[eval]'``)."""

from __future__ import annotations

from pathlib import Path

_METRICS = (  # (task, key, title, log scale)
    ("passkey", "accuracy", "passkey accuracy", False),
    ("fidelity", "kl", "KL(full ‖ method), nats", True),
    ("fidelity", "top1", "top-1 agreement", False),
    ("ppl", "ppl", "perplexity", False),
)


def _pyplot():
    try:
        import matplotlib
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError("plots need matplotlib: pip install 'kvcompress[eval]'", name="matplotlib") from e
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _axis(results: dict) -> str:
    return "budget" if results["config"].get("budgets") is not None else "ratio"


def _read_budget(name: str) -> tuple[str, int] | None:
    """``("quest (slots read)", 128)`` for a spec such as
    ``"quest:token_budget=128"``: a method that keeps every token but reads
    ``token_budget`` slots per step (Quest, TidalDecode), plotted against the
    slots it reads."""
    from .methods import parse_method_spec

    if "+" in name:
        return None
    try:
        head, options = parse_method_spec(name)
    except ValueError:
        return None
    budget = options.pop("token_budget", None)
    if not isinstance(budget, int) or isinstance(budget, bool):
        return None
    return ":".join([head, *(f"{k}={v}" for k, v in options.items())]) + " (slots read)", budget


#: legend entries that fit inside the first panel; more go beside the panels
_LEGEND_INSIDE = 8
_MARKERS = ("o", "^", "D", "v")
_LINES = ("-", "-.", ":", (0, (5, 1)))


def _style(i: int, marker: str | None = None, linestyle: str | None = None) -> dict:
    """Line style of the i-th method: ten colours, then the next marker and
    line style with them, so that methods 10 apart stay apart."""
    k = (i // 10) % len(_MARKERS)
    return dict(color=f"C{i % 10}", marker=marker or _MARKERS[k], linestyle=linestyle or _LINES[k])


def plot_scores(results: dict, path) -> Path | None:
    """Score vs budget (or ratio), one line per method, the full cache as a
    dashed line; one panel per metric the run measured. Returns ``path``,
    or ``None`` when no metric was measured."""
    metrics = [m for m in _METRICS if m[0] in results["config"]["tasks"]]
    if not metrics:
        return None
    plt = _pyplot()
    axis = _axis(results)
    rows = results["rows"]
    full = rows[0]
    methods = list(dict.fromkeys(r["method"] for r in rows[1:]))
    cols = 2 if len(metrics) == 4 else len(metrics)
    nrows = (len(metrics) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.4 * cols, 3.3 * nrows), squeeze=False, layout="constrained")
    flat = [ax for row in axes for ax in row]
    for ax in flat[len(metrics):]:
        ax.axis("off")
    # readers (token_budget=) become one curve per family against the slots they read
    readers: dict[str, list] = {}
    if axis == "budget":
        for name in list(methods):
            got = _read_budget(name)
            mine = [r for r in rows if r["method"] == name]
            if got is not None and all(r[axis] is None for r in mine):
                readers.setdefault(got[0], []).extend((got[1], r) for r in mine)
                methods.remove(name)
    for ax, (task, key, title, log) in zip(flat, metrics):
        for j, (family, pts) in enumerate(readers.items()):
            pts = sorted((x, r[task][key]) for x, r in pts)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=family,
                    **_style(len(methods) + j, marker="s", linestyle="--"))
        for i, name in enumerate(methods):
            mine = [r for r in rows if r["method"] == name]
            if all(r[axis] is None for r in mine):
                # a method with no budget (KIVI keeps every token): a level, not a curve
                ax.axhline(mine[0][task][key], color=_style(i)["color"], linestyle=":", linewidth=1.2, label=name)
                continue
            pts = sorted((r[axis], r[task][key]) for r in mine)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, **_style(i))
        base = full[task][key]
        if log and base <= 0:
            title += " (full cache: 0)"
        else:
            ax.axhline(base, color="black", linestyle="--", linewidth=1, label="full cache")
        if log:
            ax.set_yscale("log")
        if axis == "budget":
            ax.set_xscale("log", base=2)
        ax.set_xlabel(("kept (or read) slots per kv head" if readers else "kept slots per kv head")
                      if axis == "budget" else "fraction removed")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    handles, labels = flat[0].get_legend_handles_labels()
    if "full cache" not in labels:
        handles.append(plt.Line2D([], [], color="black", linestyle="--", linewidth=1))
        labels.append("full cache")
    if len(labels) <= _LEGEND_INSIDE:
        flat[0].legend(handles, labels, fontsize=7)
    else:
        # many methods (the default list is all of them): beside the panels, where it cannot
        # squeeze them to nothing
        fig.legend(handles, labels, fontsize=7, loc="outside right upper", ncols=1 + len(labels) // 24)
    fig.suptitle(results["model"]["name"], fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_passkey_heatmap(results: dict, path) -> Path | None:
    """Depth × filler-length grid of passkey answers (green = exact), one
    panel per method and setting, full cache first. ``None`` without passkey."""
    if "passkey" not in results["config"]["tasks"]:
        return None
    plt = _pyplot()
    import numpy as np

    cfg = results["config"]
    lengths, depths = cfg["lengths"], cfg["depths"]
    axis = _axis(results)
    rows = results["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    settings = list(dict.fromkeys(r[axis] for r in rows[1:])) or [None]
    fig, axes = plt.subplots(len(methods), len(settings), squeeze=False, layout="constrained",
                             figsize=(1.2 + max(1.6, 0.5 * len(lengths)) * len(settings),
                                      0.8 + max(1.0, 0.3 * len(depths)) * len(methods)))
    for i, name in enumerate(methods):
        for j, value in enumerate(settings):
            ax = axes[i][j]
            row = next((r for r in rows if r["method"] == name and (name == "full" or r[axis] == value)), None)
            if row is None or (name == "full" and j > 0):
                ax.axis("off")
                continue
            grid = np.full((len(depths), len(lengths)), np.nan)
            for c in row["passkey"]["cases"]:
                grid[depths.index(c["depth"]), lengths.index(c["n_filler"])] = float(c["ok"])
            ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto", origin="lower")
            ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=6)
            ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=6)
            ax.set_title("full cache" if name == "full" else f"{name} {axis}={value}", fontsize=7)
    fig.supxlabel("filler tokens", fontsize=8)
    fig.supylabel("depth", fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
