"""What a Kubeflow user sees, rendered from the compiled pipeline and a local run's artifacts.

- `parameter_table(spec)`: the run form (every pipeline parameter: type, default, description);
- `task_graph(spec)`: the DAG of the compiled IR with its gate branch and exit handler, as a Mermaid
  flowchart (`graph_mermaid`) and as a PNG (`graph_png`);
- `run_view(run_dir)`: what the run view shows per task of a local run: its Metrics (from
  `executor_output.json`: a Metrics artifact writes no file locally), Markdown artifacts inline, HTML
  and other artifacts by path.

`python -m pipelines.views --run-dir outputs/kfp/marble-<timestamp> --out docs/kubeflow` writes
`parameters.md`, `graph.md`, `graph.png`, and per run `run-view-<gate decision>.md` with its training
curves as `training-curves-<gate decision>.png` (the pictures in docs/kubeflow.md); `--run-dir` may be
given once per branch.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

IR_TYPE_NAMES = {
    "NUMBER_INTEGER": "integer",
    "NUMBER_DOUBLE": "double",
    "STRING": "string",
    "BOOLEAN": "boolean",
    "STRUCT": "dict",
    "LIST": "list",
}
EXIT_STRATEGY = "ALL_UPSTREAM_TASKS_COMPLETED"


def load_spec(path: str | Path) -> dict[str, Any]:
    """The pipeline spec (first YAML document) of a compiled pipeline file."""
    return next(yaml.safe_load_all(Path(path).read_text(encoding="utf-8")))


# ------------------------------------------------------------------------------------- parameters
def _shown_default(value: Any, kind: str) -> str:
    if kind == "NUMBER_INTEGER" and isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, dict):
        return f"{{…}} ({len(value)} sections)"
    return repr(value) if isinstance(value, str) else str(value)


def parameter_table(spec: dict[str, Any]) -> str:
    """The pipeline's run parameters as a Markdown table, in the compiled order."""
    rows = ["| parameter | type | default | description |", "|---|---|---|---|"]
    for name, p in spec["root"]["inputDefinitions"]["parameters"].items():
        kind = p["parameterType"]
        desc = str(p.get("description", "")).replace("|", "\\|").replace("\n", " ")
        default = _shown_default(p.get("defaultValue"), kind).replace("|", "\\|")
        rows.append(f"| `{name}` | {IR_TYPE_NAMES.get(kind, kind)} | {default} | {desc} |")
    return "\n".join(rows) + "\n"


# ------------------------------------------------------------------------------------------ graph
@dataclass
class TaskGraph:
    """Leaf tasks of the IR (nested DAGs flattened), their edges with branch labels, and the exit task."""

    tasks: list[str] = field(default_factory=list)
    edges: dict[tuple[str, str], Any] = field(default_factory=dict)  # (from, to) -> condition label
    exit_task: str = ""
    exit_group: str = ""


