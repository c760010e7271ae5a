"""The pictures of docs/kubeflow.md come from the compiled pipeline: parameters, graph, gate branch."""

from __future__ import annotations

from pathlib import Path

from marble.runparams import RUN_PARAMETERS
from pipelines.views import graph_mermaid, graph_png, load_spec, parameter_table, task_graph

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "pipelines" / "marble_pipeline.yaml"
DOCS = REPO / "docs" / "kubeflow"


def test_the_parameter_table_shows_every_parameter_with_its_type():
    table = parameter_table(load_spec(GOLDEN))
    assert "| `epochs` | integer | 40 |" in table and "| `lr` | double | 0.001 |" in table
    assert "| `balancer_kind` | string | 'marble_step' |" in table
    assert "| `config` | dict |" in table
    for p in RUN_PARAMETERS:
        assert f"| `{p.name}` |" in table and f"[config: {p.field}]" in table


def test_the_graph_has_every_task_the_gate_branch_and_the_exit_handler():
    graph = task_graph(load_spec(GOLDEN))
    assert graph.tasks[0] == "validate-config" and graph.tasks[-1] == "finalize-run"
    assert set(graph.tasks) == {
        "validate-config", "fingerprint-inputs", "prepare-prompts", "cache-reward-models", "train", "evaluate",
        "gate", "promote", "record-candidate", "finalize-run",
    }  # fmt: skip
    assert graph.exit_task == "finalize-run" and graph.exit_group == "marble-run"
    # Transitively reduced: validate-config -> train is implied by validate-config -> ... -> train.
    assert ("validate-config", "train") not in graph.edges
    assert set(graph.edges) == {
        ("validate-config", "fingerprint-inputs"), ("fingerprint-inputs", "prepare-prompts"),
        ("fingerprint-inputs", "cache-reward-models"), ("prepare-prompts", "train"),
        ("cache-reward-models", "train"), ("train", "evaluate"), ("evaluate", "gate"), ("gate", "promote"),
        ("gate", "record-candidate"),
    }  # fmt: skip
    mermaid = graph_mermaid(graph)
    assert mermaid.startswith("```mermaid\nflowchart TD") and 'subgraph body["marble-run"]' in mermaid
    assert "gate-passed: gate.decision == 'champion'" in mermaid


def test_the_graph_renders_to_png(tmp_path):
    path = graph_png(task_graph(load_spec(GOLDEN)), tmp_path / "graph.png", "marble")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_docs_show_the_compiled_pipeline():
    """docs/kubeflow/{parameters,graph}.md are what `python -m pipelines.views` writes from the golden
    file: regenerate them when the pipeline changes."""
    spec = load_spec(GOLDEN)
    name = spec["pipelineInfo"]["name"]
    assert (DOCS / "parameters.md").read_text() == f"# Run parameters of `{name}`\n\n" + parameter_table(spec)
    assert (DOCS / "graph.md").read_text() == f"# Graph of `{name}`\n\n" + graph_mermaid(task_graph(spec))


def test_a_run_view_writes_the_runs_own_paths_relative_to_it(tmp_path):
    from pipelines.views import _run_relative

    run = tmp_path / "kfp" / "marble_run"
    page = f"dir `{run}/train` and, escaped by a report, | {str(run).replace('_', chr(92) + '_')}/adapter |"
    assert _run_relative(page, run) == "dir `$RUN_DIR/train` and, escaped by a report, | $RUN_DIR/adapter |"
    assert _run_relative("/elsewhere/x", run) == "/elsewhere/x"
