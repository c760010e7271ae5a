"""evaluate -> register -> fetch by alias on the tiny world, with a random non-zero LoRA adapter.

The adapter is built with the LoRA helpers (B drawn non-zero, so it changes the images) and exported
with `export_adapter`; no trainer needed. The fetched adapter is loaded into a stock diffusers
pipeline with `load_lora_weights` and must reproduce the evaluated images. Besides the tiny world's
rewards, PickScore and GenEval (tiny random models through their real loading code, GenEval on
prompts carrying its metadata) show that the evaluation reports each paper's scale.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _tiny_reward_models import save_tiny_clip, save_tiny_owlv2
from PIL import Image

from marble.configio import validate_config
from marble.errors import CheckpointError
from marble.eval.evaluate import eval_jobs, generate_images, initial_noise, latent_shape, run_evaluation
from marble.registry.register import load_registered_pipeline, register_adapter

pytestmark = pytest.mark.tiny_model  # loads the built tiny model (tests/conftest.py)

REPO = Path(__file__).resolve().parents[1]
EVAL_OVERRIDES = {
    "data": {
        "sources": [
            {"kind": "tiny_world", "num_prompts": 24, "seed": 0},
            {"kind": "geneval", "path": str(REPO / "tests" / "fixtures" / "data" / "geneval.jsonl")},
        ],
        "test_fraction": 0.25,
    },
    "eval": {"num_steps": 4, "images_per_prompt": 2, "bootstrap_samples": 200, "grid_prompts": 3},
}


def paper_scale_rewards(root: Path) -> list[dict]:
    """PickScore (reported on the raw logit scale, trained /26) and GenEval (reported as binary
    accuracy, trained on partial credit), on tiny random models saved like their hub repos."""
    clip, owl = save_tiny_clip(root / "clip"), save_tiny_owlv2(root / "owlv2")
    return [
        {
            "kind": "pickscore",
            "name": "pickscore",
            "held_out": True,
            "model": str(clip),
            "processor": str(clip),
        },
        {"kind": "geneval", "name": "geneval", "held_out": True, "model": str(owl), "clip_model": str(clip)},
    ]


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def random_adapter(cfg, out_dir: Path, seed: int = 0) -> Path:
    """A LoRA adapter with non-zero B (a zero B, PEFT's init, would be the identity), exported."""
    from marble.models.loading import load_pipeline
    from marble.models.lora import add_lora_adapters, export_adapter

    pipe = load_pipeline(cfg.model)
    model = add_lora_adapters(pipe.transformer, cfg.lora)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name and ".default." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    export_adapter(model, out_dir, "default")
    return out_dir


def saved_images(folder: Path, n: int) -> np.ndarray:
    return np.stack([np.asarray(Image.open(folder / f"{i:04d}.png")) for i in range(n)]).astype(
        int
    )  # [N,H,W,3]


@pytest.fixture(scope="module")
def world(tiny_config, tmp_path_factory):
    from marble.data.prepare import prepare_prompts

    root = tmp_path_factory.mktemp("e2e")
    data = _merge(tiny_config.model_dump(mode="json"), EVAL_OVERRIDES)
    data["rewards"] += paper_scale_rewards(root)
    cfg = validate_config(data, "test")
    prepare_prompts(cfg, root / "prompts")
    adapter = random_adapter(cfg, root / "adapter")
    train_dir = root / "train"
    train_dir.mkdir()
    (train_dir / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "train/reward/brightness": 0.4 + 0.01 * s}) + "\n" for s in range(10))
    )
    metrics = run_evaluation(cfg, root / "prompts", adapter, root / "eval", train_dir=train_dir)
    return cfg, root, adapter, metrics


