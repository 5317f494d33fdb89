"""Benchmark evaluation: MathVista / MATH-V / We-Math style files, the paper's prompt, k samples per
question, answers from the last \\boxed{}, multiple choice handled by the voter's rules.

Per question, with k samples at the given temperature:
- accuracy: the first sample is correct (one answer per question, the usual benchmark number);
- avg@k: the share of the k samples that are correct;
- maj@k: the majority answer of the k samples (the voter's vote) is correct;
- pass@k: at least one of the k samples is correct.
Each is averaged over questions, overall and per subject.
"""
from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from .config import PromptSettings
from .model import IMAGE_PLACEHOLDER, build_messages
from .sampler import ChatRequest, Sampler, image_part

log = logging.getLogger(__name__)
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class BenchmarkError(ValueError):
    """A benchmark file that cannot be used; the message names the file and the item."""


@dataclass(frozen=True)
class EvalItem:
    id: str
    question: str              # with one <image> placeholder per image (or none: images first)
    answer: str
    options: list[str] = field(default_factory=list)
    subject: str = "all"
    images: list[bytes] = field(default_factory=list, repr=False)


# ---- reading benchmark files ------------------------------------------------------------------
def _rows(path: Path) -> list[dict]:
    """JSONL (one item a line), a JSON list, or a JSON object of items keyed by id (MathVista)."""
    text = path.read_text()
    if path.suffix == ".jsonl":
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise BenchmarkError(f"{path}:{lineno}: not valid JSON: {exc}") from None
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BenchmarkError(f"{path}: not valid JSON: {exc}") from None
    if isinstance(data, dict):
        data = data.get("data", list(data.values()))
    if not isinstance(data, list):
        raise BenchmarkError(f"{path}: expected a list of items")
    return data


def _options(row: dict) -> list[str]:
    raw = row.get("options", row.get("choices", row.get("option")))
    if not raw:
        return []
    if isinstance(raw, str):  # We-Math: "A. 200.96;B. 3215.36;C. 6280"
        parts = re.split(r"(?:^|;)\s*([A-Z])\.\s*", raw)
        return [p.strip() for p in parts[2::2]]
    return [str(o) for o in raw]


def _subject(row: dict) -> str:
    meta = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
    for value in (row.get("subject"), row.get("knowledge concept"), row.get("category"), meta.get("task"),
                  meta.get("category")):
        if value:
            return str(value)
    return "all"


def _image_refs(row: dict) -> list[str]:
    for key in ("images", "image", "image_path"):
        value = row.get(key)
        if value:
            return [str(v) for v in value] if isinstance(value, list) else [str(value)]
    return []


def load_benchmark(path: str | Path, limit: int | None = None,
                   path_guard: Callable[[Path], None] | None = None) -> list[EvalItem]:
    """Read up to `limit` items. Image paths are relative to the file; `path_guard` may refuse any
    path read (the HTTP server uses it to keep reads inside its allowed directories)."""
    path = Path(path)
    if path_guard is not None:
        path_guard(path)
    if not path.is_file():
        raise BenchmarkError(f"benchmark file not found: {path}")
    items = []
    for index, row in enumerate(_rows(path)[:limit] if limit else _rows(path)):
        where = f"{path}: item {index}"
        if not isinstance(row, dict):
            raise BenchmarkError(f"{where}: not an object")
        question = row.get("question", row.get("problem"))
        if question is None or row.get("answer") is None:
            raise BenchmarkError(f"{where}: needs 'question' (or 'problem') and 'answer'")
        images = []
        for ref in _image_refs(row):
            image_path = path.parent / ref
            if path_guard is not None:
                path_guard(image_path)
            try:
                images.append(image_path.read_bytes())
            except OSError as exc:
                raise BenchmarkError(f"{where}: cannot read image {ref}: {exc.strerror}") from None
        # MATH-V writes <image1>, <image2>...: our placeholder is <image>.
        question = re.sub(r"<image\d*>", IMAGE_PLACEHOLDER, str(question))
        items.append(EvalItem(id=str(row.get("id", row.get("pid", row.get("ID", index)))), question=question,
                              answer=str(row["answer"]), options=_options(row), subject=_subject(row),
                              images=images))
    if not items:
        raise BenchmarkError(f"{path}: no items")
    return items


