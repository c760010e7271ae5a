"""The evaluation report: matplotlib PNG plots, `report.md`, and a self-contained `report.html`.

The HTML embeds every plot as a base64 data URI and carries its own CSS: it opens offline, from an
artifact store, or as an e-mail attachment, with no CDN (unlike `dvc plots show`).

Plots (in `plots/`):
- `rewards.png`  one panel per reward: base vs. adapter means with 95% bootstrap intervals;
- `deltas.png`   paired delta per reward in base-std units with its 95% CI, and the win rate;
- `monitors.png` hacking monitors, base vs. adapter;
- `grid.png`     the same prompt and seed, base (top row) vs. adapter (bottom row);
- `training.png` training curves from `<train_dir>/metrics.jsonl` (rewards, α, losses), if given.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import textwrap
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from marble.eval.contract import EvalSummary, Interval, ScaleStats  # noqa: E402
from marble.io import atomic_write_text  # noqa: E402

log = logging.getLogger(__name__)

BASE_COLOR = "#8c8c8c"
ADAPTER_COLOR = "#1f77b4"
DPI = 110


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _err(iv: Interval) -> list[float]:
    """Asymmetric error bar lengths [below, above] of an interval (0 where unknown)."""
    lo, hi, m = iv.ci_lo, iv.ci_hi, iv.mean
    if not all(map(math.isfinite, (lo, hi, m))):
        return [0.0, 0.0]
    return [max(m - lo, 0.0), max(hi - m, 0.0)]


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# ------------------------------------------------------------------------------------------ plots
def plot_rewards(summary: EvalSummary, path: Path) -> Path:
    """Small multiples: each reward on its own axis (scales differ), base vs. adapter with CIs."""
    names = list(summary.rewards)
    cols = min(len(names), 4)
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        r = summary.rewards[name]
        means = [r.base.mean, r.adapter.mean]
        if not all(_finite(m) for m in means):
            ax.text(
                0.5, 0.5, "not applicable\nto any prompt", ha="center", va="center", transform=ax.transAxes
            )
        else:
            # points with intervals, not bars: reward scales need not include 0 (JPEG size is negative)
            for x, iv, color in ((0, r.base, BASE_COLOR), (1, r.adapter, ADAPTER_COLOR)):
                err = np.array(_err(iv)).reshape(2, 1)  # [2, 1]
                ax.errorbar([x], [iv.mean], yerr=err, fmt="o", ms=9, capsize=8, color=color, lw=2)
            ax.set_xlim(-0.6, 1.6)
        ax.set_xticks([0, 1], ["base", "adapter"])
        tag = (" (held out)" if r.held_out else "") + ("" if r.scale == "training" else f" [{r.scale}]")
        ax.set_title(f"{name}{tag}\nn={r.delta.n}, win {r.win_rate:.0%}" if _finite(r.win_rate) else name)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle("Per-reward means with 95% bootstrap intervals", fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def plot_deltas(summary: EvalSummary, path: Path) -> Path:
    """Paired delta per reward in units of the base std (comparable across rewards), with CIs."""
    names = list(summary.rewards)
    fig, ax = plt.subplots(figsize=(7.0, 0.55 * len(names) + 1.4))
    for i, name in enumerate(names):
        r = summary.rewards[name]
        d, sd = r.delta, r.base_std
        if not (_finite(d.mean) and _finite(sd)) or sd <= 0:
            continue
        m, lo, hi = d.mean / sd, d.ci_lo / sd, d.ci_hi / sd
        color = "#2ca02c" if lo > 0 else "#d62728" if hi < 0 else BASE_COLOR
        ax.barh(i, m, color=color, alpha=0.85, height=0.6)
        ax.errorbar(m, i, xerr=[[m - lo], [hi - m]], fmt="none", ecolor="black", capsize=4)
        ax.annotate(
            f"win {r.win_rate:.0%}", (1.01, i), xycoords=("axes fraction", "data"), va="center", fontsize=8
        )
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(names)), [f"{n} (held out)" if summary.rewards[n].held_out else n for n in names])
    ax.invert_yaxis()
    ax.set_xlabel("adapter - base, in base std units (95% CI; green = significant gain)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_monitors(summary: EvalSummary, path: Path) -> Path:
    """Hacking monitors, base vs. adapter, with intervals and the relative shift."""
    monitors = summary.monitors
    names = list(monitors)
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2.0, 3.2))
    x = np.arange(len(names))
    for off, model, color in ((-0.2, "base", BASE_COLOR), (0.2, "adapter", ADAPTER_COLOR)):
        means = [getattr(monitors[n], model).mean for n in names]
        errs = np.array([_err(getattr(monitors[n], model)) for n in names]).T  # [2, M]
        ax.bar(x + off, means, width=0.4, yerr=errs, capsize=4, color=color, label=model)
    ax.set_xticks(x, [f"{n}\nshift {monitors[n].relative_shift:.2f}" for n in names])
    ax.set_ylabel("value (all on [0, 1])")
    ax.set_title("Reward-hacking monitors")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def grid_indices(jobs: list[dict[str, Any]], num_prompts: int) -> list[int]:
    """First image of up to `num_prompts` prompts, families taken in turn so each family shows."""
    first: dict[str, list[int]] = {}
    seen: set[str] = set()
    for j in jobs:
        if j["prompt_id"] not in seen:
            seen.add(j["prompt_id"])
            first.setdefault(j["family"], []).append(j["index"])
    picked: list[int] = []
    queues = list(first.values())
    while len(picked) < num_prompts and any(queues):
        for q in queues:
            if q and len(picked) < num_prompts:
                picked.append(q.pop(0))
    return picked


def plot_grid(
    jobs: list[dict[str, Any]], base: torch.Tensor, adapter: torch.Tensor, num_prompts: int, path: Path
) -> Path | None:
    """Same prompt and seed: base (top) vs. adapter (bottom)."""
    idx = grid_indices(jobs, num_prompts)
    if not idx:
        return None
    fig, axes = plt.subplots(2, len(idx), figsize=(2.4 * len(idx), 5.4), squeeze=False)
    for c, i in enumerate(idx):
        for r, (label, imgs) in enumerate((("base", base), ("adapter", adapter))):
            ax = axes[r, c]
            ax.imshow(imgs[i].permute(1, 2, 0).numpy(), interpolation="nearest")  # uint8 or [0, 1] float
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=10)
        axes[0, c].set_title(
            "\n".join(textwrap.wrap(jobs[i]["prompt"], 26)) + f"\nseed {jobs[i]['seed']}", fontsize=8
        )
    fig.tight_layout()
    return _save(fig, path)


def read_training_metrics(train_dir: Path | None) -> list[dict[str, Any]]:
    """Records of `<train_dir>/metrics.jsonl` (lines cut by a kill are skipped)."""
    if train_dir is None or not (Path(train_dir) / "metrics.jsonl").is_file():
        return []
    out = []
    for line in (Path(train_dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def read_train_summary(train_dir: Path | None) -> list[list[str]]:
    """Scalar fields of `<train_dir>/train_summary.json` as table rows ([] when absent)."""
    path = Path(train_dir) / "train_summary.json" if train_dir is not None else None
    if path is None or not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return []
    return [
        [k, _fmt(v) if isinstance(v, float) else str(v)]
        for k, v in data.items()
        if isinstance(v, (int, float, str))
    ]


def _series(records: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["step"], r[key]) for r in records if "step" in r and _finite(r.get(key))]
    if not pts:
        return np.empty(0), np.empty(0)
    s, v = zip(*pts, strict=True)
    return np.asarray(s, dtype=float), np.asarray(v, dtype=float)


def _rolling(v: np.ndarray, window: int = 5) -> np.ndarray:
    """Trailing mean over `window` points (shorter at the start): batch means are noisy."""
    c = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, v.size + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def _keys(records: list[dict[str, Any]], prefix: str) -> list[str]:
    return sorted({k for r in records for k, v in r.items() if k.startswith(prefix) and _finite(v)})


def plot_training(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Training curves: one panel per trained reward (own scale: a +0.02 brightness gain is invisible
    beside a reward on another scale), then the balancer's α and the losses."""
    rewards = _keys(records, "train/reward/")
    others = [
        (p, t, k)
        for p, t in (("balance/alpha/", "α (balancer weight)"), ("loss/", "loss"))
        if (k := _keys(records, p))
    ]
    if not rewards and not others:
        return None
    cols = max(len(rewards), len(others), 1)
    rows = int(bool(rewards)) + int(bool(others))
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.7 * rows), squeeze=False)
    for ax, key in zip(axes[0], rewards, strict=False):
        s, v = _series(records, key)
        ax.plot(s, v, lw=0.8, alpha=0.4, color=ADAPTER_COLOR)
        ax.plot(s, _rolling(v), lw=1.8, color=ADAPTER_COLOR)
        ax.set_title(f"{key.removeprefix('train/reward/')} (batch mean)", fontsize=9)
    for ax, (prefix, title, keys) in zip(axes[-1], others, strict=False):
        for k in keys:
            ax.plot(*_series(records, k), lw=1.2, label=k.removeprefix(prefix))
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    for ax in axes.flat:
        if ax.has_data():
            ax.set_xlabel("optimizer step", fontsize=8)
            ax.grid(alpha=0.3)
        else:
            ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)


