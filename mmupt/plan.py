"""`mmupt run --dry-run`: the resolved plan of a run, before any GPU is touched.

It prints the processes and the GPUs they use (with the commands that start them), the batch
arithmetic of the schedule, and a memory estimate per learner GPU and per rollout GPU, every figure
with the arithmetic that produced it. The memory model (all sizes in bytes; P parameters,
T trainable parameters, N learner ranks):

- mixed precision (learner.precision bf16): bf16 weights (2 B) and gradients (2 B); AdamW keeps an
  fp32 master copy, momentum and variance (12 B), as in the ZeRO paper. fp32: 4 + 4 + 8 B.
- ZeRO 1 shards the optimizer state over the N ranks, ZeRO 2 also the gradients, ZeRO 3 also the
  weights. Without ZeRO (stage 0) DeepSpeed's bf16 optimizer still shards master weights and AdamW
  state over the ranks but keeps an fp32 gradient accumulator (4 B x T) beside the bf16 gradients.
  offload_optimizer moves the AdamW state (and its fp32 gradients) to host memory; offload_params
  moves ZeRO-3's weight shards there.
- the frozen reference model for the KL term is a full copy in model.dtype on every rank (that is
  how services/learner/engine.py holds it today).
- buffers: DeepSpeed's default communication buckets (reduce 5e8 elements; allgather 5e8 for
  stages 1-2; live parameters 1e9 and prefetch 5e7 for stage 3) and ~1 GiB of CUDA context.
- activations, a rough upper bound for one micro-batch of micro_groups x G sequences padded to
  max_prompt_tokens + max_new_tokens, with one max_pixels image per prompt: per token and decoder
  layer 34h + 8i bytes in bf16 (two RMSNorms upcast to fp32 ~20h, attention inputs/outputs 12h,
  projections' inputs 2h, SwiGLU 8i; flash/SDPA attention keeps no s x s matrix); the same formula
  for the vision tower per patch (4 patches per merged image token); and 14 bytes x vocab per token
  for the logits (bf16 logits, then fp32 copy, temperature-scaled copy and log-softmax). With
  activation checkpointing only each layer's input (2h per token and layer) is kept, plus one
  layer's activations during recomputation; the logits stay.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from .architectures import Architecture, find_architecture
from .config import Settings

GiB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CUDA_CONTEXT_BYTES = 1 * GiB
# vLLM's non-KV memory besides the weights (profiled activations, CUDA graphs, the vision encoder's
# profiling run): a rough allowance; vLLM measures the real figure at start-up.
VLLM_OVERHEAD_BYTES = 4 * GiB
IMAGES_PER_PROMPT = 1  # the MM-UPT data sets have one image per problem
# Service i listens on its section's port + 10 * i: rollout 8000, 8010, ..., voter 8001, 8011, ..., learner 8002.
PORT_STRIDE = 10


class PlanError(ValueError):
    """A plan that cannot be made (e.g. no architecture for the model); the message says why."""


@dataclass
class Line:
    label: str
    formula: str
    value: str


@dataclass
class Plan:
    title: str
    sections: list[tuple[str, list[Line]]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    figures: dict[str, float] = field(default_factory=dict)  # named results, for tests and tools

    def add(self, heading: str, lines: list[Line]) -> None:
        self.sections.append((heading, lines))

    def render(self) -> str:
        out = [self.title, ""]
        for heading, lines in self.sections:
            out.append(heading)
            wide = max((len(line.label) for line in lines), default=0)
            mid = max((len(line.formula) for line in lines), default=0)
            for line in lines:
                out.append(f"  {line.label:<{wide}}  {line.formula:<{mid}}  {line.value}".rstrip())
            out.append("")
        out.append("warnings" if self.warnings else "warnings: none")
        out.extend(f"  ! {w}" for w in self.warnings)
        return "\n".join(out)


def gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if abs(n) >= GiB else f"{n / 2**20:.1f} MiB"


def billions(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


# ---- model and data -----------------------------------------------------------------------------
def trainable_params(arch: Architecture, settings: Settings) -> int:
    return arch.language_params if settings.learner.freeze_vision else arch.params


def model_section(plan: Plan, arch: Architecture, settings: Settings) -> None:
    trained = trainable_params(arch, settings)
    plan.figures.update(params=arch.params, trainable_params=trained)
    plan.add("model", [
        Line("folder", "", settings.model.path),
        Line("architecture", arch.source, arch.name),
        Line("parameters", f"language {billions(arch.language_params)} + vision {billions(arch.vision_params)}",
             billions(arch.params)),
        Line("trained", "vision tower frozen" if settings.learner.freeze_vision else "vision tower trained",
             billions(trained)),
        Line("shape", f"{arch.layers} layers, hidden {arch.hidden_size}, MLP {arch.intermediate_size}, "
             f"{arch.heads} heads / {arch.kv_heads} KV heads", f"vocab {arch.vocab_size}"),
    ])


def count_rows(path: Path) -> int | None:
    """Rows of a data file without reading its images; None when it is not on this machine."""
    if not path.is_file():
        return None
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    if path.suffix == ".json":
        return len(json.loads(path.read_text()))
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def data_section(plan: Plan, settings: Settings) -> None:
    d = settings.data
    lines = []
    for split, name in (("train", d.train), ("eval", d.eval)):
        if name is None:
            continue
        rows = count_rows(Path(name))
        lines.append(Line(split, name, "not on this machine" if rows is None else f"{rows} items"))
        if split == "train" and rows:
            plan.figures["train_items"] = rows
    lines.append(Line("columns", f"problem={d.problem_column} images={d.images_column} answer={d.answer_column}",
                      "answer is read for monitoring only"))
    plan.add("data", lines)


# ---- processes and GPUs -------------------------------------------------------------------------
def gpu_slots(settings: Settings) -> tuple[list[list[tuple[int, int]]], list[tuple[int, int]]]:
    """(node, gpu) slots: one list per rollout server (a TP group never spans nodes), then the learner's."""
    dep, per_node = settings.deployment, settings.deployment.gpus_per_node
    tp = rollout_gpus_per_server(settings)
    node, gpu, servers = 0, 0, []
    for _ in range(dep.rollout_servers):
        if gpu + tp > per_node:
            node, gpu = node + 1, 0
        servers.append([(node, gpu + k) for k in range(tp)])
        gpu += tp
    learner = []
    for _ in range(dep.learner_ranks):
        if gpu == per_node:
            node, gpu = node + 1, 0
        learner.append((node, gpu))
        gpu += 1
    return servers, learner


