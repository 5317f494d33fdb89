"""`mmupt synth`: seed file in, synthesised questions out in the training format, with a report."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import httpx
from tqdm import tqdm

from mmupt.config import Settings
from mmupt.data import load_items
from mmupt.model import ensure_model
from mmupt.sampler import error_message, open_sampler

from .output import SynthWriter, check_output
from .pipeline import Synthesizer
from .report import SynthReport, plot_report

log = logging.getLogger(__name__)


def model_version(settings: Settings, url: str | None = None, model_dir: str | None = None,
                  api_key: str | None = None) -> str:
    """What wrote the questions: the server's model and policy version (and weights checksum), or the
    local model folder."""
    if not url:
        return str(Path(model_dir or settings.model.path).resolve())
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        reply = httpx.get(f"{url.rstrip('/')}/v1/version", headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        return f"{url} (version unknown: {exc})"
    if reply.status_code != 200:
        return f"{url} (version unknown: {reply.status_code} {error_message(reply)})"
    info = reply.json()
    version = f"{info.get('model')}@v{info.get('version')}"
    return f"{version}+checksum:{info['checksum'][:16]}" if info.get("checksum") else version


def run_synthesis(settings: Settings, seed_data: str | Path, out: str | Path, mode: str | None = None,
                  model_dir: str | None = None, url: str | None = None, limit: int | None = None,
                  api_key: str | None = None, concurrency: int = 4, show_bar: bool = True) -> dict:
    """Synthesise questions for every seed (the first `limit`), write the kept ones to `out` in the
    training format, the dropped ones to `<out>.rejected.jsonl`, and the report (JSON and PNG)."""
    from mmupt.services.voter.grading import make_grader  # noqa: PLC0415

    mode = mode or settings.synth.mode
    check_output(out)
    seeds = load_items(seed_data, settings.data, settings.streams)[:limit]
    if not url and not model_dir:
        ensure_model(settings.model)  # the tiny config builds its model on first use
    version = model_version(settings, url, model_dir, api_key)
    grader = make_grader(settings.voter.grader, settings.voter.compare_timeout_s)
    synthesizer = Synthesizer(settings, grader, mode)
    synthesizer.remember_seeds(seeds)  # every seed question, also those of later batches, is known
    report = SynthReport(mode, version)
    writer = SynthWriter(out, mode, version)
    sampler = None
    bar = tqdm(total=len(seeds), desc=f"synth {mode}", unit="seed", dynamic_ncols=True, disable=not show_bar)
    status = "failed"
    try:
        sampler = open_sampler(settings, model_dir=model_dir, url=url, api_key=api_key, concurrency=concurrency)
        log.info("synthesising %s questions for %d seeds of %s with %s", mode, len(seeds), seed_data,
                 sampler.describe())
        step = settings.synth.seeds_per_batch
        for start in range(0, len(seeds), step):
            batch = seeds[start:start + step]
            candidates, failures = synthesizer.run(sampler, batch)
            writer.write(candidates)
            report.add(len(batch), candidates, failures)
            bar.update(len(batch))
            bar.set_postfix(generated=report.generated, kept=report.kept)
        status = "finished"
    finally:  # a failed run still says what it wrote
        bar.close()
        if sampler is not None:
            sampler.close()
        grader.close()
        writer.close()
        result = {"status": status, "seed_data": str(seed_data), **report.as_dict(),
                  "outputs": {k: str(v) for k, v in writer.paths.items()}, "settings": settings.synth.model_dump()}
        writer.paths["report"].write_text(json.dumps(result, indent=2))
        plot_report(report, writer.paths["plot"], f"{Path(seed_data).name}, {mode}: {version}")
    print(report.line())
    print(f"questions: {writer.paths['data']}  rejected: {writer.paths['rejected']}  "
          f"report: {writer.paths['report']}  plot: {writer.paths['plot']}")
    return result