# ---- prompts ------------------------------------------------------------------------------------
def problem_text(item: EvalItem) -> str:
    """The question plus its choices; choices that are only letters (drawn in the image, as in
    MATH-V) are listed as letters."""
    if not item.options:
        return item.question
    letters = LETTERS[:len(item.options)]
    if all(o.strip() == letter for o, letter in zip(item.options, letters)):
        return f"{item.question}\nChoices: {', '.join(letters)}"
    lines = "\n".join(f"({letter}) {option}" for letter, option in zip(letters, item.options))
    return f"{item.question}\nChoices:\n{lines}"


def item_messages(item: EvalItem, prompt: PromptSettings) -> list[dict]:
    """The paper's prompt (problem + suffix, default system message) as OpenAI messages."""
    messages = build_messages(problem_text(item), len(item.images), prompt)
    images = iter(item.images)
    for message in messages:
        if isinstance(message["content"], list):
            message["content"] = [image_part(next(images)) if part["type"] == "image" else part
                                  for part in message["content"]]
    return messages


# ---- scoring ------------------------------------------------------------------------------------
@dataclass
class ItemResult:
    id: str
    subject: str
    gold: str
    answers: list[str | None]        # extracted final answer per sample
    correct: list[bool]
    majority: str | None
    majority_correct: bool
    responses: list[str]


def score_item(item: EvalItem, responses: list[str], grader) -> ItemResult:
    from .services.voter.extract import extract_boxed  # noqa: PLC0415
    from .services.voter.vote import is_correct, vote  # noqa: PLC0415

    options = item.options or None
    correct = [is_correct(r, item.answer, grader, options) for r in responses]
    result = vote(responses, grader, "majority", item.answer, options)
    return ItemResult(id=item.id, subject=item.subject, gold=item.answer,
                      answers=[extract_boxed(r) for r in responses], correct=correct,
                      majority=result.pseudo_label, majority_correct=bool(result.label_correct),
                      responses=list(responses))


def metric_names(k: int) -> list[str]:
    return ["accuracy", f"avg@{k}", f"maj@{k}", f"pass@{k}"]


def summarize(results: list[ItemResult], k: int) -> dict:
    """Overall and per-subject means of the four metrics (fractions in [0, 1])."""
    def block(rs: list[ItemResult]) -> dict:
        n = len(rs)
        return {"n": n,
                "accuracy": sum(r.correct[0] for r in rs) / n,
                f"avg@{k}": sum(sum(r.correct) / len(r.correct) for r in rs) / n,
                f"maj@{k}": sum(r.majority_correct for r in rs) / n,
                f"pass@{k}": sum(any(r.correct) for r in rs) / n}

    subjects = sorted({r.subject for r in results})
    return {"overall": block(results),
            "subjects": {s: block([r for r in results if r.subject == s]) for s in subjects}}


def format_table(summary: dict, k: int) -> str:
    names = metric_names(k)
    rows = [("overall", summary["overall"])] + list(summary["subjects"].items())
    width = max(len(name) for name, _ in rows)
    header = f"{'subject':<{width}}  {'n':>5}  " + "  ".join(f"{m:>8}" for m in names)
    lines = [header, "-" * len(header)]
    for name, block in rows:
        lines.append(f"{name:<{width}}  {block['n']:>5}  " + "  ".join(f"{100 * block[m]:>8.1f}" for m in names))
    return "\n".join(lines)


def plot_summary(summary: dict, k: int, path: Path, title: str) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    names = metric_names(k)
    rows = [("overall", summary["overall"])] + list(summary["subjects"].items())
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(rows) + 2), 4.5))
    width = 0.8 / len(names)
    for i, metric in enumerate(names):
        ax.bar([x + i * width for x in range(len(rows))], [100 * b[metric] for _, b in rows], width, label=metric)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(rows))], [name for name, _ in rows], rotation=40,
                  ha="right", fontsize=8)
    ax.set_ylabel("% of questions")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- running ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalConfig:
    k: int = 8
    temperature: float = 0.2
    top_p: float = 1.0
    max_tokens: int = 2048
    seed: int | None = 0
    batch_size: int = 8          # questions handed to the sampler together


