"""Fingerprints of the prompt data and the models (`marble.cluster.fingerprint`), never cached.

prepare-prompts and cache-reward-models take them as inputs, so KFP's cache reuses their outputs only
while the prompt files (or their DVC revision) and the models' resolved revisions are unchanged.
"""

from typing import NamedTuple

from components._factory import make_component


def fingerprint_inputs(config: dict) -> NamedTuple("Outputs", [("data", str), ("models", str)]):
    from collections import namedtuple

    from marble.cluster.fingerprint import data_fingerprint, models_fingerprint
    from marble.config import MarbleConfig

    cfg = MarbleConfig.model_validate(config)
    return namedtuple("Outputs", ["data", "models"])(data_fingerprint(cfg), models_fingerprint(cfg))


def build(containerized: bool = False):
    return make_component(fingerprint_inputs, role="cpu", containerized=containerized)


component = build()