def rollout_gpus_per_server(settings: Settings) -> int:
    return settings.rollout.tensor_parallel_size if settings.rollout.backend == "vllm" else 1


def _devices(slots: list[tuple[int, int]]) -> str:
    return ",".join(str(g) for _, g in slots)


def _visible(settings: Settings, slots: list[tuple[int, int]]) -> str:
    return f"CUDA_VISIBLE_DEVICES={_devices(slots)} " if on_gpu(settings) else ""


def on_gpu(settings: Settings) -> bool:
    return settings.model.device != "cpu"


def _where(settings: Settings, slots: list[tuple[int, int]]) -> str:
    if not on_gpu(settings):
        return "CPU"
    nodes = sorted({n for n, _ in slots})
    return (f"node {nodes[0]}" if len(nodes) == 1 else f"nodes {nodes[0]}-{nodes[-1]}") + f" GPU {_devices(slots)}"


def processes_section(plan: Plan, settings: Settings, config_path: str) -> None:
    dep, ro = settings.deployment, settings.rollout
    servers, learner = gpu_slots(settings)
    tp = rollout_gpus_per_server(settings)
    lines = [Line("redis", "", settings.redis_url or "embedded Valkey (one machine only; set redis_url for GPUs)")]
    for i, slots in enumerate(servers):
        lines.append(Line(f"rollout {i}", f"{ro.backend}, {_where(settings, slots)}",
                          f"{_visible(settings, slots)}MMUPT_ROLLOUT__HTTP_PORT={ro.http_port + PORT_STRIDE * i} "
                          f"MMUPT_ROLLOUT__GRPC_PORT={ro.grpc_port + i} mmupt rollout --config {config_path}"))
    for i in range(dep.voters):
        lines.append(Line(f"voter {i}", "CPU",
                          f"MMUPT_VOTER__HTTP_PORT={settings.voter.http_port + PORT_STRIDE * i} "
                          f"mmupt voter --config {config_path}"))
    if len(learner) == 1:
        command = f"{_visible(settings, learner)}mmupt learner --config {config_path}"
    else:
        command = (f"deepspeed --include localhost:{_devices(learner)} --no_local_rank --module "
                   f"mmupt learner --config {config_path}")
    lines.append(Line("learner", f"{len(learner)} rank(s), {_where(settings, learner)}", command))
    total = dep.rollout_servers * tp + dep.learner_ranks if on_gpu(settings) else 0
    nodes = max(n for n, _ in [s for slots in servers for s in slots] + learner) + 1 if total else 1
    lines.append(Line("GPUs", f"{dep.rollout_servers} rollout x {tp} + {dep.learner_ranks} learner",
                      f"{total} GPUs on {nodes} node(s) of {dep.gpus_per_node}" if total else
                      "none (model.device is cpu)"))
    plan.figures.update(gpus=total, nodes=nodes)
    plan.add("processes and GPUs", lines)
    if nodes > 1 and len({n for n, _ in learner}) > 1:
        plan.warnings.append("the learner's ranks span nodes: launch them with a DeepSpeed hostfile, "
                             "not the single-node command above")
    if ro.backend == "vllm" and settings.model.device == "cpu":
        plan.warnings.append("rollout.backend vllm needs GPUs, but model.device is cpu")
    if ro.backend != "vllm" and ro.tensor_parallel_size > 1:
        plan.warnings.append("rollout.tensor_parallel_size is used by the vllm backend only (the transformers "
                             "backend runs on one device)")