# ----------------------------------------------------------------------------------------- tables
def _fmt(x: Any, digits: int = 4) -> str:
    return f"{x:.{digits}g}" if _finite(x) else "–"


def _iv(iv: Interval) -> str:
    return f"{_fmt(iv.mean)} [{_fmt(iv.ci_lo)}, {_fmt(iv.ci_hi)}]"


def _scale_cells(s: ScaleStats) -> list[str]:
    sign = "+" if _finite(s.delta.mean) and s.delta.mean > 0 else ""
    return [
        str(s.delta.n),
        _iv(s.base),
        _iv(s.adapter),
        sign + _iv(s.delta),
        f"{s.win_rate:.0%}" if _finite(s.win_rate) else "–",
    ]


def reward_rows(summary: EvalSummary) -> list[list[str]]:
    """Each reward on the scale its paper reports."""
    return [
        [name + (" (held out)" if r.held_out else ""), r.scale, *_scale_cells(r)]
        for name, r in summary.rewards.items()
    ]


def training_scale_rows(summary: EvalSummary) -> list[list[str]]:
    """The training scale of the rewards whose reported score is another one (empty if none)."""
    return [
        [name, "training", *_scale_cells(r.training)] for name, r in summary.rewards.items() if r.training
    ]


def family_table(summary: EvalSummary) -> tuple[list[str], list[list[str]]]:
    """Reward means per prompt family, 'base -> adapter' (a specialist's gain shows on its family)."""
    names = list(summary.rewards)
    rows = []
    for fam, entry in summary.by_family.items():
        cells = [f"{fam} (n={entry.n})"]
        for n in names:
            e = entry.rewards.get(n)
            cells.append(f"{_fmt(e.base, 3)} -> {_fmt(e.adapter, 3)}" if e else "n/a")
        rows.append(cells)
    return ["family", *names], rows


