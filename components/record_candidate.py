"""Component of the gate's failing branch: register the adapter as the `candidate` (never `champion`).

Runs only when the gate task decided 'candidate'; the registered version keeps every failed check in
its tags, so the registry says why it was not promoted.
"""

from kfp.dsl import Artifact, Input, Markdown, Metrics, Model, Output

from components._factory import make_component


def record_candidate(
    config: dict,
    work_root: str,
    adapter: Input[Model],
    evaluation: Input[Artifact],
    registration: Output[Artifact],
    registration_report: Output[Markdown],
    metrics: Output[Metrics],
):
    """`registration/registration.json` holds the record; the report shows decision and registry link.
    An embedded registry store lives in `<work_root>/registry` (the cache PVC), so `champion` carries
    over between runs; with an empty `work_root` (the local run) it lives in the artifact."""
    from components._io import register_for_branch

    register_for_branch(
        config, work_root, adapter, evaluation, "candidate", registration, registration_report, metrics
    )


def build(containerized: bool = False):
    return make_component(record_candidate, role="cpu", containerized=containerized)


component = build()