def check_tensor_parallel(plan: Plan, arch: Architecture, settings: Settings) -> None:
    tp = settings.rollout.tensor_parallel_size
    if settings.rollout.backend == "vllm" and arch.heads % tp:
        plan.warnings.append(f"rollout.tensor_parallel_size {tp} does not divide the {arch.heads} attention heads "
                             f"of {arch.name}: vLLM refuses it")


# ---- batch arithmetic ---------------------------------------------------------------------------
def batch_section(plan: Plan, settings: Settings) -> None:
    lc, ro, ranks = settings.learner, settings.rollout, settings.deployment.learner_ranks
    g, per_step, updates = ro.group_size, lc.batch_groups, lc.updates_per_batch
    per_rollout = per_step * updates
    per_rank = per_step / ranks
    accumulation = per_rank / lc.micro_groups
    seq_len = ro.max_prompt_tokens + ro.max_new_tokens
    window = (lc.staleness_bound + 1) * per_step
    bound = f"max_staleness {lc.max_staleness}" if lc.async_ else "async: false, staleness 0"
    lines = [
        Line("prompts per rollout step", f"batch_groups {per_step} x updates_per_batch {updates}", f"{per_rollout}"),
        Line("responses per rollout step", f"{per_rollout} x group_size {g}", f"{per_rollout * g}"),
        Line("optimizer steps per rollout step", "updates_per_batch (one PPO epoch)", f"{updates}"),
        Line("prompts per optimizer step", "batch_groups", f"{per_step}"),
        Line("responses per optimizer step", f"{per_step} x {g}", f"{per_step * g}"),
        Line("groups per learner rank per step", f"{per_step} / {ranks} ranks", f"{per_rank:g}"),
        Line("micro-batch", f"micro_groups {lc.micro_groups} x {g} responses",
             f"{lc.micro_groups * g} sequences of <= {seq_len} tokens"),
        Line("gradient accumulation", f"{per_rank:g} / micro_groups {lc.micro_groups}",
             f"{accumulation:g} micro-batches per rank per step"),
        Line("generated tokens per rollout step", f"{per_rollout * g} x max_new_tokens {ro.max_new_tokens}",
             f"<= {per_rollout * g * ro.max_new_tokens / 1e6:.1f} M"),
        Line("prompts in flight (admission)", f"({bound} + 1) x {per_step}", f"<= {window}"),
        Line("run length", f"max_steps {lc.max_steps} x {per_step}", f"{lc.max_steps * per_step} prompts"
             + _epochs(plan, lc.max_steps * per_step)),
    ]
    plan.figures.update(prompts_per_rollout_step=per_rollout, responses_per_rollout_step=per_rollout * g,
                        responses_per_optimizer_step=per_step * g, micro_batch_sequences=lc.micro_groups * g,
                        gradient_accumulation=accumulation, admission_window=window)
    plan.add("batch arithmetic", lines)
    if per_step % (ranks * lc.micro_groups):
        plan.warnings.append(f"learner.batch_groups {per_step} is not a multiple of micro_groups {lc.micro_groups} "
                             f"x learner ranks {ranks}: the ranks cannot split a step evenly")
    if lc.max_staleness < updates - 1:
        plan.warnings.append(f"learner.max_staleness {lc.max_staleness} < updates_per_batch - 1 = {updates - 1}: "
                             "the last updates of a rollout batch would drop their groups as stale")