REWARD_HEADER = [
    "reward",
    "scale",
    "n",
    "base mean [95% CI]",
    "adapter mean [95% CI]",
    "delta [95% CI]",
    "win rate",
]
MONITOR_HEADER = ["monitor", "base", "adapter", "relative shift"]


def monitor_rows(summary: EvalSummary) -> list[list[str]]:
    return [[n, _iv(m.base), _iv(m.adapter), _fmt(m.relative_shift, 3)] for n, m in summary.monitors.items()]


def lineage_rows(summary: EvalSummary) -> list[list[str]]:
    lin = summary.lineage
    keys = [
        "run_name",
        "git_commit",
        "config_hash",
        "data_hash",
        "adapter_sha256",
        "base_model",
        "base_model_revision",
    ]
    rows = [[k, str(getattr(lin, k))] for k in keys]
    rm = lin.reward_models
    rows.append(["reward_manifest_sha256", str(rm.manifest_sha256)])
    for name, e in rm.rewards.items():
        repos = " ".join(f"{a.id}@{a.revision or 'unpinned'}" for a in e.artifacts)
        rows.append([f"reward {name}", f"{e.kind} {repos}".strip()])
    s = summary.sampling
    shown = ("solver", "shift", "num_steps", "guidance_scale", "resolution", "device")
    rows.append(["sampling", ", ".join(f"{k}={getattr(s, k)}" for k in shown)])
    return rows


# Characters that open a Markdown or HTML construct (CommonMark lets any ASCII punctuation be
# backslash-escaped). Reward names, prompts, gate details and lineage strings come from configs and
# registries, and the Kubeflow UI renders report.md: a cell must stay text, never a link, image or tag.
_MD_SPECIAL = set("\\`*_{}[]()<>#!|~$&")


def md_escape(text: str) -> str:
    """`text` as literal Markdown table-cell text: special characters backslash-escaped, line breaks
    folded (a newline would end the table row)."""
    flat = " ".join(str(text).splitlines())
    return "".join("\\" + ch if ch in _MD_SPECIAL else ch for ch in flat)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(map(md_escape, header)) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(map(md_escape, row)) + " |" for row in rows]
    return "\n".join(out)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _headline(summary: EvalSummary) -> str:
    comp = summary.composite.all
    return (
        f"{summary.num_images} image pairs ({summary.num_prompts} held-out prompts, same seeds). "
        f"Composite z-score (all rewards, base vs. adapter): {_fmt(comp.base, 3)} vs. {_fmt(comp.adapter, 3)}. "
        f"Gate preview (without the champion): {'PASS' if summary.gate_preview.passed else 'FAIL'}."
    )