class _Walker:
    """Flattens the IR's nested DAGs (exit handler, condition branches) into leaf tasks and edges."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.components = spec["components"]
        self.graph = TaskGraph()

    def _component(self, task: dict[str, Any]) -> dict[str, Any]:
        return self.components[task["componentRef"]["name"]]

    def leaves(self, task: dict[str, Any]) -> dict[str, list[tuple[str, str]]]:
        """Each leaf inside `task` -> the (condition, branch name) pairs on the way to it."""
        comp = self._component(task)
        if "dag" not in comp:
            return {task["taskInfo"]["name"]: []}
        out: dict[str, list[tuple[str, str]]] = {}
        for sub in comp["dag"]["tasks"].values():
            cond = sub.get("triggerPolicy", {}).get("condition")
            for leaf, conds in self.leaves(sub).items():
                out[leaf] = ([(cond, sub["taskInfo"]["name"])] if cond else []) + conds
        return out

    def walk(self, dag: dict[str, Any]) -> None:
        tasks = dag["tasks"]
        for task in tasks.values():
            if "dag" in self._component(task):
                self.walk(self._component(task)["dag"])
            else:
                self.graph.tasks.append(task["taskInfo"]["name"])
            if task.get("triggerPolicy", {}).get("strategy") == EXIT_STRATEGY:
                self.graph.exit_task = task["taskInfo"]["name"]
                self.graph.exit_group = tasks[task["dependentTasks"][0]]["taskInfo"]["name"]
                continue
            for dep in task.get("dependentTasks", []):
                for target, conds in self.leaves(task).items():
                    for source in self.leaves(tasks[dep]):
                        self.graph.edges[(source, target)] = conds  # labelled once all names are known


def _condition_label(condition: str, branch: str, tasks: list[str]) -> str:
    """`inputs.parameter_values['pipelinechannel--gate-decision'] == 'champion'` ->
    `gate-passed: gate.decision == 'champion'`."""

    def channel(m: re.Match) -> str:
        ref = m.group(1)
        task = next((t for t in sorted(tasks, key=len, reverse=True) if ref.startswith(t + "-")), None)
        return f"{task}.{ref[len(task) + 1 :]}" if task else ref

    text = re.sub(r"inputs\.parameter_values\['pipelinechannel--([^']+)'\]", channel, condition.strip())
    text = re.sub(r"^!\((.*)\)$", r"not (\1)", text)
    return f"{branch}: {text}"


def task_graph(spec: dict[str, Any]) -> TaskGraph:
    """The leaf tasks and their dependencies, transitively reduced (an edge implied by a longer path is
    dropped, as the KFP graph draws it), each branch edge labelled with its condition."""
    walker = _Walker(spec)
    walker.walk(spec["root"]["dag"])
    graph = walker.graph
    labelled = {
        edge: "; ".join(_condition_label(c, b, graph.tasks) for c, b in conds)
        for edge, conds in graph.edges.items()
    }
    graph.edges = {edge: label for edge, label in labelled.items() if not _implied(edge, labelled)}
    graph.tasks = [t for row in _layers(graph) for t in row] + ([graph.exit_task] if graph.exit_task else [])
    return graph


def _implied(edge: tuple[str, str], edges: dict[tuple[str, str], Any]) -> bool:
    """True when `edge` (a -> b) is implied by a path a -> c -> ... -> b of at least two edges."""
    a, b = edge
    frontier = [t for (s, t) in edges if s == a and t != b]
    seen = set(frontier)
    while frontier:
        node = frontier.pop()
        if node == b:
            return True
        for s, t in edges:
            if s == node and t not in seen:
                seen.add(t)
                frontier.append(t)
    return False


def graph_mermaid(graph: TaskGraph) -> str:
    """A Mermaid flowchart of the graph (GitHub and most Markdown viewers draw it)."""
    ids = {name: f"t{i}" for i, name in enumerate(graph.tasks)}
    lines = ["```mermaid", "flowchart TD"]
    body = [t for t in graph.tasks if t != graph.exit_task]
    if graph.exit_task:
        lines.append(f'  subgraph body["{graph.exit_group}"]')
    lines += [f'    {ids[t]}["{t}"]' for t in body]
    for (a, b), label in graph.edges.items():
        lines.append(f'    {ids[a]} -->|"{label}"| {ids[b]}' if label else f"    {ids[a]} --> {ids[b]}")
    if graph.exit_task:
        lines += ["  end", f'  {ids[graph.exit_task]}["{graph.exit_task}"]']
        lines.append(f'  body -.->|"exit handler: runs last, success or failure"| {ids[graph.exit_task]}')
    lines.append("```")
    return "\n".join(lines) + "\n"


def _layers(graph: TaskGraph) -> list[list[str]]:
    """Body tasks grouped by their longest distance from a source (the graph's rows, top to bottom)."""
    body = [t for t in graph.tasks if t != graph.exit_task]
    depth = dict.fromkeys(body, 0)
    for _ in body:  # longest path by relaxation; the graph is a DAG of a handful of tasks
        for a, b in graph.edges:
            depth[b] = max(depth[b], depth[a] + 1)
    rows = [sorted(t for t in body if depth[t] == d) for d in range(max(depth.values(), default=-1) + 1)]
    return [row for row in rows if row]


def graph_png(graph: TaskGraph, path: str | Path, title: str = "") -> Path:
    """Draw the graph: one row per dependency level, branch edges labelled with their condition, the
    exit handler's group dashed with its exit task below it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch, Rectangle

    rows, unit, step = _layers(graph), 3.2, 1.3
    span = max(len(r) for r in rows) * unit
    pos = {
        t: ((i + 0.5) * span / len(row), -d * step) for d, row in enumerate(rows) for i, t in enumerate(row)
    }
    bottom = -(len(rows) - 1) * step - 0.5
    if graph.exit_task:
        pos[graph.exit_task] = (span / 2, bottom - 0.9)
    fig, ax = plt.subplots(figsize=(span * 0.95 + 0.5, 1.3 * (len(rows) + 2)))
    for (a, b), label in graph.edges.items():
        (x0, y0), (x1, y1) = pos[a], pos[b]
        ax.annotate(
            "", xy=(x1, y1 + 0.2), xytext=(x0, y0 - 0.2), arrowprops={"arrowstyle": "->", "color": "#555"}
        )
        if label:
            ax.text(x0 + 0.8 * (x1 - x0), y0 + 0.5 * (y1 - y0), label.replace(": ", ":\n", 1), fontsize=7,
                    ha="center", va="center", color="#7a3b00", bbox={"fc": "#fff4e0", "ec": "#e0b070", "lw": 0.6})  # fmt: skip
    for task, (x, y) in pos.items():
        ax.add_patch(FancyBboxPatch((x - 1.2, y - 0.18), 2.4, 0.36, boxstyle="round,pad=0.02", fc="#e8f0fb",
                                    ec="#3b6fb6", lw=1.0))  # fmt: skip
        ax.text(x, y, task, ha="center", va="center", fontsize=9)
    if graph.exit_task:
        top = 0.5
        ax.add_patch(Rectangle((0.05, bottom), span - 0.1, top - bottom, fill=False, ls="--", ec="#888"))
        ax.text(0.15, top - 0.05, f"exit handler '{graph.exit_group}'", fontsize=8, color="#666",
                va="top")  # fmt: skip
        x, y = pos[graph.exit_task]
        ax.annotate(
            "",
            xy=(x, y + 0.2),
            xytext=(x, bottom),
            arrowprops={"arrowstyle": "->", "ls": "--", "color": "#888"},
        )
        ax.text(
            x + 0.15, (y + bottom) / 2, "runs last, success or failure", fontsize=7, color="#666", va="center"
        )
    ax.set_xlim(-0.1, span + 0.1)
    ax.set_ylim(bottom - 1.3, 0.8)
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------- run view
def output_types(spec: dict[str, Any]) -> dict[str, dict[str, str]]:
    """task -> {output artifact name -> artifact type} for every leaf task of the compiled IR (a local
    task's executor output names its artifacts but not their types)."""
    out: dict[str, dict[str, str]] = {}

    def walk(dag: dict[str, Any]) -> None:
        for task in dag["tasks"].values():
            comp = spec["components"][task["componentRef"]["name"]]
            if "dag" in comp:
                walk(comp["dag"])
                continue
            arts = comp.get("outputDefinitions", {}).get("artifacts", {})
            out[task["taskInfo"]["name"]] = {n: a["artifactType"]["schemaTitle"] for n, a in arts.items()}

    walk(spec["root"]["dag"])
    return out


def _metrics_table(metadata: dict[str, Any]) -> str:
    rows = ["| metric | value |", "|---|---|"]
    rows += [
        f"| `{k}` | {v:.6g} |" if isinstance(v, float) else f"| `{k}` | {v} |"
        for k, v in sorted(metadata.items())
    ]
    return "\n".join(rows)


def run_view(run_dir: str | Path, spec: dict[str, Any]) -> str:
    """What the run view shows per task of a local run of `spec`, as Markdown, in graph order."""
    run_dir = Path(run_dir)
    types = output_types(spec)
    out = [f"# Run view of `{run_dir.name}` (local run)", ""]
    for task in task_graph(spec).tasks:
        result = run_dir / task / "executor_output.json"
        if not result.is_file():
            out += [f"## {task}", "", "Not run (a branch not taken, or an upstream task failed).", ""]
            continue
        data = json.loads(result.read_text(encoding="utf-8"))
        out += [f"## {task}", ""]
        params = data.get("parameterValues", {})
        if params:
            shown = {k: (v if not isinstance(v, dict) else "{…}") for k, v in params.items()}
            out += [f"Output parameters: `{json.dumps(shown)}`", ""]
        for name, group in data.get("artifacts", {}).items():
            (art,) = group["artifacts"]
            kind = types.get(task, {}).get(name, "system.Artifact")
            out += _artifact_view(name, kind, Path(art.get("uri", "")), art.get("metadata", {}), run_dir)
    return _run_relative("\n".join(out) + "\n", run_dir)


def _run_relative(page: str, run_dir: Path) -> str:
    """The run's own paths written `$RUN_DIR/...` (also where a report escaped them for Markdown), so a
    page reads the same wherever the run was made."""
    root = str(run_dir.resolve())
    return page.replace(root, "$RUN_DIR").replace(root.replace("_", "\\_"), "$RUN_DIR")


def _artifact_view(name: str, kind: str, path: Path, metadata: dict[str, Any], run_dir: Path) -> list[str]:
    where = path.relative_to(run_dir) if path.is_relative_to(run_dir) else path
    if kind == "system.Metrics":
        return [f"**{name}** (Metrics)", "", _metrics_table(metadata), ""]
    if kind == "system.Markdown" and path.is_file():
        body = re.sub(r"(?m)^# ", "#### ", path.read_text(encoding="utf-8").strip())
        return [f"**{name}** (Markdown, as the run view renders it):", "", body, ""]
    return [f"**{name}** ({kind}): `{where}`", ""]


# ------------------------------------------------------------------------------------------- main
def run_decision(run_dir: str | Path) -> str:
    """The gate's decision in a local run ('champion' or 'candidate'), or 'unfinished' without one."""
    result = Path(run_dir) / "gate" / "executor_output.json"
    if not result.is_file():
        return "unfinished"
    return (
        json.loads(result.read_text(encoding="utf-8"))
        .get("parameterValues", {})
        .get("decision", "unfinished")
    )


def write_views(spec_path: Path, out_dir: Path, run_dirs: list[Path] = ()) -> list[Path]:
    """parameters.md, graph.md, graph.png (from the compiled spec) and, per local run,
    run-view-<decision>.md and its training curves."""
    from marble.io import atomic_write_text

    spec = load_spec(spec_path)
    graph = task_graph(spec)
    name = spec["pipelineInfo"]["name"]
    written = [
        atomic_write_text(
            out_dir / "parameters.md", f"# Run parameters of `{name}`\n\n" + parameter_table(spec)
        ),
        atomic_write_text(out_dir / "graph.md", f"# Graph of `{name}`\n\n" + graph_mermaid(graph)),
        graph_png(graph, out_dir / "graph.png", f"pipeline '{name}' (compiled IR)"),
    ]
    for run_dir in run_dirs:
        decision = run_decision(run_dir)
        written.append(atomic_write_text(out_dir / f"run-view-{decision}.md", run_view(run_dir, spec)))
        curves = run_dir / "train" / "training_curves"
        if curves.is_file():
            page = curves.read_text(encoding="utf-8")
            written += _embedded_pngs(page, out_dir / f"training-curves-{decision}.png")
    return written


def _embedded_pngs(page: str, path: Path) -> list[Path]:
    """The first PNG embedded as a data URI in an HTML page, written to `path` ([] if none)."""
    import base64

    m = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    if not m:
        return []
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(m.group(1)))
    return [path]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.views", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--spec", default="pipelines/marble_pipeline.yaml", help="compiled pipeline (IR YAML)"
    )
    parser.add_argument(
        "--run-dir",
        action="append",
        default=[],
        help="a local run's directory, e.g. outputs/kfp/marble-<timestamp> (repeatable: one per branch)",
    )
    parser.add_argument("--out", default="docs/kubeflow", help="output directory")
    args = parser.parse_args(argv)
    for path in write_views(Path(args.spec), Path(args.out), [Path(d) for d in args.run_dir]):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