def _epochs(plan: Plan, prompts: int) -> str:
    items = plan.figures.get("train_items")
    return f" = {prompts / items:.2f} epochs of {items:.0f} items" if items else ""


# ---- learner memory -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Term:
    label: str
    formula: str
    nbytes: float


def model_state_terms(arch: Architecture, settings: Settings) -> tuple[list[Term], list[Term]]:
    """(per-GPU terms, per-rank host terms) for weights, gradients, optimizer state, reference, buffers."""
    lc, n = settings.learner, settings.deployment.learner_ranks
    p, t = arch.params, trainable_params(arch, settings)
    w = 2 if lc.precision == "bf16" else 4            # weight and gradient bytes
    k = 12 if lc.precision == "bf16" else 8           # AdamW state bytes (fp32 master + m + v, or m + v)
    stage = lc.zero_stage
    gpu, host = [], []
    if stage == 3 and lc.offload_params:
        host.append(Term("weights (ZeRO-3 shard, offloaded)", f"{w} B x P / {n}", w * p / n))
    elif stage == 3:
        gpu.append(Term("weights (ZeRO-3 shard)", f"{w} B x P / {n}", w * p / n))
    else:
        gpu.append(Term("weights (replicated)", f"{w} B x P", w * p))
    if stage >= 2:
        gpu.append(Term("gradients (sharded)", f"{w} B x T / {n}", w * t / n))
    else:
        gpu.append(Term("gradients (replicated)", f"{w} B x T", w * t))
        if stage == 0 and lc.precision == "bf16":
            gpu.append(Term("fp32 gradient accumulator (bf16 optimizer)", "4 B x T", 4 * t))
    sharded = stage >= 1 or lc.precision == "bf16"
    optimizer = Term("AdamW state" + (" (sharded)" if sharded else ""),
                     f"{k} B x T" + (f" / {n}" if sharded else ""), k * t / (n if sharded else 1))
    if lc.offload_optimizer and stage >= 1:
        host.append(Term(optimizer.label + ", offloaded", optimizer.formula, optimizer.nbytes))
        host.append(Term("fp32 gradients for the CPU optimizer", f"4 B x T / {n}", 4 * t / n))
    else:
        gpu.append(optimizer)
    if lc.kl_coef > 0:
        r = DTYPE_BYTES[settings.model.dtype]
        gpu.append(Term("reference model (KL, full copy per rank)", f"{r} B x P", r * p))
    gpu.append(buffer_term(stage, w, p))
    if on_gpu(settings):
        gpu.append(Term("CUDA context", "rough", CUDA_CONTEXT_BYTES))
    return gpu, host


