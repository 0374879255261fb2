"""Standard benchmarks as forgetting sets: lm-evaluation-harness tasks scored row by row for each model.

Each entry of `evaluate.benchmarks` names a task (or group) that lm-eval ships, loaded by name, or one
defined by YAML files in a local directory (`include_path`), read offline. The harness scores the model
the evaluate stage has already loaded (`HFLM(pretrained=<model>)`); multiple-choice tasks are scored by
the log-likelihood of each choice, with no generation. tunegate keeps each row's value, in the task's
row order, so a benchmark metric gets the intervals and paired differences every per-row metric gets
(`tasks/intervals.py`: Wilson for yes/no values such as `acc`, Newcombe's paired method against a
baseline) and is gated like the canary set.

Metric names: `bench.<task>.<metric>` (e.g. `bench.arc_easy.acc`), `.<filter>` appended for a filter
other than lm-eval's `none`; a group or tag also gets its rows pooled under its own name.
"""

from __future__ import annotations

import difflib
import glob
import logging
import math
from collections import defaultdict
from functools import cache
from importlib.metadata import version
from pathlib import Path
from typing import Any

import yaml

from tunegate.config import BenchmarkSpec
from tunegate.errors import ConfigError

log = logging.getLogger(__name__)

PREFIX = "bench"