def evaluate(items: list[EvalItem], sampler: Sampler, cfg: EvalConfig, grader, prompt: PromptSettings,
             on_progress: Callable[[int, int], None] | None = None, show_bar: bool = True) -> dict:
    """Sample k answers per item, score them, and return the JSON-ready result."""
    started = time.monotonic()
    results: list[ItemResult] = []
    bar = tqdm(total=len(items), desc="eval", unit="question", dynamic_ncols=True, disable=not show_bar)
    try:
        for start in range(0, len(items), cfg.batch_size):
            chunk = items[start:start + cfg.batch_size]
            requests = [ChatRequest(messages=item_messages(item, prompt), n=cfg.k, temperature=cfg.temperature,
                                    top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                                    seed=None if cfg.seed is None else cfg.seed + start + i)
                        for i, item in enumerate(chunk)]
            for item, choices in zip(chunk, sampler.complete(requests)):
                results.append(score_item(item, [c.text for c in choices], grader))
            bar.update(len(chunk))
            if on_progress is not None:
                on_progress(len(results), len(items))
    finally:
        bar.close()
    summary = summarize(results, cfg.k)
    return {"sampler": sampler.describe(), "config": asdict(cfg), "grader": getattr(grader, "name", str(grader)),
            "items": len(results), "wall_seconds": round(time.monotonic() - started, 2),
            "summary": summary, "per_item": [asdict(r) for r in results]}


def write_outputs(result: dict, out: Path, title: str) -> dict[str, Path]:
    """result.json, table.txt and summary.png in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    k = result["config"]["k"]
    paths = {"json": out / "result.json", "table": out / "table.txt", "plot": out / "summary.png"}
    paths["json"].write_text(json.dumps(result, indent=2))
    paths["table"].write_text(format_table(result["summary"], k) + "\n")
    plot_summary(result["summary"], k, paths["plot"], title)
    return paths


def run_evaluation(settings, benchmark: str | Path, out: Path, cfg: EvalConfig, model_dir: str | None = None,
                   url: str | None = None, limit: int | None = None, grader_name: str | None = None,
                   api_key: str | None = None, concurrency: int = 4) -> dict:
    """`mmupt eval`: load the benchmark, sample through a local model or a server, score, and write
    result.json, table.txt and summary.png to `out`; prints the table."""
    from .sampler import open_sampler  # noqa: PLC0415
    from .services.voter.grading import make_grader  # noqa: PLC0415

    items = load_benchmark(benchmark, limit)
    grader = make_grader(grader_name or settings.voter.grader)
    sampler = open_sampler(settings, model_dir=model_dir, url=url, api_key=api_key, concurrency=concurrency)
    log.info("evaluating %d questions of %s with %s (k=%d, temperature=%g)", len(items), benchmark,
             sampler.describe(), cfg.k, cfg.temperature)
    try:
        result = evaluate(items, sampler, cfg, grader, settings.prompt)
    finally:
        sampler.close()
    result["benchmark"] = str(benchmark)
    title = f"{Path(benchmark).name}: {result['sampler']} (k={cfg.k}, T={cfg.temperature:g})"
    paths = write_outputs(result, out, title)
    print(format_table(result["summary"], cfg.k))
    print(f"results: {paths['json']}  table: {paths['table']}  plot: {paths['plot']}")
    return result


def heldout_accuracy(settings, items: list[EvalItem], k: int, temperature: float, max_tokens: int,
                     model_dir: str | None = None, grader_name: str | None = None, seed: int = 0) -> dict:
    """Held-out accuracy of a local model, as `mmupt run` and the learning benchmark report it:
    `accuracy` (share of k samples at `temperature` that are right, averaged over questions),
    `maj_accuracy` (the majority of the k samples is right) and `greedy_accuracy` (temperature 0)."""
    from .sampler import open_sampler  # noqa: PLC0415
    from .services.voter.grading import make_grader  # noqa: PLC0415

    grader = make_grader(grader_name or settings.voter.grader)
    sampler = open_sampler(settings, model_dir=model_dir)
    try:
        sampled = evaluate(items, sampler, EvalConfig(k=k, temperature=temperature, max_tokens=max_tokens, seed=seed),
                           grader, settings.prompt, show_bar=False)["summary"]["overall"]
        greedy = evaluate(items, sampler, EvalConfig(k=1, temperature=0.0, max_tokens=max_tokens, seed=seed),
                          grader, settings.prompt, show_bar=False)["summary"]["overall"]
    finally:
        sampler.close()
    return {"accuracy": round(sampled[f"avg@{k}"], 4), "greedy_accuracy": round(greedy["accuracy"], 4),
            "maj_accuracy": round(sampled[f"maj@{k}"], 4), "k": k, "temperature": temperature, "n": sampled["n"]}
