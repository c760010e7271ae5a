"""Mixed precision on CPU: `train.mixed_precision: bf16` trains through accelerate's autocast, with the
base model in float32 and in bfloat16 (`model.dtype`). accelerate allows one mixed-precision setting
per process, so the runs happen in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _train_helpers import train_config, write_config

from marble.configio import validate_config
from marble.data.prepare import prepare_prompts

REPO = Path(__file__).resolve().parents[1]

# One optimizer step per config: the transformer's output dtype under the trainer's autocast, the loss,
# and whether every live LoRA B matrix moved (gaussian init: B starts at 0, so only a gradient moves it).
SCRIPT = textwrap.dedent(
    """
    import json, math, sys
    from pathlib import Path

    import torch
    from marble.configio import load_config
    from marble.models import lora
    from marble.train.stepping import EpochPlan
    from marble.train.trainer import Trainer

    results = {}
    for cfg_path, out in zip(sys.argv[1::3], sys.argv[3::3]):
        cfg = load_config(cfg_path)
        tr = Trainer(cfg, Path(sys.argv[2]), Path(out))
        tr.setup()
        seen = []
        tr.model.register_forward_hook(lambda m, i, o: seen.append(str(o[0].dtype)))
        before = {k: v.clone() for k, v in lora.adapter_state_dict(tr.model, "default").items()}
        plan = EpochPlan(cfg, tr.rollout(0), 1, 0, tr.grid)
        metrics = tr.optimizer_step(plan, range(cfg.train.gradient_accumulation_steps))
        after = lora.adapter_state_dict(tr.model, "default")
        # SD3's last block discards its context stream: its add_q_proj gets no gradient
        blocks = tr.model.get_base_model().transformer_blocks
        dead = [
            f"transformer_blocks.{i}.attn.add_q_proj."
            for i, b in enumerate(blocks)
            if getattr(b, "context_pre_only", False)
        ]
        live = [k for k in before if "lora_B" in k and not any(d in k for d in dead)]
        moved = [k for k in live if not torch.equal(before[k], after[k])]
        results[Path(out).name] = {
            "mixed_precision": tr.accelerator.mixed_precision,
            "forward_dtypes": sorted(set(seen)),
            "param_dtype": str(next(p for p in tr.model.parameters() if p.requires_grad).dtype),
            "loss_finite": math.isfinite(metrics["loss/policy"]) and math.isfinite(metrics["loss/kl"]),
            "grad_norm": metrics["train/grad_norm"],
            "skipped": metrics["train/skipped_steps"],
            "moved_b": len(moved),
            "num_live_b": len(live),
        }
        tr.cleanup()
    print("RESULTS " + json.dumps(results))
    """
)


def _cpu_bf16_autocast() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    except (RuntimeError, ValueError):
        return False


@pytest.mark.slow  # over 10 s on the 2-core machine: `make test-slow`
@pytest.mark.skipif(not _cpu_bf16_autocast(), reason="this torch build has no bf16 autocast on CPU")
def test_bf16_mixed_precision_trains_on_cpu(tiny_config, tmp_path):
    prompts = tmp_path / "prompts"
    argv = []
    # the third: the balancer and KL schedule configs/sd35m-marble.yaml ships (per-reward gradients from
    # the backward's hooks, summed over the step, upcast from bf16), on the bf16 base model it runs
    for name, dtype, step_solver in (
        ("float32", "float32", False),
        ("bfloat16", "bfloat16", False),
        ("bfloat16_marble_step", "bfloat16", True),
    ):
        cfg = train_config(
            tiny_config, model={"dtype": dtype}, train={"mixed_precision": "bf16", "epochs": 1}
        )
        if step_solver:
            d = cfg.model_dump(mode="json")
            d = {**d, "balancer": {"kind": "marble_step"}, "nft": {**d["nft"], "kl_every": "step"}}
            cfg = validate_config(d, "test")
        argv += [str(write_config(cfg, tmp_path / f"{name}.yaml")), str(prompts), str(tmp_path / name)]
        if not prompts.exists():
            prepare_prompts(cfg, prompts)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(s for s in proc.stdout.splitlines() if s.startswith("RESULTS "))
    results = json.loads(line.removeprefix("RESULTS "))
    for dtype, r in results.items():
        assert r["mixed_precision"] == "bf16", (dtype, r)
        # the transformer ran under bf16 autocast (its float32 weights computed in bf16)
        assert r["forward_dtypes"] == ["torch.bfloat16"], (dtype, r)
        assert r["loss_finite"] and r["skipped"] == 0 and r["grad_norm"] > 0, (dtype, r)
        # every LoRA B matrix that can get a gradient moved (gaussian init: B starts at 0)
        assert r["moved_b"] == r["num_live_b"] > 0, (dtype, r)
    assert results["float32"]["param_dtype"] == "torch.float32"