def test_evaluation_outputs(world):
    cfg, root, adapter, metrics_path = world
    ev = root / "eval"
    assert metrics_path == ev / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    summary = json.loads((ev / "eval.json").read_text())
    n = summary["num_images"]
    assert n == 2 * summary["num_prompts"] and summary["num_prompts"] == 7
    for r in cfg.rewards:  # every reward, trained and held out, base and adapter
        assert {f"base/{r.name}", f"adapter/{r.name}", f"delta/{r.name}", f"win_rate/{r.name}"} <= set(
            metrics
        )
    assert summary["rewards"]["jpeg"]["held_out"]
    # specialists only score their own family (2 color + 2 text + 1 GenEval prompt, 2 seeds each)
    assert (
        summary["rewards"]["color_match"]["delta"]["n"] == 4
        and summary["rewards"]["geneval"]["delta"]["n"] == 2
        and summary["rewards"]["brightness"]["delta"]["n"] == n
    )
    assert summary["adapter_effect"]["max_abs_pixel_diff"] > 0.01, "the adapter must change the images"
    lin = summary["lineage"]
    from marble.registry.base import adapter_sha256

    assert lin["adapter_sha256"] == adapter_sha256(adapter) and lin["config_hash"] == cfg.config_hash()
    assert lin["data_hash"] == json.loads((root / "prompts" / "manifest.json").read_text())["data_hash"]
    assert summary["sampling"]["solver"] == "FlowMatchEulerDiscreteScheduler"
    assert summary["sampling"]["num_steps"] == 4 and summary["sampling"]["seeds"] == list(
        range(1234, 1234 + n)
    )
    assert (
        len(list((ev / "images" / "base").glob("*.png")))
        == n
        == len(list((ev / "images" / "adapter").glob("*.png")))
    )
    for name in ("rewards", "deltas", "monitors", "grid", "training"):
        assert (ev / "plots" / f"{name}.png").stat().st_size > 5_000, name
    html = (ev / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5 and "http://" not in html and "https://" not in html
    assert not [p for p in root.iterdir() if p.name.startswith(".eval")], "temporary directories left behind"


def test_evaluation_reports_each_papers_scale_with_the_training_scale_beside(world):
    from marble.eval.contract import EvalSummary
    from marble.rewards.registry import build_rewards, score_all

    cfg, root, _, _ = world
    ev = root / "eval"
    summary = EvalSummary.load(ev / "eval.json")
    metrics = json.loads((ev / "metrics.json").read_text())
    pick, gen, bright = (summary.rewards[k] for k in ("pickscore", "geneval", "brightness"))
    assert (pick.scale, gen.scale, bright.scale) == ("raw", "binary", "training") and bright.training is None
    # PickScore: the paper's raw logit scale, the training scale (/26) beside it
    for model in ("base", "adapter"):
        paper, train = getattr(pick, model).mean, getattr(pick.training, model).mean
        assert paper == pytest.approx(26.0 * train, rel=1e-9) and abs(paper) > 1e-3
    assert metrics["adapter/pickscore"] == pytest.approx(26.0 * metrics["training/adapter/pickscore"])
    # GenEval: binary accuracy per image (mean of 0/1), partial credit on the training scale
    rows = [json.loads(line) for line in (ev / "samples.jsonl").read_text().splitlines()]
    binary = [r[m]["geneval"] for r in rows for m in ("base", "adapter") if r[m]["geneval"] is not None]
    assert len(binary) == 4 and set(binary) <= {0.0, 1.0}
    assert gen.adapter.mean == pytest.approx(
        np.mean([r["adapter"]["geneval"] for r in rows if r["family"] == "geneval"])
    )
    assert gen.training is not None and 0.0 <= gen.training.adapter.mean <= 1.0
    # independently: the saved adapter images re-scored in the paper's mode give the reported means
    rewards = build_rewards([s for s in cfg.rewards if s.name in ("pickscore", "geneval")])
    n = summary.num_images
    images = torch.from_numpy(saved_images(ev / "images" / "adapter", n)).permute(0, 3, 1, 2).float() / 255
    jobs = eval_jobs(cfg, root / "prompts")
    prompts, meta = [j["prompt"] for j in jobs], [j["metadata"] for j in jobs]
    paper = score_all(rewards, images, prompts, meta, mode="eval").numpy()  # [N, 2]
    assert np.nanmean(paper[:, 0]) == pytest.approx(pick.adapter.mean, rel=1e-6)
    assert np.nanmean(paper[:, 1]) == pytest.approx(gen.adapter.mean)


@pytest.mark.slow  # over 10 s on the 2-core machine: `make test-slow`
def test_register_then_fetch_by_alias_reproduces_the_evaluated_images(world, monkeypatch):
    cfg, root, adapter, _ = world
    monkeypatch.setenv("MARBLE_RUN_ID", "e2e")
    rec = register_adapter(cfg, adapter, root / "eval", root / "registry")
    again = register_adapter(cfg, adapter, root / "eval", root / "registry")
    assert again["version"] == rec["version"] and not again["created"]
    alias = "champion" if rec["gate_passed"] else "candidate"
    assert rec[alias] == rec["version"]

    pipe = load_registered_pipeline(cfg, root / "registry", alias, dst=root / "fetched")
    pipe.set_progress_bar_config(disable=True)
    jobs = eval_jobs(cfg, root / "prompts")
    noise = initial_noise([j["seed"] for j in jobs], latent_shape(pipe, cfg.eval_resolution))
    kwargs = dict(num_steps=cfg.eval.num_steps, guidance_scale=cfg.eval.guidance_scale, resolution=cfg.eval_resolution,
                  max_sequence_length=cfg.model.max_sequence_length, batch_size=cfg.sampling.batch_size)  # fmt: skip
    mine = generate_images(pipe, [j["prompt"] for j in jobs], noise, **kwargs)
    mine = mine.permute(0, 2, 3, 1).numpy().astype(int)  # [N, H, W, 3] from uint8
    evaluated = saved_images(root / "eval" / "images" / "adapter", len(jobs))
    assert np.abs(mine - evaluated).max() <= 1  # same images (up to 8-bit rounding)
    base = saved_images(root / "eval" / "images" / "base", len(jobs))
    assert np.abs(mine - base).max() > 2  # and not the base model's


def test_a_failed_evaluation_leaves_the_previous_output(world, monkeypatch):
    cfg, root, adapter, _ = world
    before = (root / "eval" / "metrics.json").read_text()
    with pytest.raises(CheckpointError, match="pytorch_lora_weights.safetensors"):
        run_evaluation(cfg, root / "prompts", root / "no-adapter", root / "eval")

    def broken_report(*args, **kwargs):
        raise RuntimeError("disk full")

    # reuse the evaluated images instead of sampling again: the failure under test is in the writing
    n = json.loads((root / "eval" / "eval.json").read_text())["num_images"]
    images = {
        m: torch.from_numpy(saved_images(root / "eval" / "images" / m, n)).to(torch.uint8).permute(0, 3, 1, 2)
        for m in ("base", "adapter")
    }
    sampling = json.loads((root / "eval" / "eval.json").read_text())["sampling"]
    info = {k: v for k, v in sampling.items() if k != "images_per_prompt"}
    monkeypatch.setattr(
        "marble.eval.evaluate.sample_both", lambda *a, **k: (images["base"], images["adapter"], info)
    )
    monkeypatch.setattr("marble.eval.report.write_report", broken_report)
    with pytest.raises(RuntimeError, match="disk full"):
        run_evaluation(cfg, root / "prompts", adapter, root / "eval")
    assert (root / "eval" / "metrics.json").read_text() == before
    assert not [p for p in root.iterdir() if p.name.startswith(".eval")]


def test_cli_register_twice_one_version(world, tmp_path, monkeypatch, capsys):
    import yaml

    from marble.cli import main

    cfg, root, adapter, _ = world
    monkeypatch.setenv("MARBLE_RUN_ID", "cli")
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    args = ["register", "-c", str(cfg_file), "--adapter", str(adapter), "--eval-dir", str(root / "eval")]
    store = root / "registry"  # shared with the fetch test: a second MLflow store costs seconds to migrate
    assert main([*args, "--out", str(store)]) == 0
    first = json.loads((store / "registration.json").read_text())
    assert main([*args, "--out", str(store)]) == 0
    second = json.loads((store / "registration.json").read_text())
    assert first["created"] and not second["created"] and first["version"] == second["version"]
    capsys.readouterr()
    # a user error exits 2 with one line, no traceback
    assert main([*args[:-2], "--eval-dir", str(tmp_path / "nowhere"), "--out", str(store)]) == 2
    assert "run `marble evaluate`" in capsys.readouterr().err
