"""Where a registered version came from, read back from MLflow alone.

A version's tags lead to the pipeline's parent run; the parent run holds the stage runs (nested runs),
the dataset inputs with their validation report, the resolved config, the git commit, the library
versions and the Prefect flow run. `lineage` gathers that chain into a small tree, `render_tree` prints
it like `tree`, `lineage_graph` draws it as a PNG, and `log_lineage` attaches both to the parent run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from tunegate.errors import ConfigError

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)

# The final.* metrics worth a glance, first found first shown; others follow alphabetically.
KEY_METRICS = (
    "train_loss",
    "eval_loss",
    "pair_accuracy",
    "length_bias",
    "reward_first",
    "reward_last",
    "kl_last",
    "weights_delta",
)
METRICS_PER_STAGE = 4
# What MLflow's stores answer for a model, alias, version or run they do not have.
NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")


@dataclass
class Node:
    """One box of the lineage: a label, `key: value` details, and the nodes it leads to."""

    label: str
    kind: str  # model | run | group | stage | dataset | base-model
    details: dict[str, str] = field(default_factory=dict)
    children: list[Node] = field(default_factory=list)


def resolve_version(client: MlflowClient, ref: str) -> ModelVersion:
    """The registered model version that `ref` names: `NAME@ALIAS` or `NAME/VERSION`, optionally
    prefixed with `models:/`.

    Raises:
        ConfigError: the reference is malformed, or names a model, alias or version the store does
            not have (the message lists what it does have), or a version the pipeline did not register.
    """
    from mlflow.exceptions import MlflowException

    source = f"model reference {ref!r}"
    name, alias, version = _parse_ref(ref)
    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code not in NOT_FOUND:
            raise
        known = sorted(m.name for m in client.search_registered_models(max_results=50))
        listed = ", ".join(known) if known else "none"
        raise ConfigError(
            [
                f"no registered model {name!r} in {client.tracking_uri}; registered models: {listed}. "
                "Check the name, or point registry.tracking_uri at the store that has it"
            ],
            source,
        ) from None
    try:
        mv = (
            client.get_model_version_by_alias(name, alias)
            if alias is not None
            else client.get_model_version(name, version)
        )
    except MlflowException as exc:
        if exc.error_code not in NOT_FOUND:
            raise
        if alias is not None:
            aliases = ", ".join(f"@{a} -> {v}" for a, v in sorted(model.aliases.items())) or "none"
            problem = (
                f"{name} has no alias {alias!r} (its aliases: {aliases}); use one of those or NAME/VERSION"
            )
        else:
            found = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
            problem = (
                f"{name} has no version {version} (its versions: {', '.join(map(str, found)) or 'none'})"
            )
        raise ConfigError([problem], source) from None
    if not mv.tags.get("tunegate.parent_run_id"):
        raise ConfigError(
            [
                f"{name} version {mv.version} has no tunegate.parent_run_id tag: it was not registered by "
                "the tunegate pipeline, so MLflow holds no lineage for it; pick a version that `tunegate run` "
                "registered"
            ],
            source,
        )
    return mv


def lineage(tracking_uri: str, ref: str) -> Node:
    """The lineage tree of the version `ref` names, built from the MLflow store at `tracking_uri`.

    Returns:
        The model version node → the pipeline's parent run → its stages (pipeline order), its
        dataset inputs (with their validation summaries) and the base model.

    Raises:
        ConfigError: the store is missing, the reference does not resolve (see `resolve_version`),
            or the parent run the version names is not in the store.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    _check_store(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    mv = resolve_version(client, ref)
    parent_id = mv.tags["tunegate.parent_run_id"]
    try:
        parent = client.get_run(parent_id)
    except MlflowException as exc:
        if exc.error_code not in NOT_FOUND:
            raise
        raise ConfigError(
            [
                f"{mv.name} version {mv.version} names parent run {parent_id}, which is not in "
                f"{tracking_uri} (deleted, or registered from another tracking store)"
            ],
            f"model reference {ref!r}",
        ) from None
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = _ArtifactReader(client, parent_id, Path(tmp))
        run_node = _run_node(parent, artifacts)
        run_node.children = [
            _stages_node(client, parent),
            _datasets_node(parent, artifacts),
            _base_model_node(parent, mv),
        ]
    return Node(
        label=f"model {mv.name} version {mv.version}",
        kind="model",
        details={
            "aliases": ", ".join(f"@{a}" for a in sorted(mv.aliases)) or "none",
            "model uri": mv.source,
            "register run": mv.run_id or "unknown",
            "candidate digest": mv.tags.get("tunegate.candidate_digest", "unknown"),
            "registered": _when(mv.creation_timestamp),
        },
        children=[run_node],
    )


def render_tree(node: Node) -> str:
    """The tree as text, with `tree`'s box-drawing branches; details sit under their node's label."""
    lines = [node.label, *_detail_lines(node, "")]
    _render_children(node, "", lines)
    return "\n".join(lines)


def lineage_graph(node: Node, path: str | Path) -> Path:
    """Draw the tree as a left-to-right graph (one column per level, one box per node) into a PNG."""
    from matplotlib.figure import Figure
    from matplotlib.patches import FancyBboxPatch

    placed: list[tuple[Node, int, float]] = []  # node, depth, y (inches from the top)
    _place(node, 0, [0], placed)
    rows = max(1, sum(1 for n, _, _ in placed if not n.children))
    depth = max(d for _, d, _ in placed) + 1
    col, box_w, row_h, box_h = 5.6, 5.0, 1.0, 0.86
    width, height = depth * col + 0.4, rows * row_h + 0.4
    fig = Figure(figsize=(width, height), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.axis("off")
    where = {id(n): (0.2 + d * col, 0.2 + y * row_h + (row_h - box_h) / 2) for n, d, y in placed}
    for n, _, _ in placed:
        x, y = where[id(n)]
        for child in n.children:
            cx, cy = where[id(child)]
            ax.annotate(
                "",
                xy=(cx, cy + box_h / 2),
                xytext=(x + box_w, y + box_h / 2),
                arrowprops={"arrowstyle": "-|>", "color": "#555555", "lw": 0.8, "shrinkA": 0, "shrinkB": 0},
            )
        ax.add_patch(
            FancyBboxPatch(
                (x, y),
                box_w,
                box_h,
                boxstyle="round,pad=0,rounding_size=0.08",
                facecolor=COLOURS.get(n.kind, "#eeeeee"),
                edgecolor="#444444",
                lw=0.8,
            )
        )
        shown = [k for k in GRAPH_DETAILS.get(n.kind, ()) if k in n.details]
        text = [_clip(n.label, 66), *(_clip(f"{k}: {n.details[k]}", 76) for k in shown)]
        ax.text(x + 0.08, y + 0.1, text[0], fontsize=8, fontweight="bold", family="monospace", va="top")
        if len(text) > 1:
            ax.text(x + 0.08, y + 0.3, "\n".join(text[1:]), fontsize=7, family="monospace", va="top")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


# The few details each kind of box shows in the graph (the text tree shows them all).
GRAPH_DETAILS = {
    "model": ("aliases", "model uri", "candidate digest"),
    "run": ("prefect flow run", "git commit", "config digest"),
    "stage": ("run", "metrics"),
    "dataset": ("digest", "rows", "validation"),
    "base-model": ("digest",),
}
COLOURS = {
    "model": "#f6d77a",
    "run": "#a9cbed",
    "group": "#e4e4e4",
    "stage": "#b8e0b0",
    "dataset": "#d7c8ef",
    "base-model": "#f2b8a2",
}


def log_lineage(tracking_uri: str, registered_ref: str, parent_run_id: str) -> Node:
    """Build the lineage of `registered_ref` and log it to the parent run as `lineage/lineage.txt` and
    `lineage/lineage.png`. Works whether or not the parent run is the active run."""
    from mlflow import MlflowClient

    node = lineage(tracking_uri, registered_ref)
    client = MlflowClient(tracking_uri=tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "lineage.txt"
        text.write_text(render_tree(node) + "\n", encoding="utf-8")
        image = lineage_graph(node, Path(tmp) / "lineage.png")
        for f in (text, image):
            client.log_artifact(parent_run_id, str(f), "lineage")
    log.info("lineage of %s logged to run %s (lineage/)", registered_ref, parent_run_id)
    return node


def _parse_ref(ref: str) -> tuple[str, str | None, str | None]:
    """(name, alias, version): exactly one of alias and version is set."""
    body = ref.removeprefix("models:/").strip()
    if "@" in body:
        name, _, alias = body.rpartition("@")
        if name and alias:
            return name, alias, None
    elif "/" in body:
        name, _, version = body.rpartition("/")
        if name and version.isdigit():
            return name, None, version
    raise ConfigError(
        [f"{ref!r} is not NAME@ALIAS or NAME/VERSION (e.g. tiny-assistant@champion, tiny-assistant/3)"],
        "model reference",
    )


def _check_store(tracking_uri: str) -> None:
    # MLflow would quietly create an empty database at a mistyped path; say so instead. (sqlite:///a.db
    # is relative and sqlite:////a.db absolute: one slash belongs to the URI.)
    parsed = urlparse(tracking_uri)
    local = Path(parsed.path.removeprefix("/")) if parsed.scheme == "sqlite" else None
    if local is not None and not local.exists():
        raise ConfigError(
            [f"no MLflow store at {local}: point registry.tracking_uri at the store the pipeline used"],
            "registry.tracking_uri",
        )


class _ArtifactReader:
    """Downloads a run's JSON artifacts once each; a missing one reads as None."""

    def __init__(self, client, run_id: str, tmp: Path) -> None:
        self.client, self.run_id, self.tmp, self.cache = client, run_id, tmp, {}

    def json(self, artifact_path: str) -> Any:
        from mlflow.exceptions import MlflowException

        if artifact_path not in self.cache:
            try:
                local = self.client.download_artifacts(self.run_id, artifact_path, str(self.tmp))
                self.cache[artifact_path] = json.loads(Path(local).read_text(encoding="utf-8"))
            except (MlflowException, OSError, ValueError):
                self.cache[artifact_path] = None
        return self.cache[artifact_path]


def _run_node(parent, artifacts: _ArtifactReader) -> Node:
    tags = parent.data.tags
    flow_run = tags.get("prefect.flow_run_id", "unknown")
    if tags.get("prefect.flow_run_name"):
        flow_run += f" ({tags['prefect.flow_run_name']})"
    libraries = ", ".join(
        f"{k.removeprefix('tunegate.version.')} {v}"
        for k, v in tags.items()
        if k.startswith("tunegate.version.")
    )
    promoted = tags.get("tunegate.promoted", "unknown")
    if tags.get("tunegate.registered_version"):
        promoted += f" (registered version {tags['tunegate.registered_version']})"
    return Node(
        label=f"pipeline run {parent.info.run_id}",
        kind="run",
        details={
            "name": parent.info.run_name or "",
            "status": parent.info.status,
            "started": _when(parent.info.start_time),
            "prefect flow run": flow_run,
            "prefect ui": tags.get("prefect.flow_run_url") or "none (no Prefect server)",
            "git commit": tags.get("tunegate.git_commit", "unknown"),
            "config digest": _config_check(tags.get("tunegate.config_digest"), artifacts),
            "libraries": libraries or "unknown",
            "champion at start": tags.get("tunegate.champion_at_start", "unknown"),
            "promoted": promoted,
        },
    )


def _config_check(digest: str | None, artifacts: _ArtifactReader) -> str:
    """The config digest, checked against the logged resolved config (the same hash as
    PipelineConfig.digest)."""
    resolved = artifacts.json("config/resolved.json")
    if resolved is None:
        return f"{digest or 'unknown'} (config/resolved.json missing)"
    actual = hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:16]
    check = "matches" if actual == digest else f"MISMATCH: the artifact hashes to {actual}"
    return f"{digest or 'unknown'} (config/resolved.json, {check})"


def _stages_node(client, parent) -> Node:
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
        max_results=1000,
    )
    runs = sorted((r for r in runs if "tunegate.stage" in r.data.tags), key=lambda r: r.info.start_time or 0)
    return Node(label=f"stages ({len(runs)} runs)", kind="group", children=[_stage_node(r) for r in runs])


def _stage_node(run) -> Node:
    metrics = run.data.metrics
    seconds = metrics.get("stage_seconds")
    label = run.data.tags["tunegate.stage"] + (f" ({seconds:.1f} s)" if seconds is not None else "")
    details = {"run": run.info.run_id}
    if run.info.status != "FINISHED":
        details["status"] = run.info.status
    finals = {k.removeprefix("final."): v for k, v in metrics.items() if k.startswith("final.")}
    finals.pop("resumed_from_step", None)
    keys = [k for k in KEY_METRICS if k in finals] + sorted(k for k in finals if k not in KEY_METRICS)
    if keys:
        details["metrics"] = ", ".join(f"{k}={finals[k]:.4g}" for k in keys[:METRICS_PER_STAGE])
    if resumed := metrics.get("final.resumed_from_step"):
        details["resumed from step"] = str(int(resumed))
    return Node(label=label, kind="stage", details=details)


def _datasets_node(parent, artifacts: _ArtifactReader) -> Node:
    from tasks.build import SPLITS

    kinds = {split: kind for kind, *names in SPLITS for split in names if split}
    children = []
    for d in parent.inputs.dataset_inputs:
        tags = {t.key: t.value for t in d.tags}
        report_path = tags.get("validation_report")
        sha256 = tags.get("sha256", "")
        details = {
            # MLflow's digest is the sha256's prefix: show the whole hash, which a file can be checked against.
            "digest": sha256 if sha256.startswith(d.dataset.digest) else d.dataset.digest,
            "rows": tags.get("rows", "unknown"),
            "source": _source_uri(d.dataset.source),
        }
        if report_path:
            reports = artifacts.json(report_path)
            report = _report_for(reports, kinds.get(d.dataset.name))
            details["validation"] = _validation_summary(report, reports is not None, report_path)
            if report is not None:
                raw = artifacts.json("data/sources.json") or {}
                details["raw input"] = ", ".join(
                    f"{f} (sha256 {raw.get(f, 'unknown')[:16]})" for f in report.get("files", [])
                )
        context = tags.get("mlflow.data.context")
        label = d.dataset.name + (f" ({context})" if context else "")
        children.append(Node(label=label, kind="dataset", details=details))
    return Node(label=f"datasets ({len(children)} inputs)", kind="group", children=children)


def _report_for(reports: Any, kind: str | None) -> dict | None:
    """The section of a validation report (a list of data_checks DataReport dicts) for one data kind."""
    if not isinstance(reports, list):
        return None
    return next((r for r in reports if isinstance(r, dict) and r.get("kind") == kind), None)


def _validation_summary(report: dict | None, found: bool, report_path: str) -> str:
    """e.g. `sft PASS: 112 rows read, 112 kept, 0 dropped, 0 warnings (validation/validation.json)`."""
    if not found:
        return f"report {report_path} not found in the run"
    if report is None:
        return f"no section for this data kind in {report_path}"
    kind = report.get("kind")
    read, kept = report.get("rows_read", 0), report.get("rows_valid", 0)
    warnings = sum(
        1 for c in report.get("checks", []) if (c.get("finding") or {}).get("severity") == "warning"
    )
    verdict = "PASS" if report.get("passed") else "FAIL"
    return (
        f"{kind} {verdict}: {read} rows read, {kept} kept, {read - kept} dropped, {warnings} warnings "
        f"({report_path})"
    )


def _base_model_node(parent, mv) -> Node:
    tags = {**mv.tags, **parent.data.tags}  # the run's tags win; the version's stand in for older runs
    return Node(
        label=f"base model {tags.get('tunegate.base_model', 'unknown')}",
        kind="base-model",
        details={"digest": tags.get("tunegate.base_model_digest", "unknown")},
    )


def _source_uri(source: str) -> str:
    try:
        parsed = json.loads(source)
    except ValueError:
        return source
    if isinstance(parsed, dict):
        return str(parsed.get("uri") or parsed.get("path") or source)
    return source


def _when(ms: int | None) -> str:
    if not ms:
        return "unknown"
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _detail_lines(node: Node, prefix: str) -> list[str]:
    bar = "│   " if node.children else "    "
    return [f"{prefix}{bar}{k}: {v}" for k, v in node.details.items()]


def _render_children(node: Node, prefix: str, lines: list[str]) -> None:
    for i, child in enumerate(node.children):
        last = i == len(node.children) - 1
        lines.append(f"{prefix}{'└── ' if last else '├── '}{child.label}")
        inner = prefix + ("    " if last else "│   ")
        lines.extend(_detail_lines(child, inner))
        _render_children(child, inner, lines)


def _place(node: Node, depth: int, next_row: list[int], out: list[tuple[Node, int, float]]) -> float:
    """Leaves take the next row; a parent sits level with the middle of its children."""
    if not node.children:
        y = float(next_row[0])
        next_row[0] += 1
    else:
        ys = [_place(c, depth + 1, next_row, out) for c in node.children]
        y = (ys[0] + ys[-1]) / 2
    out.append((node, depth, y))
    return y


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"
