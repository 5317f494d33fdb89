"""One YAML file per run, validated into typed settings.

Every field can be overridden by an environment variable: `MMUPT_<FIELD>` for a top-level field and
`MMUPT_<SECTION>__<FIELD>` for a nested one (e.g. `MMUPT_REDIS_URL`, `MMUPT_LEARNER__LR`), so that
compose and Kubernetes set it without new files. Unknown keys and wrong types are refused with an
error that names the field.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

ENV_PREFIX = "MMUPT_"
# Environment variables with our prefix that are not config fields.
NON_CONFIG_ENV = {"MMUPT_CONFIG", "MMUPT_CONSUMER_NAME", "MMUPT_LOG_LEVEL"}


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the offending field."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSettings(Section):
    path: str = "artifacts/tiny-qwen2_5_vl"
    # When `path` has no model: "no" refuses to start; "tiny" builds the tiny offline Qwen2.5-VL
    # (random weights); "tiny-base" builds it and trains it with labels into the weak base model of
    # the learning demo (`mmupt make-base`, about 2-3 minutes on 2 cores).
    build_if_missing: Literal["no", "tiny", "tiny-base"] = "no"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"  # "auto" picks cuda when available, else cpu
    min_pixels: int = Field(56 * 56, gt=0)
    max_pixels: int = Field(112 * 112, gt=0)

    @model_validator(mode="after")
    def _pixels_ordered(self):
        if self.min_pixels > self.max_pixels:
            raise ValueError("min_pixels must not exceed max_pixels")
        return self


class DataSettings(Section):
    train: str = "artifacts/shapes/train.jsonl"
    eval: str | None = "artifacts/shapes/test.jsonl"
    # Generate the project's synthetic visual task at train/eval when those files are missing.
    synthetic_if_missing: bool = False
    synthetic_train_size: int = Field(512, gt=0)
    synthetic_eval_size: int = Field(128, gt=0)
    synthetic_seed: int = 0
    # Question types of the synthetic task (mmupt/shapes_task.py): color, count, count_color, count_kind.
    synthetic_questions: list[Literal["color", "count", "count_color", "count_kind"]] = Field(
        default_factory=lambda: ["color"], min_length=1)
    shuffle_seed: int = 0
    # Column names (JSONL fields) of the files; MM-UPT/EasyR1 data uses problem / images / answer.
    # problem and images are required; answer, id and options are used when the file has them.
    problem_column: str = "problem"
    images_column: str = "images"
    answer_column: str = "answer"
    id_column: str = "id"
    options_column: str = "options"
    # Folder that relative image paths are resolved against; None: the data file's own folder.
    image_root: str | None = None


class PromptSettings(Section):
    suffix: str = " Please reason step by step, and put your final answer within \\boxed{}."
    system: str | None = None  # None keeps the chat template's default system message


class EvaluationSettings(Section):
    """Held-out accuracy that `mmupt run` measures before and after training (data.eval, its labels
    read for evaluation only): k samples per question at the rollout temperature, plus greedy."""
    enabled: bool = True
    k: int = Field(8, ge=1)
    limit: int | None = Field(None, ge=1)      # first N held-out questions (None: all)
    temperature: float | None = Field(None, ge=0)  # None: rollout.temperature


class StreamSettings(Section):
    # Producers wait (back-pressure) while a stream holds this many unprocessed entries.
    max_len: int = Field(1024, gt=0)
    # Entries claimed by a consumer and idle this long are reclaimed by another (crash recovery).
    claim_idle_ms: int = Field(60_000, gt=0)
    # A message delivered this many times without being acked goes to the dead-letter stream.
    max_deliveries: int = Field(5, gt=0)
    block_ms: int = Field(1000, gt=0)
    image_ttl_s: int = Field(7 * 24 * 3600, gt=0)
    max_image_bytes: int = Field(20 * 1024 * 1024, gt=0)
    max_image_pixels: int = Field(40_000_000, gt=0)
    deadletter_max_len: int = Field(10_000, gt=0)
    # A stream entry over this size is dead-lettered unread (a group of 10 x 2k-token responses is ~0.3 MB).
    max_entry_bytes: int = Field(16 * 1024 * 1024, gt=0)


class RolloutSettings(Section):
    backend: Literal["transformers", "vllm"] = "transformers"
    group_size: int = Field(8, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(64, gt=0)
    max_prompt_tokens: int = Field(2048, gt=0)
    # Prompts generated together in one backend call (each yields a whole group).
    prompts_per_batch: int = Field(1, ge=1)
    # vLLM backend only.
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    seed: int | None = None
    host: str = "127.0.0.1"
    http_port: int = Field(8000, ge=0, le=65535)
    grpc_port: int = Field(50051, ge=0, le=65535)
    # The address the learner uses to reach this server's WeightSync service (defaults to host).
    advertise_host: str | None = None
    heartbeat_s: float = Field(2.0, gt=0)
    # ---- HTTP API (/v1/chat/completions, /v1/rollout, /v1/eval) ----
    # Limits on one request; anything over them is refused with a 4xx that says which.
    max_request_n: int = Field(32, ge=1)
    max_request_new_tokens: int = Field(4096, gt=0)
    max_request_images: int = Field(8, ge=0)
    max_request_bytes: int = Field(64 * 1024 * 1024, gt=0)
    # Local files a request may name (image paths, /v1/eval benchmark files) must resolve inside
    # one of these directories; empty: no local paths at all (images come as data URLs).
    allowed_local_dirs: list[str] = []
    # Bounded queue of API requests: when full the server answers 429 with Retry-After; a request
    # still queued after queue_timeout_s is answered 503 with Retry-After.
    max_queue: int = Field(64, ge=1)
    queue_timeout_s: float = Field(300.0, gt=0)
    retry_after_s: int = Field(2, ge=1)
    # API prompts handed to the backend together (one transformers call; vLLM batches continuously).
    max_batch_prompts: int = Field(8, ge=1)
    # vLLM backend: where pushed weights are written (tmpfs) for the workers' in-place reload.
    vllm_weights_dir: str = "/dev/shm/mmupt-weights"
    # vLLM backend: enable vLLM's native weight-transfer engine (the learner broadcasts into the
    # workers) with this transport; None: weights arrive over gRPC WeightSync only.
    vllm_weight_transfer: Literal["nccl", "ipc"] | None = None


class VoterSettings(Section):
    reward_mode: Literal["majority", "ground_truth"] = "majority"
    # Answer equivalence: MathRuler's rules (paper parity), HuggingFace math-verify, or exact match.
    grader: Literal["mathruler", "math_verify", "exact"] = "mathruler"
    # Wall-clock bound on symbolic comparison (sympy, run in a killable worker process): on any one
    # comparison and on all of one group's together, so no group waits longer. A comparison that runs
    # out counts as not equal and is counted (mmupt_voter_compare_timeouts_total).
    compare_timeout_s: float = Field(1.0, gt=0)
    # A tie between the top classes: the class seen first wins (upstream), a seeded draw per group, or
    # the group is dropped (emitted with drop_reason "tie", counted by the learner, not trained).
    tie_policy: Literal["earliest", "random", "drop"] = "earliest"
    tie_seed: int = 0
    # Below this share of the group in the majority class the group is dropped or gets all-zero rewards.
    min_agreement: float = Field(0.0, ge=0, le=1)
    below_min_agreement: Literal["drop", "zero"] = "drop"
    # Final-answer forms besides the last \boxed{} (off by default, as upstream).
    extra_answer_forms: list[Literal["answer_is", "answer_tag"]] = []
    host: str = "127.0.0.1"
    http_port: int = Field(8001, ge=0, le=65535)
    groups_per_read: int = Field(16, ge=1)
    # POST /v1/vote bodies over this are refused (413) before they are read.
    max_request_bytes: int = Field(8 * 1024 * 1024, gt=0)


class LearnerSettings(Section):
    # Groups (prompts) per optimizer step.
    batch_groups: int = Field(4, ge=1)
    # Groups per forward/backward pass; gradients accumulate to batch_groups.
    micro_groups: int = Field(1, ge=1)
    # Optimizer steps per rollout batch (the recipe: 512 prompts sampled, 4 steps of 128), one PPO epoch.
    updates_per_batch: int = Field(1, ge=1)
    aggregation: Literal["token_mean", "seq_mean"] = "token_mean"
    # Skip groups whose rewards are all equal (zero advantage; only the KL term would act).
    skip_zero_advantage: bool = False
    freeze_vision: bool = False
    max_steps: int = Field(5, ge=0)
    lr: float = Field(1e-6, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    clip_low: float = Field(0.2, ge=0)
    clip_high: float = Field(0.3, ge=0)
    dual_clip: float = Field(3.0, gt=1)
    kl_coef: float = Field(0.01, ge=0)
    kl_clamp: float = Field(10.0, gt=0)
    # Truncated importance weight cap for groups sampled at an older policy version.
    tis_cap: float = Field(2.0, gt=0)
    # Groups more than this many versions behind the learner are dropped (counted) at consumption;
    # admission keeps in-flight prompts within what this allows.
    max_staleness: int = Field(2, ge=0)
    # `async: false` is the synchronous loop: the learner admits the next rollout batch only after it
    # has taken its step and pushed the weights, and rollout servers sample only at the newest
    # version (no overlap of generation and training; staleness 0, whatever max_staleness says).
    # `async` is a Python keyword, so the attribute is `async_`; YAML and MMUPT_LEARNER__ASYNC use `async`.
    async_: bool = Field(True, alias="async")
    zero_stage: Literal[0, 1, 2, 3] = 0
    precision: Literal["fp32", "bf16"] = "fp32"
    offload_optimizer: bool = False   # ZeRO optimizer state in CPU memory
    offload_params: bool = False      # ZeRO-3 parameters in CPU memory
    seed: int = 0
    host: str = "127.0.0.1"
    http_port: int = Field(8002, ge=0, le=65535)
    checkpoint_dir: str = "runs/checkpoints"
    # Also when trained groups become final: until then Redis keeps them for replay (learner:replay).
    checkpoint_every: int = Field(0, ge=0)   # 0: only at the end
    keep_checkpoints: int = Field(2, ge=1)
    # How new weights reach the rollout servers: gRPC chunks, or a gloo/NCCL broadcast.
    weight_sync: Literal["grpc", "collective"] = "grpc"
    # Cast weights to this dtype on the wire (bfloat16 halves the bytes); None keeps the model's.
    wire_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    push_timeout_s: float = Field(120.0, gt=0)
    # Chunk size of gRPC weight pushes (256 KiB measured fastest on loopback).
    push_chunk_bytes: int = Field(256 * 1024, gt=0)

    @property
    def staleness_bound(self) -> int:
        """Versions a trained group may trail the learner: max_staleness, or 0 in synchronous mode."""
        return self.max_staleness if self.async_ else 0

    @model_validator(mode="after")
    def _consistent(self):
        # Each message starts with the field it is about, so the error names the field to change.
        if self.batch_groups % self.micro_groups:
            raise ValueError(f"micro_groups ({self.micro_groups}) must divide batch_groups ({self.batch_groups})")
        if self.max_steps % self.updates_per_batch:
            raise ValueError(f"max_steps ({self.max_steps}) must be a multiple of updates_per_batch "
                             f"({self.updates_per_batch}): training stops at a rollout-batch boundary")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage 3")
        return self


class DeploymentSettings(Section):
    """Where the processes run: read by `mmupt run --dry-run` to plan GPUs and memory.

    `mmupt run` itself starts one process per service on one machine; on GPUs the runbook starts
    this placement by hand (or through compose/Kubernetes), and the plan prints the commands.
    """
    # vLLM/transformers rollout servers; each uses rollout.tensor_parallel_size GPUs.
    rollout_servers: int = Field(1, ge=1)
    # DeepSpeed data-parallel ranks of the learner, one GPU each.
    learner_ranks: int = Field(1, ge=1)
    voters: int = Field(1, ge=1)
    gpus_per_node: int = Field(8, ge=1)
    # Memory of one GPU and of one node's host RAM, for the plan's fit check.
    gpu_memory_gib: float = Field(80.0, gt=0)
    host_memory_gib: float = Field(512.0, gt=0)


class SynthSettings(Section):
    """Synthetic questions: `mmupt synth`, and the learner's continual mode (`ratio` > 0).

    Every filter is on by default and counts what it drops; the thresholds below switch them off
    where noted.
    """
    # in-context: the image, a seed question and its answer, asking for a new, different question;
    # direct: the image alone.
    mode: Literal["in-context", "direct"] = "direct"
    questions_per_seed: int = Field(4, ge=1)    # questions sampled per seed (one prompt, n samples)
    temperature: float = Field(1.0, gt=0)       # sampling of the questions
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(256, gt=0)          # new tokens for one question
    seed: int | None = 0                        # sampling seed of `mmupt synth` (None: unseeded)
    seeds_per_batch: int = Field(8, ge=1)       # seeds (and answer checks) handed to the model together
    # ---- filters ----
    # Unparseable: the reply must give the question after its marker ("Question:" / "New question:")
    # as clean text. False: the whole reply is the question (for models that ignore the format).
    require_marker: bool = True
    min_words: int = Field(4, ge=0)             # too short below this (0: off)
    max_words: int = Field(150, ge=0)           # too long above this (0: off)
    # Duplicates of a seed question or of each other, among questions about the same image(s):
    # equal normalised text, or content-word Jaccard similarity at least this (1.0: equal words only).
    dedup: bool = True
    near_duplicate_similarity: float = Field(0.8, gt=0, le=1)
    # Self-consistency: G answers sampled with the training prompt (rollout temperature, top_p and
    # max_new_tokens); a question is kept only if its majority share is at least min_majority_share
    # (0: off). None: G = rollout.group_size.
    answer_samples: int | None = Field(None, ge=1)
    min_majority_share: float = Field(0.5, ge=0, le=1)
    drop_unanimous: bool = False                # also drop questions every sample answers alike
    # Questions that do not need the image: G more answers without it; dropped when they reach the
    # same majority answer with a share at least (share with the image - image_margin).
    image_check: bool = True
    image_margin: float = Field(0.0, ge=0, le=1)
    # ---- continual mode (the learner) ----
    # Share of admitted prompts that are synthetic, generated on the fly through the live rollout
    # servers' API from the training set's images (0: off; 1: synthetic prompts only).
    ratio: float = Field(0.0, ge=0, le=1)
    ready_prompts: int = Field(8, ge=1)         # filtered synthetic prompts kept ready (bounded buffer)


class AuthSettings(Section):
    # Token for weight pushes and other state-changing calls. Prefer token_file (a mounted secret).
    token: str | None = Field(None, repr=False)
    token_file: str | None = None
    # Optional TLS for the gRPC WeightSync service. Rollout servers serve with cert + key (PEM);
    # the learner trusts the CA in tls_ca_file. Set all three (one config per run) to turn TLS on.
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_ca_file: str | None = None
    # The name the learner expects in the server certificate, when it differs from the address
    # it dials (e.g. a cert for "rollout.internal" reached as 10.0.0.7:50051).
    tls_server_name: str | None = None

    def resolve_token(self) -> str | None:
        if self.token_file:
            return Path(self.token_file).read_text().strip()
        return self.token

    @model_validator(mode="after")
    def _tls_pair(self):
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file go together")
        return self


class WeightSyncSettings(Section):
    """How pushes behave beyond learner.weight_sync / wire_dtype / push_timeout_s / push_chunk_bytes."""
    # Extra attempts for a server whose push failed with a transient error, within push_timeout_s.
    retries: int = Field(2, ge=0)
    retry_backoff_s: float = Field(0.5, ge=0)
    # Collective path (learner.weight_sync: collective): the flat weights are broadcast in buckets
    # of this size; "auto" is NCCL when the learner has a GPU, else gloo.
    bucket_bytes: int = Field(256 * 1024 * 1024, gt=0)
    collective_backend: Literal["auto", "gloo", "nccl"] = "auto"
    # The learner's rendezvous store (a torch TCPStore, listening on all interfaces); 0 picks a free
    # port. Rollout servers reach it at store_advertise_host (default: learner.host, or the
    # hostname when learner.host is 0.0.0.0).
    store_port: int = Field(0, ge=0, le=65535)
    store_advertise_host: str | None = None


class Settings(Section):
    run_id: str = "default"
    # None: `mmupt run` starts an embedded Valkey server; the single services require a URL.
    redis_url: str | None = None
    # On SIGTERM a service stops taking work and exits within this many seconds (below Kubernetes'
    # default 30 s grace period, so it is never killed mid-shutdown).
    shutdown_grace_s: float = Field(20.0, gt=0, le=300)
    model: ModelSettings = ModelSettings()
    data: DataSettings = DataSettings()
    prompt: PromptSettings = PromptSettings()
    streams: StreamSettings = StreamSettings()
    rollout: RolloutSettings = RolloutSettings()
    voter: VoterSettings = VoterSettings()
    learner: LearnerSettings = LearnerSettings()
    deployment: DeploymentSettings = DeploymentSettings()
    synth: SynthSettings = SynthSettings()
    auth: AuthSettings = AuthSettings()
    weights: WeightSyncSettings = WeightSyncSettings()
    evaluation: EvaluationSettings = EvaluationSettings()

    def dump_yaml(self) -> str:
        # by_alias: fields named after Python keywords (learner.async) keep their YAML name
        return yaml.safe_dump(self.model_dump(mode="json", by_alias=True), sort_keys=False)


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    """Map MMUPT_SECTION__FIELD=value to a nested dict; values are parsed as YAML scalars."""
    overrides: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name in NON_CONFIG_ENV:
            continue
        path = name[len(ENV_PREFIX):].lower().split("__")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        node = overrides
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"environment variable {name} conflicts with another override")
        node[path[-1]] = value
    return overrides


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _describe(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "<root>"
        env = ENV_PREFIX + "__".join(str(p) for p in err["loc"]).upper()
        if err["type"] == "extra_forbidden":
            lines.append(f"  {field}: unknown field (or environment variable {env})")
        else:
            lines.append(f"  {field}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def load_settings(path: str | Path | None = None, environ: dict[str, str] | None = None,
                  overrides: dict[str, Any] | None = None) -> Settings:
    """Load YAML (optional), then environment overrides, then explicit overrides; validate."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        data, source = loaded, str(path)
    data = _merge(data, _env_overrides(dict(os.environ if environ is None else environ)))
    data = _merge(data, overrides or {})
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None
