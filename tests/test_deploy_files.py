"""Every deployment file is checked offline by the tool that owns its format, and each check is shown
to catch a planted error in a copy of the file.

Tools: Debian's `docker-compose` and `prometheus` (promtool), installed by .ci/run; `kubectl` (on
the machine image; the Kubernetes tests skip cleanly without it); kubernetes-validate,
check-jsonschema and hadolint from the `test` extra. Metric names are checked against the running
services in test_deploy_observability.py.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from mmupt.config import ConfigError, load_settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = ROOT / "docker-compose.yml"
OVERLAYS = ("cpu-demo", "gpu")
SERVICE_PORTS = {"rollout": 8000, "voter": 8001, "learner": 8002}  # mmupt/config.py defaults


def tool(name: str, apt: str | None = None) -> str:
    """Path of a validator: the venv's scripts first (pytest may run without the venv on PATH)."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        where = f"apt-get install {apt}" if apt else "pip install -e '.[test]'"
        pytest.skip(f"{name} is not installed ({where})")
    return found


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=120)


def copy_tree(tmp_path: Path) -> Path:
    """A scratch copy of what the deployment files reference, to plant errors in."""
    dst = tmp_path / "repo"
    shutil.copytree(DEPLOY, dst / "deploy", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(COMPOSE, dst / "docker-compose.yml")
    return dst


def plant(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"cannot plant the error: {old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


# ---- docker-compose ------------------------------------------------------------------------------

def compose_checks(compose_file: Path) -> list[subprocess.CompletedProcess]:
    """Debian's docker-compose (1.29 schema) and the current Compose Specification schema."""
    return [run(tool("docker-compose", "docker-compose"), "-f", str(compose_file), "config", "-q"),
            run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(compose_file))]


def test_compose_file_is_valid():
    for result in compose_checks(COMPOSE):
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("old,new", [
    ("condition: service_healthy", "condition: service_healty"),   # a misspelt depends_on condition
    ("    healthcheck:\n      test: [\"CMD\", \"valkey-cli\"", "    healthchek:\n      test: [\"CMD\", \"valkey-cli\""),
])
def test_compose_checks_catch_planted_errors(tmp_path, old, new):
    repo = copy_tree(tmp_path)
    plant(repo / "docker-compose.yml", old, new)
    for result in compose_checks(repo / "docker-compose.yml"):
        assert result.returncode != 0, f"{result.args[0]} accepted a broken file"


def compose_services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def test_compose_services_are_wired_to_their_config():
    """Health checks ask the port the service listens on; MMUPT_ variables are real config fields."""
    for name, svc in compose_services().items():
        command = svc.get("command", [])
        if not command or command[0] not in SERVICE_PORTS:
            continue
        role = command[0]
        env = {k: v for k, v in svc["environment"].items() if k.startswith("MMUPT_")}
        env = {k: re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(v)) for k, v in env.items()}  # compose defaults
        settings = load_settings(ROOT / command[command.index("--config") + 1], environ=env)
        port = getattr(settings, role).http_port
        assert f"127.0.0.1:{port}/readyz" in " ".join(svc["healthcheck"]["test"]), name
        assert getattr(settings, role).host == "0.0.0.0", f"{name} must listen beyond its container"
        assert all(dep["condition"] for dep in svc["depends_on"].values()), name
        if role != "voter":
            assert env["MMUPT_AUTH__TOKEN_FILE"] == "/run/secrets/mmupt_token" and "mmupt_token" in svc["secrets"]


def test_compose_references_files_that_exist():
    spec = yaml.safe_load(COMPOSE.read_text())
    for svc in spec["services"].values():
        if "build" in svc:
            assert (ROOT / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), source
    for secret in spec["secrets"].values():
        assert (ROOT / secret["file"]).is_file()


# ---- configuration files ----------------------------------------------------------------------------

def test_deploy_configs_load(tmp_path):
    settings = load_settings(DEPLOY / "config" / "gpu.yaml", environ={})
    assert settings.rollout.backend == "vllm" and settings.model.dtype == "bfloat16"
    broken = tmp_path / "gpu.yaml"
    broken.write_text((DEPLOY / "config" / "gpu.yaml").read_text().replace("batch_groups:", "batch_group:"))
    with pytest.raises(ConfigError, match="learner.batch_group"):
        load_settings(broken, environ={})


