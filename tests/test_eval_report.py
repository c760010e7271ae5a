"""The report renders from a synthetic evaluation: PNG plots, report.md, self-contained report.html."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from _eval_helpers import summary as full_summary

from marble.configio import read_config_dict, validate_config
from marble.eval import monitors as mon
from marble.eval.evaluate import ImageScores, summarize
from marble.eval.report import grid_indices, write_report

REPO = Path(__file__).resolve().parents[1]


def synthetic_evaluation(n_prompts: int = 12, per_prompt: int = 2):
    """Scores where brightness improves clearly, colorfulness a little, jpeg (held out) drops slightly;
    color_match applies only to the 'color' family, edge_detail only to 'text' (NaN elsewhere). The
    tiny config's rewards without position_match."""
    data = read_config_dict(REPO / "configs/tiny.yaml")
    data["rewards"] = [r for r in data["rewards"] if r["kind"] != "position_match"]
    cfg = validate_config(data)
    rng = np.random.default_rng(0)
    fams = ["general", "color", "text"]
    jobs = [
        {"index": i * per_prompt + k, "seed": 1234 + i * per_prompt + k, "prompt_id": f"p{i:02d}",
         "prompt": f"a {fams[i % 3]} prompt number {i} with some words", "family": fams[i % 3], "metadata": {}}
        for i in range(n_prompts) for k in range(per_prompt)
    ]  # fmt: skip
    n = len(jobs)
    base = rng.normal(
        0.5, 0.1, size=(n, 5)
    )  # [N, K]: brightness, colorfulness, color_match, edge_detail, jpeg
    adapter = base + np.array([0.15, 0.02, 0.05, 0.0, -0.01]) + rng.normal(0, 0.02, size=(n, 5))
    fam = np.array([j["family"] for j in jobs])
    for arr in (base, adapter):
        arr[fam != "color", 2] = np.nan
        arr[fam != "text", 3] = np.nan
    g = torch.Generator().manual_seed(0)
    base_img = torch.rand(n, 3, 32, 32, generator=g)
    adapter_img = (base_img * 1.1).clamp(0, 1)
    # jpeg is reported on another scale than it trains on (x 10), as PickScore's raw logit scale is
    scales = ["training"] * 4 + ["raw"]
    reported_b, reported_a = base.copy(), adapter.copy()
    reported_b[:, 4] *= 10
    reported_a[:, 4] *= 10
    scores = summarize(
        cfg, ImageScores(reported_b, base), ImageScores(reported_a, adapter), scales,
        mon.compute_monitors(base_img), mon.compute_monitors(adapter_img), jobs,
    )  # fmt: skip
    summary = full_summary(scores).model_copy(update={"num_prompts": n_prompts, "num_images": n})
    return cfg, summary, jobs, base_img, adapter_img


def write_training_log(train_dir: Path) -> None:
    train_dir.mkdir(parents=True)
    lines = []
    for step in range(30):
        rec = {
            "step": step,
            "train/reward/brightness": 0.4 + 0.01 * step,
            "train/reward/colorfulness": 0.3,
            "balance/alpha/brightness": 0.6,
            "balance/alpha/colorfulness": 0.4,
            "loss/policy": 1.0 / (1 + step),
        }
        lines.append(json.dumps(rec))
    (train_dir / "train_summary.json").write_text(
        json.dumps({"steps": 30, "train_seconds": 12.5, "adapter_weights": "ema"})
    )
    (train_dir / "metrics.jsonl").write_text(
        "\n".join(lines) + '\n{"step": 30, "train/rew'
    )  # a cut last line


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    cfg, summary, jobs, base_img, adapter_img = synthetic_evaluation()
    out = tmp_path_factory.mktemp("eval")
    train_dir = out.parent / "train"
    write_training_log(train_dir)
    made = write_report(out, summary, jobs, base_img, adapter_img, grid_prompts=4, train_dir=train_dir)
    return out, made, summary