def score_benchmarks(
    model, tokenizer, specs: list[BenchmarkSpec], *, batch_size: int, seed: int
) -> tuple[dict[str, list[float]], dict[str, dict[str, Any]]]:
    """Score a loaded model on each benchmark with lm-evaluation-harness.

    Args:
        model, tokenizer: the model as the evaluate stage loaded it (on its device, in eval mode).
        specs: `evaluate.benchmarks`.
        batch_size: requests per forward pass.
        seed: seeds lm-eval's generators, so every model gets the same few-shot examples.

    Returns:
        Per-row values (metric -> one value per row, in the task's row order), and what each task was
        scored with (task -> settings, lm-eval version, task versions, rows, lm-eval's task hash).

    Raises:
        ConfigError: an include_path that is not a directory, a task that is not found, a data file a
            task names that does not exist, or a task with no per-row metric.
    """
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    if problems := check_benchmarks(specs):
        raise ConfigError(problems)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    values: dict[str, list[float]] = {}
    record: dict[str, dict[str, Any]] = {}
    for i, spec in enumerate(specs):
        results = simple_evaluate(
            lm,
            tasks=[spec.task],
            task_manager=_task_manager(spec.include_path),
            num_fewshot=spec.num_fewshot,
            limit=spec.limit,
            apply_chat_template=spec.apply_chat_template,
            log_samples=True,
            bootstrap_iters=0,  # no stderr: the intervals are tunegate's, from the rows
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
        rows = per_row_values(spec.task, results["samples"])
        if not rows:
            raise ConfigError(
                [
                    f"evaluate.benchmarks.{i}.task: {spec.task!r} has no metric scored per row (its "
                    "metrics are computed over the whole corpus); a gate needs one value per row: choose "
                    "a task scored per row (multiple_choice `acc`, `exact_match`)"
                ]
            )
        values.update(rows)
        record[spec.task] = _settings(spec, results, sorted(rows))
        log.info("benchmark %s: %s", spec.task, {m: round(sum(v) / len(v), 4) for m, v in rows.items()})
    return values, record


def per_row_values(name: str, samples: dict[str, list[dict]]) -> dict[str, list[float]]:
    """`bench.<task>.<metric>` -> each row's value, in row order, from lm-eval's logged samples (task
    -> one entry per row and filter). Metrics whose per-row values are not numbers (corpus metrics
    such as BLEU) are left out. A group or tag also gets its tasks' rows pooled under `name`."""
    out: dict[str, list[float]] = {}
    pooled: dict[tuple[str, str], list[float]] = defaultdict(list)
    for task in sorted(samples):
        found: dict[tuple[str, str], list[Any]] = defaultdict(list)  # (metric, filter) -> per row
        for s in sorted(samples[task], key=lambda s: (s["filter"], s["doc_id"])):
            for metric in s["metrics"]:
                found[(metric, s["filter"])].append(s[metric])
        for (metric, filter_name), row_values in found.items():
            if not all(_is_number(v) for v in row_values):
                log.info("benchmark %s: %s is not a number per row; not gated", task, metric)
                continue
            out[metric_name(task, metric, filter_name)] = [float(v) for v in row_values]
            pooled[(metric, filter_name)] += out[metric_name(task, metric, filter_name)]
    if name not in samples:  # a group or tag
        out.update({metric_name(name, m, f): v for (m, f), v in pooled.items()})
    return out


def metric_name(task: str, metric: str, filter_name: str = "none") -> str:
    """`bench.<task>.<metric>`, with `.<filter>` for a filter other than lm-eval's `none`."""
    name = f"{PREFIX}.{task}.{metric}"
    return name if filter_name == "none" else f"{name}.{filter_name}"


def merge_runs(runs: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """One record per task from each model's (label -> task -> record): the settings, which are the
    same for every model, and `task_hashes`, label -> lm-eval's hash of the rows, prompts and targets
    (the prompts differ only where chat templates do)."""
    out: dict[str, dict[str, Any]] = {}
    for label, tasks in runs.items():
        for task, fields in tasks.items():
            entry = out.setdefault(task, {k: v for k, v in fields.items() if k != "task_hash"})
            entry.setdefault("task_hashes", {})[label] = fields["task_hash"]
    return out


def check_benchmarks(specs: list[BenchmarkSpec]) -> list[str]:
    """What scoring `specs` would refuse, found without a model: every problem, by its config path.
    Loads lm-eval's task index (a few seconds for the tasks it ships), not the tasks' datasets."""
    problems = []
    for i, spec in enumerate(specs):
        where = f"evaluate.benchmarks.{i}"
        if spec.include_path is not None and not Path(spec.include_path).is_dir():
            problems.append(
                f"{where}.include_path: no directory {spec.include_path} (read from {Path.cwd()}); give "
                "the directory holding the task's YAML files, absolute or relative to the working directory"
            )
            continue
        known = _task_manager(spec.include_path).all_tasks
        if spec.task not in known:
            problems.append(f"{where}.task: {spec.task!r} {_not_found(spec, known)}")
        if spec.include_path is not None:
            problems += [f"{where}.include_path: {p}" for p in _unreadable(Path(spec.include_path))]
    return problems


def definition_files(include_path: str | Path) -> list[Path]:
    """What a local task definition is made of and reads: its directory (YAMLs, code, data), every
    YAML it includes from elsewhere, and every local path its YAMLs name as data (`dataset_path`,
    `dataset_kwargs.data_files` or `data_dir`; relative ones from the working directory, as `datasets`
    reads them). Paths that do not exist are returned too: their absence is part of the content."""
    root = Path(include_path)
    found: set[Path] = {root}
    for yaml_path in sorted(root.rglob("*.yaml")):
        cfg = _read_yaml(yaml_path)
        if not isinstance(cfg, dict):
            continue
        found.update(_data_references(cfg))
        includes = [yaml_path.parent / inc for inc in _as_list(cfg.get("include")) if isinstance(inc, str)]
        for included in includes:  # a template beside the directory (lm-eval resolves it from the YAML)
            if not included.resolve().is_relative_to(root.resolve()):
                found.add(included)
                if isinstance(inner := _read_yaml(included), dict):
                    found.update(_data_references(inner))
    return sorted(found)


def _settings(spec: BenchmarkSpec, results: dict[str, Any], metrics: list[str]) -> dict[str, Any]:
    """What decided this task's numbers, for the report and MLflow (the leaf tasks of a group each)."""
    samples = results["samples"]
    leaves = sorted(samples)
    return {
        "task": spec.task,
        "include_path": spec.include_path,
        "limit": spec.limit,
        "num_fewshot": {t: results["n-shot"].get(t) for t in leaves},
        "apply_chat_template": spec.apply_chat_template,
        "lm_eval": version("lm_eval"),
        "versions": {t: results["versions"].get(t) for t in leaves},
        "rows": {t: results["n-samples"].get(t, {}).get("effective") for t in leaves},
        "task_hash": _task_hash([s for t in leaves for s in sorted(samples[t], key=lambda s: s["doc_id"])]),
        "metrics": metrics,
    }


def _task_hash(samples: list[dict]) -> str:
    """lm-eval's own task hash (its EvaluationTracker's): of every row's document, prompt and target."""
    from lm_eval.utils import hash_string

    return hash_string("".join(s["doc_hash"] + s["prompt_hash"] + s["target_hash"] for s in samples))


def _task_manager(include_path: str | None):
    """A local directory's tasks alone (read at each call: the files may have changed), or the tasks
    lm-eval ships (indexed once per process: some 15,000 YAML files, several seconds)."""
    if include_path is None:
        return _shipped_tasks()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(include_path), include_defaults=False)


@cache
def _shipped_tasks():
    from lm_eval.tasks import TaskManager

    return TaskManager()


def _not_found(spec: BenchmarkSpec, known: list[str]) -> str:
    where = (
        f"is defined by no YAML file in {spec.include_path}"
        if spec.include_path is not None
        else f"is not a task, group or tag of lm-eval {version('lm_eval')}"
    )
    near = difflib.get_close_matches(spec.task, known, n=3)
    if near:
        return f"{where}; did you mean {', '.join(repr(n) for n in near)}?"
    if spec.include_path is not None:
        defined = ", ".join(known) or "none"
        return f"{where} (it defines: {defined}); set `task:` in its YAML, or point include_path at it"
    return f"{where}; for a task of your own, set include_path to the directory of its YAML files"


def _unreadable(root: Path) -> list[str]:
    """YAML files lm-eval would skip without a word, and data files the YAMLs name that are missing."""
    problems = []
    for yaml_path in sorted(root.rglob("*.yaml")):
        try:
            yaml.load(yaml_path.read_text(encoding="utf-8"), Loader=_TagsAsText)  # a SafeLoader
        except yaml.YAMLError as exc:
            problems.append(f"{yaml_path} is not valid YAML ({str(exc).splitlines()[0]}); lm-eval skips it")
    for path in definition_files(root):
        if not path.exists():
            problems.append(
                f"{path} is named by a task YAML and does not exist (read from {Path.cwd()}); fix the "
                "path in the YAML (relative paths are read from the working directory) or add the file"
            )
    return problems


class _TagsAsText(yaml.SafeLoader):
    """Task YAMLs carry `!function module.name` tags: read them as text, run nothing."""


_TagsAsText.add_multi_constructor("!", lambda loader, suffix, node: f"!{suffix}")


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_TagsAsText)  # a SafeLoader
    except (OSError, yaml.YAMLError):
        return None


def _data_references(cfg: dict[str, Any]) -> set[Path]:
    """Local paths a task YAML reads its data from, as `datasets.load_dataset` resolves them."""
    refs: set[Path] = set()
    kwargs = cfg.get("dataset_kwargs") if isinstance(cfg.get("dataset_kwargs"), dict) else {}
    data_dir = kwargs.get("data_dir") if isinstance(kwargs.get("data_dir"), str) else None
    files = kwargs.get("data_files")
    base = Path(data_dir or ".")
    named = [
        base / f
        for item in (files.values() if isinstance(files, dict) else [files])
        for f in _as_list(item)
        if isinstance(f, str) and "://" not in f
    ]
    if data_dir and "://" not in data_dir:
        named.append(base)
    for path in named:
        matches = glob.glob(str(path)) if glob.has_magic(str(path)) else [path]
        refs.update(Path(m) for m in matches)
    path = cfg.get("dataset_path")
    if isinstance(path, str) and Path(path).exists():  # a local dataset directory or file, not a Hub id
        refs.add(Path(path))
    return refs


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def _is_number(value: Any) -> bool:
    return isinstance(value, bool | int | float) and not (isinstance(value, float) and math.isnan(value))