def buffer_term(stage: int, w: int, params: int) -> Term:
    """DeepSpeed's default buckets, in elements; none holds more than the model's parameters."""
    if stage == 3:
        label, buckets = "ZeRO-3 buckets (reduce 5e8, live params 1e9, prefetch 5e7)", [5e8, 1e9, 5e7]
    elif stage in (1, 2):
        label, buckets = "ZeRO buckets (reduce 5e8, allgather 5e8)", [5e8, 5e8]
    else:
        label, buckets = "gradient all-reduce bucket (5e8)", [5e8]
    elements = sum(min(b, params) for b in buckets)
    return Term(label, f"{w} B x {elements:.3g}", w * elements)


@dataclass(frozen=True)
class Activations:
    """Activation bytes, a rough upper bound (see the module docstring for the formulas)."""
    per_token: float          # all decoder layers + logits, no checkpointing
    per_token_ckpt: float     # decoder layer inputs + logits, with checkpointing
    layer_per_token: float    # one decoder layer (recomputed one at a time with checkpointing)
    per_patch: float          # the whole vision tower, per 14x14 patch, no checkpointing
    per_patch_ckpt: float     # vision block inputs only
    block_per_patch: float    # one vision block (recomputed one at a time)


def activation_model(arch: Architecture, precision: str) -> Activations:
    w = 2 if precision == "bf16" else 4
    h, i = arch.hidden_size, arch.intermediate_size
    layer = w * (17 * h + 4 * i)                             # 34h + 8i bytes in bf16
    logits = w * arch.vocab_size + 3 * 4 * arch.vocab_size   # logits, fp32 copy, scaled copy, log-softmax
    block = w * (17 * arch.vision_hidden_size + 4 * arch.vision_intermediate_size)
    return Activations(per_token=arch.layers * layer + logits, per_token_ckpt=arch.layers * w * h + logits,
                       layer_per_token=layer, per_patch=arch.vision_depth * block,
                       per_patch_ckpt=arch.vision_depth * w * arch.vision_hidden_size, block_per_patch=block)


