"""`eval_jobs` on either split of the prepared prompts, and its refusal of anything else."""

from __future__ import annotations

import json

import pytest

from marble.data.prepare import prepare_prompts
from marble.eval.evaluate import eval_jobs


def test_eval_jobs_reads_the_split_asked_for(tiny_config, tmp_path):
    prepare_prompts(tiny_config, tmp_path)
    ids = {
        split: [json.loads(line)["id"] for line in (tmp_path / f"{split}.jsonl").read_text().splitlines()]
        for split in ("train", "test")
    }
    per = tiny_config.eval.images_per_prompt
    for split in ("test", "train"):
        jobs = eval_jobs(tiny_config, tmp_path, split=split)
        assert [j["prompt_id"] for j in jobs[::per]] == ids[split][: len(jobs) // per]
        assert [j["seed"] for j in jobs] == [tiny_config.eval.seed + i for i in range(len(jobs))]
    assert eval_jobs(tiny_config, tmp_path) == eval_jobs(tiny_config, tmp_path, split="test")
    with pytest.raises(ValueError, match="split must be 'test' or 'train', got 'val'"):
        eval_jobs(tiny_config, tmp_path, split="val")