# ------------------------------------------------------------------------------------------ write
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222;
padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}td,th{border:1px solid #ccc;padding:.3em .6em;
text-align:left}th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}.pass{color:#1a7f37;font-weight:bold}
.fail{color:#b42318;font-weight:bold}code{font-size:.9em}
"""


def _gate_rows(summary: EvalSummary) -> list[list[str]]:
    return [[c.rule, c.subject, "ok" if c.passed else "FAIL", c.detail] for c in summary.gate_preview.checks]


PLOT_TITLES = {
    "rewards": "Per-reward means",
    "deltas": "Deltas and win rates",
    "monitors": "Hacking monitors",
    "grid": "Same prompt and seed: base (top) vs. adapter (bottom)",
    "training": "Training curves",
}

Table = tuple[str, list[str], list[list[str]]]
"""(title, header, rows) of one report table."""


def report_tables(summary: EvalSummary, train_dir: Path | None) -> list[Table]:
    """Every table of the report, in order (empty ones left out)."""
    fam_header, fam_rows = family_table(summary)
    tables: list[Table] = [
        ("Rewards (the scale each paper reports)", REWARD_HEADER, reward_rows(summary)),
        ("Rewards on the training scale", REWARD_HEADER, training_scale_rows(summary)),
        ("Per prompt family", fam_header, fam_rows),
        ("Monitors", MONITOR_HEADER, monitor_rows(summary)),
        ("Gate preview", ["rule", "subject", "result", "detail"], _gate_rows(summary)),
        ("Training run", ["what", "value"], read_train_summary(train_dir)),
    ]
    return [t for t in tables if t[2]]


def write_report(
    out_dir: Path,
    summary: EvalSummary,
    jobs: list[dict[str, Any]],
    base: torch.Tensor,
    adapter: torch.Tensor,
    grid_prompts: int,
    train_dir: Path | None,
) -> dict[str, Path]:
    """Write plots/*.png, report.md and report.html into `out_dir`; returns the plot paths."""
    plots_dir = Path(out_dir) / "plots"
    # Prompts and reward names are text, not mathtext: "$5 bill" must not make matplotlib raise after
    # all sampling is done.
    with plt.rc_context({"text.parse_math": False}):
        plots: dict[str, Path | None] = {
            "rewards": plot_rewards(summary, plots_dir / "rewards.png"),
            "deltas": plot_deltas(summary, plots_dir / "deltas.png"),
            "monitors": plot_monitors(summary, plots_dir / "monitors.png"),
            "grid": plot_grid(jobs, base, adapter, grid_prompts, plots_dir / "grid.png"),
            "training": plot_training(read_training_metrics(train_dir), plots_dir / "training.png"),
        }
    made = {k: p for k, p in plots.items() if p is not None}
    tables = report_tables(summary, train_dir)
    atomic_write_text(Path(out_dir) / "report.md", markdown_report(summary, tables, made))
    atomic_write_text(Path(out_dir) / "report.html", html_report(summary, tables, made))
    return made


def markdown_report(summary: EvalSummary, tables: list[Table], plots: dict[str, Path]) -> str:
    md = [f"# marble evaluation: {md_escape(summary.lineage.run_name)}", "", _headline(summary), ""]
    for title, header, rows in tables:
        md += [f"## {title}", "", _md_table(header, rows), ""]
    for key, p in plots.items():
        md += [f"## {PLOT_TITLES[key]}", "", f"![{key}](plots/{p.name})", ""]
    md += ["## Lineage", "", _md_table(["what", "value"], lineage_rows(summary)), ""]
    return "\n".join(md)


def html_report(summary: EvalSummary, tables: list[Table], plots: dict[str, Path]) -> str:
    """Self-contained HTML: the plots embedded as base64 data URIs, its own CSS."""
    passed = summary.gate_preview.passed
    run = html.escape(summary.lineage.run_name)
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>marble evaluation: {run}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>marble evaluation: {run}</h1>",
        f"<p>{html.escape(_headline(summary))} <span class='{'pass' if passed else 'fail'}'>"
        f"{'PASS' if passed else 'FAIL'}</span></p>",
    ]
    for title, header, rows in tables:
        parts += [f"<h2>{html.escape(title)}</h2>", _html_table(header, rows)]
    for key, p in plots.items():
        data = base64.b64encode(p.read_bytes()).decode("ascii")
        parts += [
            f"<h2>{html.escape(PLOT_TITLES[key])}</h2>",
            f"<img alt='{key}' src='data:image/png;base64,{data}'>",
        ]
    parts += ["<h2>Lineage</h2>", _html_table(["what", "value"], lineage_rows(summary)), "</body></html>"]
    return "\n".join(parts) + "\n"
