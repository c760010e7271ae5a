"""Component of the gate's passing branch: register the adapter and make it the `champion`.

Runs only when the gate task decided 'champion'. Registration decides again under the registry's lock
(`marble.stages.register_adapter`): if another run moved the champion in between, the adapter is
recorded as the registry then decides and the report says why.
"""

from kfp.dsl import Artifact, Input, Markdown, Metrics, Model, Output

from components._factory import make_component


def promote(
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
        config, work_root, adapter, evaluation, "champion", registration, registration_report, metrics
    )


def build(containerized: bool = False):
    return make_component(promote, role="cpu", containerized=containerized)


component = build()