def image_patches(max_pixels: int) -> int:
    """14x14 patches of an image of max_pixels: 4 per merged 28x28 image token."""
    return 4 * (max_pixels // (28 * 28))


def learner_memory_section(plan: Plan, arch: Architecture, settings: Settings) -> None:
    lc, dep, ro = settings.learner, settings.deployment, settings.rollout
    gpu_terms, host_terms = model_state_terms(arch, settings)
    states = sum(term.nbytes for term in gpu_terms)
    capacity = (dep.gpu_memory_gib if on_gpu(settings) else dep.host_memory_gib) * GiB
    act = activation_model(arch, lc.precision)
    seq_len = ro.max_prompt_tokens + ro.max_new_tokens
    seqs = lc.micro_groups * ro.group_size
    patches = IMAGES_PER_PROMPT * image_patches(settings.model.max_pixels)
    per_image = patches * act.per_patch / IMAGES_PER_PROMPT
    per_seq = seq_len * act.per_token + patches * act.per_patch
    per_seq_ckpt = seq_len * act.per_token_ckpt + patches * act.per_patch_ckpt
    micro = seqs * per_seq
    # With checkpointing one layer (or vision block) of the whole micro-batch is live during recomputation.
    micro_ckpt = seqs * (per_seq_ckpt + max(seq_len * act.layer_per_token, patches * act.block_per_patch))
    room = capacity - states
    lines = [Line(t.label, t.formula, gib(t.nbytes)) for t in gpu_terms]
    lines += [
        Line("= model states and buffers", f"ZeRO-{lc.zero_stage}, {lc.precision}, {dep.learner_ranks} rank(s)",
             gib(states)),
        Line("activations per sequence", f"{seq_len} tokens x {act.per_token / 2**20:.2f} MiB "
             f"+ {IMAGES_PER_PROMPT} image x {gib(per_image)}", gib(per_seq)),
        Line("activations per micro-batch", f"{seqs} sequences (no activation checkpointing)", gib(micro)),
        Line("  with activation checkpointing", f"{seq_len} tokens x {act.per_token_ckpt / 2**20:.2f} MiB per "
             f"sequence + one layer", gib(micro_ckpt)),
        Line("= total per learner rank", "states + micro-batch activations", gib(states + micro)),
        Line("room for activations", f"{capacity / GiB:g} GiB - states", gib(room)),
        Line("text tokens per micro-batch that fit", f"room / {act.per_token / 2**20:.2f} MiB (checkpointed: "
             f"{act.per_token_ckpt / 2**20:.2f} MiB)",
             f"{max(0, room) / act.per_token:,.0f} ({max(0, room) / act.per_token_ckpt:,.0f} checkpointed)"),
    ]
    plan.figures.update(learner_states_gib=states / GiB, learner_activations_gib=micro / GiB,
                        learner_activations_ckpt_gib=micro_ckpt / GiB, learner_total_gib=(states + micro) / GiB,
                        activation_bytes_per_token=act.per_token)
    plan.add(f"learner memory per {'GPU' if on_gpu(settings) else 'process (CPU)'} (estimate; "
             f"P = {billions(arch.params)}, T = "
             f"{billions(trainable_params(arch, settings))}, N = {dep.learner_ranks})", lines)
    learner_verdict(plan, states, micro, micro_ckpt, capacity)
    host_section(plan, host_terms, settings)


def learner_verdict(plan: Plan, states: float, micro: float, micro_ckpt: float, capacity: float) -> None:
    if states > capacity:
        plan.warnings.append(f"learner model states alone need {gib(states)} per rank, over {gib(capacity)}: "
                             "raise deployment.learner_ranks, use ZeRO-3, or offload")
    elif states + micro > capacity:
        extra = ("even with activation checkpointing (" + gib(states + micro_ckpt) + ")"
                 if states + micro_ckpt > capacity else
                 "without activation checkpointing; with it " + gib(states + micro_ckpt) + " fits")
        plan.warnings.append(
            f"learner: model states fit ({gib(states)}), but a micro-batch at maximum lengths needs "
            f"{gib(states + micro)} of {gib(capacity)} {extra}. The learner needs micro-batches smaller than "
            "a group (a token budget), activation checkpointing and chunked log-probs to train at these lengths")


def host_section(plan: Plan, host_terms: list[Term], settings: Settings) -> None:
    if not host_terms:
        return
    dep = settings.deployment
    ranks_per_node = min(dep.learner_ranks, dep.gpus_per_node)
    per_rank = sum(t.nbytes for t in host_terms)
    lines = [Line(t.label, t.formula, gib(t.nbytes)) for t in host_terms]
    lines.append(Line("= per learner node", f"{ranks_per_node} ranks x {gib(per_rank)}", gib(per_rank * ranks_per_node)))
    plan.figures["learner_host_gib"] = per_rank * ranks_per_node / GiB
    plan.add("learner host memory (offload)", lines)
    if per_rank * ranks_per_node > dep.host_memory_gib * GiB:
        plan.warnings.append(f"offloaded learner state needs {gib(per_rank * ranks_per_node)} of host memory per "
                             f"node, over deployment.host_memory_gib {dep.host_memory_gib:g}")


# ---- rollout memory -----------------------------------------------------------------------------
def rollout_memory_section(plan: Plan, arch: Architecture, settings: Settings) -> None:
    ro, dep = settings.rollout, settings.deployment
    tp = rollout_gpus_per_server(settings)
    w = DTYPE_BYTES[settings.model.dtype]
    weights = w * arch.params / tp
    kv_heads_per_gpu = max(1, arch.kv_heads // tp)
    kv_per_token = 2 * arch.layers * kv_heads_per_gpu * arch.head_dim * w
    seq_len = ro.max_prompt_tokens + ro.max_new_tokens
    lines = [Line("weights", f"{w} B x P / TP {tp}", gib(weights))]
    if ro.backend == "vllm":
        budget = dep.gpu_memory_gib * GiB * ro.gpu_memory_utilization
        kv = budget - weights - VLLM_OVERHEAD_BYTES
        tokens = max(0.0, kv) / kv_per_token
        lines += [
            Line("vLLM budget", f"{dep.gpu_memory_gib:g} GiB x gpu_memory_utilization {ro.gpu_memory_utilization}",
                 gib(budget)),
            Line("activations, CUDA graphs, encoder", "rough (vLLM profiles it at start)", gib(VLLM_OVERHEAD_BYTES)),
            Line("KV cache", "budget - weights - the above", gib(kv)),
            Line("KV bytes per token", f"2 x {arch.layers} layers x {kv_heads_per_gpu} KV heads x {arch.head_dim} x {w} B",
                 f"{kv_per_token / 1024:.0f} KiB"),
            Line("KV capacity", f"{tokens:,.0f} tokens / {seq_len}", f"{tokens / seq_len:,.0f} full-length sequences"),
            Line("sequences per generate call", f"prompts_per_batch {ro.prompts_per_batch} x {ro.group_size}",
                 f"{ro.prompts_per_batch * ro.group_size} (vLLM queues what the KV cache cannot hold)"),
        ]
        plan.figures.update(rollout_kv_tokens=tokens, rollout_kv_gib=kv / GiB)
        if kv <= 0:
            plan.warnings.append("rollout: the weights do not leave room for a KV cache; raise tensor_parallel_size")
        elif tokens < seq_len * ro.group_size:
            plan.warnings.append(f"rollout: the KV cache holds {tokens:,.0f} tokens, less than one group "
                                 f"({ro.group_size} x {seq_len})")
    else:
        kv = ro.group_size * seq_len * kv_per_token
        lines.append(Line("KV cache of one group", f"{ro.group_size} x {seq_len} tokens x {kv_per_token / 1024:.0f} KiB",
                          gib(kv)))
        lines.append(Line("= total", "weights + KV", gib(weights + kv)))
    plan.figures["rollout_weights_gib"] = weights / GiB
    where = f"GPU ({ro.backend}, {tp} GPU(s) per server)" if on_gpu(settings) else f"process (CPU, {ro.backend})"
    plan.add(f"rollout memory per {where}", lines)


# ---- the plan -----------------------------------------------------------------------------------
def architecture(settings: Settings) -> Architecture:
    """The model's architecture; the tiny demo model is built in a scratch folder when it is missing."""
    path = Path(settings.model.path)
    try:
        if not (path / "config.json").is_file() and settings.model.build_if_missing != "no":
            from .make_base import BaseRecipe
            from .model import build_tiny

            sizes = BaseRecipe().architecture() if settings.model.build_if_missing == "tiny-base" else {}
            with tempfile.TemporaryDirectory() as scratch:
                arch = find_architecture(build_tiny(Path(scratch) / "tiny", **sizes))
            return replace(arch, name="tiny Qwen2.5-VL", source=f"built at start (model.build_if_missing: {settings.model.build_if_missing})")
        return find_architecture(path)
    except Exception as exc:  # a broken config.json raises many types
        raise PlanError(f"cannot plan: {exc}") from None


def build_plan(settings: Settings, config_path: str) -> Plan:
    arch = architecture(settings)
    plan = Plan(f"mmupt plan for {config_path} (dry run: nothing is started)")
    model_section(plan, arch, settings)
    data_section(plan, settings)
    processes_section(plan, settings, config_path)
    check_tensor_parallel(plan, arch, settings)
    batch_section(plan, settings)
    learner_memory_section(plan, arch, settings)
    rollout_memory_section(plan, arch, settings)
    return plan
