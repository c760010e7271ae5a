"""Training metrics: `metrics.jsonl` (every step), TensorBoard, DVC plot CSVs and a progress bar.

Only the main process writes. Metric names follow docs/algorithm.md §6 (`train/reward/<k>`,
`balance/alpha/<k>`, `loss/policy`, ...). On resume, records after the resumed step are dropped so
the files read as one uninterrupted run.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from pathlib import Path
from typing import Any

from marble.io import atomic_write_text

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.csv"
ALPHA_FILE = "alpha.csv"


def _clean(value: Any) -> Any:
    """JSON-safe scalar: floats stay floats, non-finite becomes None (JSON has no NaN)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    """Appends one JSON record per step; mirrors scalars to TensorBoard; rewrites the plot CSVs.

    `curve_keys` are the columns of `curves.csv` (rewards, losses); `alpha_keys` those of `alpha.csv`.
    """

    def __init__(
        self,
        out_dir: Path,
        *,
        enabled: bool,
        tensorboard: bool,
        curve_keys: list[str],
        alpha_keys: list[str],
        resume_step: int | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.curve_keys = curve_keys
        self.alpha_keys = alpha_keys
        self.records: list[dict[str, Any]] = []
        self._writer = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / METRICS_FILE
        self.records = self._load_existing(resume_step)
        if tensorboard:
            self._writer = _tensorboard_writer(self.out_dir / "tensorboard", purge_step=resume_step)

    def _load_existing(self, resume_step: int | None) -> list[dict[str, Any]]:
        """Keep the records up to the resumed step; a fresh run starts a fresh file."""
        if resume_step is None or not self.path.is_file():
            atomic_write_text(self.path, "")
            return []
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill
            if rec.get("step", math.inf) <= resume_step:
                kept.append(rec)
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        return kept

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record the metrics of optimizer step `step` (numbers, tensors of one element, or None)."""
        if not self.enabled:
            return
        rec = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self.records.append(rec)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")
        if self._writer is not None:
            for key, value in rec.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(key, value, step)

    def write_plots(self) -> None:
        """Rewrite `curves.csv` and `alpha.csv` (DVC plots) from the records so far."""
        if not self.enabled:
            return
        for name, keys in ((CURVES_FILE, self.curve_keys), (ALPHA_FILE, self.alpha_keys)):
            buf = io.StringIO()
            w = csv.writer(buf, lineterminator="\n")
            w.writerow(["step", *keys])
            for rec in self.records:
                w.writerow([rec["step"], *("" if rec.get(k) is None else rec[k] for k in keys)])
            atomic_write_text(self.out_dir / name, buf.getvalue())
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        self.write_plots()
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _tensorboard_writer(log_dir: Path, purge_step: int | None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency, but a missing one must not stop training
        log.warning("tensorboard is not installed; TensorBoard logging disabled")
        return None
    return SummaryWriter(log_dir=str(log_dir), purge_step=None if purge_step is None else purge_step + 1)


class ProgressBar:
    """A tqdm bar over optimizer steps showing step, mean rewards and α (main process only)."""

    def __init__(
        self, total: int, initial: int, enabled: bool, reward_names: list[str], alpha_names: list[str]
    ) -> None:
        self.reward_names = reward_names
        self.alpha_names = alpha_names
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)

    def update(self, step: int, metrics: dict[str, Any], n: int = 1) -> None:
        if self._bar is None:
            return
        parts = {"step": step}
        for k in self.reward_names:
            v = _clean(metrics.get(f"train/reward/{k}"))
            if v is not None:
                parts[k] = f"{v:.3g}"
        alphas = [_clean(metrics.get(f"balance/alpha/{k}")) for k in self.alpha_names]
        if any(a is not None for a in alphas):
            parts["α"] = "/".join("-" if a is None else f"{a:.2f}" for a in alphas)
        self._bar.set_postfix(parts, refresh=False)
        self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
