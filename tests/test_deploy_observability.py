"""Dashboards and alerts against the real services: every metric a panel or an alert names is
exported, and every mmupt metric the services export is on a dashboard.

The services run as `mmupt run` starts them (separate processes, a real Valkey server, the tiny
model); the learner takes a few steps and pushes weights, so labelled series (loss terms, push
outcomes) exist; then each /metrics is scraped and the PromQL of deploy/ is checked against it.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from mmupt.config import load_settings
from mmupt.run import Children, prepare
from mmupt.streams import Streams, connect

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"
RULES = ROOT / "deploy" / "prometheus" / "rules"
# Grafana's variables, replaced by a plain duration so the expression parses as Prometheus sees it.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
# Series Prometheus itself attaches to every target; none of ours are used so far.
PROMETHEUS_OWN = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


@dataclass(frozen=True)
class Selector:
    """A metric a query reads, with the label values it requires (`name{label="value"}`)."""
    name: str
    equals: tuple[tuple[str, str], ...]
    where: str


def selectors(expr: str, where: str) -> list[Selector]:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    found: list[Selector] = []

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"{where}: name the metric, not only its labels: {expr}"
            equals = tuple(sorted((m.name, m.value) for m in node.matchers.matchers
                                  if m.op == promql_parser.MatchOp.Equal and m.name != "__name__"))
            found.append(Selector(node.name, equals, where))

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


def dashboard_selectors(folder: Path = DASHBOARDS) -> list[Selector]:
    out = []
    for path in sorted(folder.glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                out += selectors(target["expr"], f"{path.name}: {panel['title']}")
    return out


def alert_selectors(folder: Path = RULES) -> list[Selector]:
    out = []
    for path in sorted(folder.glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                out += selectors(rule["expr"], f"{path.name}: {rule.get('alert') or rule.get('record')}")
    return out


@dataclass
class Scrape:
    samples: list[tuple[str, dict[str, str]]]   # (sample name, labels) from every service
    family_of: dict[str, str]                    # sample name -> metric family

    @classmethod
    def parse(cls, texts: list[str]) -> "Scrape":
        samples, family_of = [], {}
        for text in texts:
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    samples.append((sample.name, sample.labels))
                    family_of[sample.name] = family.name
        # prometheus_client exposes a counter's or histogram's creation time as its own gauge
        # family `<name>_created`: it belongs to the metric it describes.
        families = set(family_of.values())
        for sample, family in family_of.items():
            if family.endswith("_created") and family.removesuffix("_created") in families:
                family_of[sample] = family.removesuffix("_created")
        return cls(samples, family_of)


def unexported(wanted: list[Selector], scrape: Scrape) -> list[str]:
    """Queries whose metric (with its required label values) no service exports."""
    problems = []
    for sel in wanted:
        if sel.name in PROMETHEUS_OWN:
            continue
        if sel.name not in scrape.family_of:
            problems.append(f"{sel.where}: {sel.name} is not exported")
        elif not any(name == sel.name and all(labels.get(k) == v for k, v in sel.equals)
                     for name, labels in scrape.samples):
            problems.append(f"{sel.where}: no {sel.name} series has {dict(sel.equals)}")
    return problems


def not_on_a_dashboard(scrape: Scrape, wanted: list[Selector]) -> set[str]:
    shown = {scrape.family_of.get(sel.name) for sel in wanted}
    return {family for family in scrape.family_of.values() if family.startswith("mmupt_")} - shown


@pytest.fixture(scope="module")
def scrape(tiny_model_dir, shapes_dir, redis_url, tmp_path_factory) -> Scrape:
    out = tmp_path_factory.mktemp("observability")
    (out / "logs").mkdir()
    settings = load_settings(environ={}, overrides={
        "run_id": f"metrics-{time.time_ns()}", "redis_url": redis_url,
        "model": {"path": str(tiny_model_dir), "device": "cpu"},
        "data": {"train": str(shapes_dir / "train.jsonl"), "eval": str(shapes_dir / "test.jsonl")},
        "rollout": {"group_size": 4, "max_new_tokens": 8},
        # Far more steps than we wait for: the learner must still be up when it is scraped.
        "learner": {"batch_groups": 2, "micro_groups": 1, "max_steps": 1000, "lr": 1e-3},
        "auth": {"token": "test-token"},
    })
    resolved, config_path, env = prepare(settings, out, settings.run_id, redis_url)
    streams = Streams(connect(redis_url), settings.run_id, resolved.streams)
    streams.ensure_groups()
    children = Children(out)
    try:
        for name in ("rollout", "voter", "learner"):
            children.start(name, config_path, env)
        wait_until_trained_and_pushed(children, streams, resolved, steps=2)
        # Prometheus follows the mount's redirect (/metrics -> /metrics/) as we do here.
        replies = [httpx.get(f"http://127.0.0.1:{getattr(resolved, name).http_port}/metrics", timeout=30,
                             follow_redirects=True) for name in ("rollout", "voter", "learner")]
    finally:
        children.stop()
    for reply in replies:
        reply.raise_for_status()
    return Scrape.parse([reply.text for reply in replies])


def wait_until_trained_and_pushed(children: Children, streams: Streams, settings, steps: int,
                                  timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    version_url = f"http://127.0.0.1:{settings.rollout.http_port}/v1/version"
    while time.monotonic() < deadline:
        failed = children.failed()
        assert failed is None, f"the {failed} service exited:\n{children.tail(failed)}"
        if streams.state_int("version") >= steps:
            try:
                if httpx.get(version_url, timeout=5).json()["version"] >= steps:
                    return
            except httpx.HTTPError:
                pass
        time.sleep(0.5)
    raise AssertionError(f"no {steps} steps pushed within {timeout_s}s:\n{children.tail('learner')}")


def test_every_metric_a_dashboard_panel_reads_is_exported(scrape):
    wanted = dashboard_selectors()
    assert len(wanted) > 50
    assert unexported(wanted, scrape) == []


def test_every_metric_an_alert_reads_is_exported(scrape):
    wanted = alert_selectors()
    assert {s.name for s in wanted} >= {"mmupt_learner_steps_total", "mmupt_stream_length"}
    assert unexported(wanted, scrape) == []


def test_every_exported_mmupt_metric_is_on_a_dashboard(scrape):
    assert len({f for f in scrape.family_of.values() if f.startswith("mmupt_")}) > 30
    assert not_on_a_dashboard(scrape, dashboard_selectors()) == set()


def test_the_checks_catch_planted_errors(scrape, tmp_path):
    for path in DASHBOARDS.glob("*.json"):
        (tmp_path / path.name).write_text(path.read_text())
    learner = tmp_path / "mmupt-learner.json"
    text = learner.read_text().replace("mmupt_learner_tokens_total", "mmupt_learner_token_total")
    learner.write_text(text.replace('stat=\\"clip_frac\\"', 'stat=\\"clip_fraction\\"'))
    problems = unexported(dashboard_selectors(tmp_path), scrape)
    assert any("mmupt_learner_token_total is not exported" in p for p in problems)
    assert any("{'stat': 'clip_fraction'}" in p for p in problems)
    # The misspelt metric leaves the real one off every dashboard: caught the other way round too.
    assert not_on_a_dashboard(scrape, dashboard_selectors(tmp_path)) == {"mmupt_learner_tokens"}
    with pytest.raises(ValueError):
        selectors("rate(mmupt_learner_steps_total[5m]", "planted")