# ---- Kubernetes ------------------------------------------------------------------------------------

def render(kustomization: Path) -> subprocess.CompletedProcess:
    return run(tool("kubectl"), "kustomize", str(kustomization))


def k8s_validate(manifests: str, tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "rendered.yaml"
    path.write_text(manifests)
    return run(tool("kubernetes-validate"), "--strict", "--quiet", str(path))


def rendered(overlay: str) -> list[dict]:
    result = render(DEPLOY / "k8s" / "overlays" / overlay)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates(overlay, tmp_path):
    result = render(DEPLOY / "k8s" / "overlays" / overlay)
    assert result.returncode == 0, result.stderr
    checked = k8s_validate(result.stdout, tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_kubernetes_checks_catch_planted_errors(tmp_path):
    repo = copy_tree(tmp_path)
    base = repo / "deploy" / "k8s" / "base"
    # A misspelt field: kustomize renders it, the strict schema check refuses it.
    plant(base / "voter.yaml", "readinessProbe:", "readinesProbe:")
    result = render(repo / "deploy" / "k8s" / "overlays" / "cpu-demo")
    assert result.returncode == 0, result.stderr
    assert k8s_validate(result.stdout, tmp_path).returncode != 0
    # A wrong type.
    plant(base / "voter.yaml", "readinesProbe:", "readinessProbe:")
    plant(base / "rollout.yaml", "replicas: 1", "replicas: one")
    result = render(repo / "deploy" / "k8s" / "overlays" / "cpu-demo")
    assert result.returncode == 0, result.stderr
    assert k8s_validate(result.stdout, tmp_path).returncode != 0
    # A resource the kustomization names but that does not exist: kustomize itself fails.
    plant(base / "kustomization.yaml", "  - voter.yaml", "  - votr.yaml")
    assert render(repo / "deploy" / "k8s" / "overlays" / "cpu-demo").returncode != 0


def containers(docs: list[dict]):
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
            for c in doc["spec"]["template"]["spec"]["containers"]:
                yield doc, c


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_probe_and_expose_the_service_ports(overlay):
    docs = rendered(overlay)
    env_map = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("mmupt-env"))
    seen = set()
    for doc, c in containers(docs):
        role = c["name"]
        if role not in SERVICE_PORTS:
            continue
        seen.add(role)
        env = dict(env_map["data"]) | {e["name"]: e.get("value", "10.0.0.1") for e in c.get("env", [])}
        env.pop("MMUPT_AUTH__TOKEN_FILE", None)  # the Secret is mounted only in the cluster
        settings = load_settings(ROOT / c["args"][c["args"].index("--config") + 1], environ=env)
        section = getattr(settings, role)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["http"] == section.http_port and section.host == "0.0.0.0"
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        notes = doc["spec"]["template"]["metadata"]["annotations"]
        assert notes["prometheus.io/scrape"] == "true" and int(notes["prometheus.io/port"]) == section.http_port
        if role == "rollout":
            assert ports["grpc"] == section.grpc_port
        if role != "voter":
            mounts = {m["mountPath"] for m in c["volumeMounts"]}
            assert "/var/run/secrets/mmupt" in mounts
            assert any(e["name"] == "MMUPT_AUTH__TOKEN_FILE" for e in c["env"])
    assert seen == set(SERVICE_PORTS)


def test_gpu_overlay_requests_gpus():
    for doc, c in containers(rendered("gpu")):
        gpus = c["resources"].get("limits", {}).get("nvidia.com/gpu")
        assert (gpus == 1) == (c["name"] in ("rollout", "learner")), c["name"]


def test_only_the_learner_reaches_the_weight_sync_port():
    docs = rendered("cpu-demo")
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "rollout-weight-sync")
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "rollout"
    for rule in policy["spec"]["ingress"]:
        ports = {p["port"] for p in rule["ports"]}
        if "grpc" in ports:
            assert [f["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for f in rule["from"]] == ["learner"]
        else:
            assert ports == {"http"}


# ---- Prometheus ------------------------------------------------------------------------------------

PROM = DEPLOY / "prometheus"


def promtool(*args: str, cwd: Path = PROM) -> subprocess.CompletedProcess:
    return run(tool("promtool", "prometheus"), *args, cwd=cwd)


def test_prometheus_config_rules_and_rule_tests_pass():
    for args in (("check", "config", "prometheus.yml"), ("check", "rules", "rules/mmupt.yml"),
                 ("test", "rules", "tests/mmupt_test.yml")):
        result = promtool(*args)
        assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_catches_planted_errors(tmp_path):
    prom = copy_tree(tmp_path) / "deploy" / "prometheus"
    plant(prom / "prometheus.yml", "scrape_interval: 15s", "scrape_interval: 15 seconds")
    assert promtool("check", "config", "prometheus.yml", cwd=prom).returncode != 0
    # A PromQL syntax error.
    rules = prom / "rules" / "mmupt.yml"
    original = rules.read_text()
    plant(rules, "increase(mmupt_weight_push_failures_total[10m]) > 0", "increase(mmupt_weight_push_failures_total[10m] > 0")
    assert promtool("check", "rules", "rules/mmupt.yml", cwd=prom).returncode != 0
    # A rule that still parses but no longer does its job: the unit tests notice.
    rules.write_text(original)
    plant(rules, "sum(rate(mmupt_voter_responses_total[15m])) > 0.5", "sum(rate(mmupt_voter_responses_total[15m])) > 0.9")
    result = promtool("test", "rules", "tests/mmupt_test.yml", cwd=prom)
    assert result.returncode != 0 and "MmuptVoterNoAnswerRateHigh" in result.stdout + result.stderr


def test_every_alert_has_a_unit_test():
    rules = yaml.safe_load((PROM / "rules" / "mmupt.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load((PROM / "tests" / "mmupt_test.yml").read_text())["tests"]
    fired = {t["alertname"] for case in tests for t in case["alert_rule_test"] if t["exp_alerts"]}
    quiet = {t["alertname"] for case in tests for t in case["alert_rule_test"] if not t["exp_alerts"]}
    assert alerts == fired == quiet, "each alert needs a firing and a quiet case"
    required = {"MmuptLearnerStalled", "MmuptVersionLagHigh", "MmuptDeadLetterGrowing", "MmuptWeightPushFailing",
                "MmuptVoterNoAnswerRateHigh", "MmuptMajorityCollapse", "MmuptStreamBacklogGrowing"}
    assert required <= alerts


def test_compose_scrapes_every_service_by_a_name_compose_resolves():
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    names = {n for job in config["scrape_configs"] for sd in job["dns_sd_configs"] for n in sd["names"]}
    services = compose_services()
    aliases = {a for s in services.values() for net in (s.get("networks") or {}).values() for a in net["aliases"]}
    assert names == set(SERVICE_PORTS) and names <= set(services) | aliases
    ports = {sd["names"][0]: sd["port"] for job in config["scrape_configs"] for sd in job["dns_sd_configs"]}
    assert ports == SERVICE_PORTS


# ---- Grafana ----------------------------------------------------------------------------------------

GRAFANA = DEPLOY / "grafana"


def dashboard_errors(folder: Path) -> list[str]:
    """Structural problems Grafana would trip on: bad JSON, clashing uids or panel ids, overlaps."""
    errors, uids = [], set()
    for path in sorted(folder.glob("*.json")):
        try:
            board = json.loads(path.read_text())
        except ValueError as exc:
            errors.append(f"{path.name}: not JSON: {exc}")
            continue
        if board.get("uid") in uids or not board.get("uid"):
            errors.append(f"{path.name}: missing or duplicate uid {board.get('uid')!r}")
        uids.add(board.get("uid"))
        ids, cells = set(), set()
        for panel in board.get("panels", []):
            if panel.get("id") in ids:
                errors.append(f"{path.name}: duplicate panel id {panel.get('id')}")
            ids.add(panel.get("id"))
            if not panel.get("targets") or any(not t.get("expr") for t in panel["targets"]):
                errors.append(f"{path.name}: panel {panel.get('title')!r} has no query")
            if len({t["refId"] for t in panel.get("targets", [])}) != len(panel.get("targets", [])):
                errors.append(f"{path.name}: panel {panel.get('title')!r} repeats a refId")
            g = panel["gridPos"]
            if g["x"] + g["w"] > 24:
                errors.append(f"{path.name}: panel {panel.get('title')!r} is wider than the grid")
            cell = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
            if cell & cells:
                errors.append(f"{path.name}: panel {panel.get('title')!r} overlaps another")
            cells |= cell
    return errors


def test_dashboards_are_well_formed_and_up_to_date():
    assert dashboard_errors(GRAFANA / "dashboards") == []
    result = run(sys.executable, str(GRAFANA / "build_dashboards.py"), "--check")
    assert result.returncode == 0, result.stderr


def test_dashboard_checks_catch_planted_errors(tmp_path):
    folder = copy_tree(tmp_path) / "deploy" / "grafana" / "dashboards"
    plant(folder / "mmupt-voter.json", '"id": 2,', '"id": 1,')
    (folder / "mmupt-rollout.json").write_text((folder / "mmupt-rollout.json").read_text()[:-10])
    errors = dashboard_errors(folder)
    assert any("duplicate panel id 1" in e for e in errors) and any("not JSON" in e for e in errors)
    # Editing a generated file by hand (instead of build_dashboards.py) is caught too.
    board = folder.parent / "build_dashboards.py"
    result = run(sys.executable, str(board), "--check")
    assert result.returncode != 0 and "mmupt-rollout.json" in result.stderr


def test_grafana_provisioning_points_at_the_dashboards_and_prometheus():
    datasource = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "mmupt.yml").read_text())["providers"][0]
    grafana = compose_services()["grafana"]
    mounts = dict(v.split(":")[:2][::-1] for v in grafana["volumes"])
    assert mounts[provider["options"]["path"]] == "./deploy/grafana/dashboards"
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"


# ---- images -----------------------------------------------------------------------------------------

DOCKERFILES = sorted((DEPLOY / "docker").glob("Dockerfile.*"))


def hadolint(dockerfile: Path) -> subprocess.CompletedProcess:
    return run(tool("hadolint"), "--config", str(DEPLOY / "docker" / ".hadolint.yaml"), str(dockerfile))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_lints_clean_and_matches_the_project(dockerfile):
    result = hadolint(dockerfile)
    assert result.returncode == 0, result.stdout + result.stderr
    text = dockerfile.read_text()
    assert 'ENTRYPOINT ["mmupt"]' in text
    for source in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, flags=re.M):
        for path in source.split():
            assert (ROOT / path).exists(), f"{dockerfile.name} copies {path}, which does not exist"
    pins = {re.split(r"==", d)[0]: d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
            if d.startswith(("torch==", "torchvision=="))}
    for pin in re.findall(r"\b(torch(?:vision)?==[\w.]+)", text):
        assert pin == pins[pin.split("==")[0]], f"{dockerfile.name} pins {pin}, pyproject {pins}"
    for config in re.findall(r"--config\", \"([^\"]+)\"", text):
        load_settings(ROOT / config, environ={})


def test_hadolint_catches_planted_errors(tmp_path):
    broken = tmp_path / "Dockerfile"
    text = (DEPLOY / "docker" / "Dockerfile.cpu").read_text()
    broken.write_text(text.replace('ENTRYPOINT ["mmupt"]', "ENTRYPOINT mmupt"))  # shell form: signals get lost
    assert hadolint(broken).returncode != 0
    broken.write_text(text.replace("WORKDIR /app", "WORKDIRR /app"))
    assert hadolint(broken).returncode != 0


def test_vllm_image_requirements_leave_out_torch():
    sys.path.insert(0, str(DEPLOY / "docker"))
    try:
        from requirements import requirements
    finally:
        sys.path.pop(0)
    reqs = requirements({"torch", "torchvision"})
    assert not any(r.startswith(("torch==", "torchvision==")) for r in reqs)
    assert "deepspeed==0.19.8" in reqs and any(r.startswith("transformers") for r in reqs)