def test_statistics_of_the_synthetic_table(report):
    _, _, summary = report
    r = summary.rewards
    assert r["brightness"].delta.ci_lo > 0.1 and r["brightness"].win_rate == 1.0
    assert r["color_match"].delta.n == 8 and r["edge_detail"].delta.n == 8  # 4 prompts x 2 seeds
    assert r["jpeg"].held_out and not r["brightness"].held_out
    assert summary.composite.all.adapter > summary.composite.all.base
    color = summary.by_family["color"].rewards["color_match"]
    assert color.adapter > color.base
    assert "color_match" not in summary.by_family["general"].rewards
    # the reported scale and the training scale beside it
    assert (
        r["jpeg"].scale == "raw" and r["brightness"].scale == "training" and r["brightness"].training is None
    )
    assert r["jpeg"].adapter.mean == pytest.approx(10 * r["jpeg"].training.adapter.mean)
    flat = summary.flat_metrics()
    assert flat["delta/brightness"] == pytest.approx(r["brightness"].delta.mean)
    assert flat["adapter/jpeg"] == pytest.approx(10 * flat["training/adapter/jpeg"])
    assert set(flat) >= {
        "adapter/jpeg",
        "win_rate/edge_detail",
        "monitor/shift/dark_fraction",
        "composite/all/adapter",
    }
    json.loads(summary.to_json())  # strict JSON (no NaN)


def test_plots_exist_and_are_not_trivial(report):
    out, made, _ = report
    assert set(made) == {"rewards", "deltas", "monitors", "grid", "training"}
    for name, path in made.items():
        assert path.parent == out / "plots" and path.suffix == ".png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert path.stat().st_size > 10_000, (name, path.stat().st_size)


def test_report_html_is_self_contained(report):
    out, made, _ = report
    text = (out / "report.html").read_text()
    assert text.count("data:image/png;base64,") == len(made)
    assert not re.search(r"(src|href)=['\"]https?://", text), (
        "report.html must not load anything from the network"
    )
    assert "brightness" in text and "Gate preview" in text and "PASS" in text
    assert "Training run" in text and "train_seconds" in text
    assert "Per prompt family" in text and "general (n=8)" in text
    assert "Rewards on the training scale" in text  # jpeg reports another scale
    md = (out / "report.md").read_text()
    assert "![grid](plots/grid.png)" in md and "| brightness |" in md


def test_grid_takes_families_in_turn():
    jobs = [
        {"index": i, "prompt_id": f"p{i // 2}", "family": ["a", "a", "b", "b", "a", "a", "c", "c"][i]}
        for i in range(8)
    ]
    assert grid_indices(jobs, 3) == [0, 2, 6]
    assert grid_indices(jobs, 10) == [0, 2, 6, 4]


@pytest.mark.skipif(
    not any(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")),
    reason="no headless Chromium",
)
def test_report_html_renders_in_a_browser(report, tmp_path):
    # Offline rendering of the self-contained HTML: a screenshot much larger than a blank page means
    # the tables and the embedded plots were drawn (a blank 1200x2400 page compresses to a few KB).
    out, _, _ = report
    browser = next(b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b))
    shot = tmp_path / "report.png"
    subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--screenshot={shot}",
         "--window-size=1200,2400", (out / "report.html").as_uri()],
        capture_output=True, timeout=120, check=False,
    )  # fmt: skip
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 100_000


HOSTILE = [
    "[click](javascript:alert(1))",
    "![x](http://evil.example/p.png)",
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(1)>",
    "a | b\n| c",
    "**bold** _em_ `code` ~~gone~~ # head $x$ &amp;",
]


@pytest.mark.parametrize("text", HOSTILE)
def test_a_markdown_cell_renders_as_the_literal_text(text):
    from markdown_it import MarkdownIt

    from marble.eval.report import _md_table

    rendered = MarkdownIt("commonmark").enable("table").render(_md_table(["what", "value"], [["x", text]]))
    for tag in ("<a", "<img", "<script", "<strong", "<em", "<code", "<s>", "<h1"):
        assert tag not in rendered, (text, rendered)
    assert rendered.count("<td>") == 2  # one row of two cells: a '|' or a newline did not split it
    cell = rendered.split("<td>")[2].split("</td>")[0]
    assert html.unescape(cell) == " ".join(text.splitlines())


def test_prompts_family_names_and_gate_details_stay_text_in_the_report(tmp_path):
    # A '$' in a grid prompt used to make matplotlib's mathtext raise after all sampling was done.
    cfg, summary, jobs, base_img, adapter_img = synthetic_evaluation()
    jobs = [dict(j, prompt="a sign that says $_$ and costs $5") for j in jobs]  # '$_$' is bad mathtext
    hostile_family = "[click](javascript:alert(1))"
    by_family = {(hostile_family if k == "color" else k): v for k, v in summary.by_family.items()}
    summary = summary.model_copy(update={"by_family": by_family})
    made = write_report(tmp_path, summary, jobs, base_img, adapter_img, grid_prompts=4, train_dir=None)
    assert "grid" in made and made["grid"].stat().st_size > 10_000
    md = (tmp_path / "report.md").read_text()
    assert hostile_family not in md and r"\[click\]\(javascript:alert\(1\)\)" in md
