"""The files of `deploy/` against the code they deploy: no Docker or Kubernetes here, so each
claim the manifests and the Dockerfile make (settings, paths, ports, the command, the grace
period, the user) is checked against the source it must agree with."""

import ast
import json
import logging
import re
import shlex
from pathlib import Path

import pytest
import yaml

from forwarder import settings
from forwarder.app import create_app
from forwarder.fleet.backend_list import DnsName, parse_backend_list
from forwarder.fleet.registry import Registry

ROOT = Path(__file__).resolve().parent.parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
SETTING_NAMES = {s.name for s in settings.SETTINGS}


def gunicorn_config() -> dict:
    """The literal top-level assignments of gunicorn.conf.py (`bind`, `graceful_timeout` …)."""
    tree = ast.parse((ROOT / "gunicorn.conf.py").read_text())
    return {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
            and isinstance(node.value, ast.Constant)}


def bind_port() -> int:
    return int(gunicorn_config()["bind"].rsplit(":", 1)[1])


def dockerfile() -> "list[tuple[str, str]]":
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "deploy" / "Dockerfile").read_text())
    return [tuple(line.split(None, 1)) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def manifests() -> "dict[str, dict]":
    """Every Kubernetes object under deploy/kubernetes, by `Kind/name`."""
    objects = {}
    for path in sorted(KUBERNETES.rglob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            key = f"{document['kind']}/{document['metadata']['name']}"
            assert key not in objects, f"{key} defined twice"
            objects[key] = document
    return objects


@pytest.fixture(scope="module")
def objects():
    return manifests()


@pytest.fixture(scope="module")
def pod(objects):
    return objects["Deployment/vllm-forwarder"]["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def container(pod):
    (forwarder,) = pod["containers"]
    return forwarder


def container_port(container, port):
    """A probe's or Service's port, named or numbered, as the container's port number."""
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    return named[port] if isinstance(port, str) else port


def test_every_environment_variable_set_is_a_real_setting_with_a_valid_value(container):
    env = {item["name"]: item["value"] for item in container["env"]}
    # GUNICORN_CMD_ARGS is gunicorn's own (SPEC, "Start it"); every other one must be ours.
    assert set(env) - {"GUNICORN_CMD_ARGS"} <= SETTING_NAMES
    arguments = shlex.split(env.get("GUNICORN_CMD_ARGS", ""))
    assert not {"-b", "--bind"} & set(arguments), "the probes and Service assume the config's bind"
    for setting in settings.SETTINGS:
        if setting.name in env and setting.name != "IP_LIST_FILE":  # a path inside the pod
            setting.parse(env[setting.name])
    for instruction, arguments in dockerfile():
        if instruction == "ENV":
            names = re.findall(r"(\w+)=", arguments)
            assert names and all(n in SETTING_NAMES or n.startswith("PYTHON") for n in names)


def test_the_backend_list_is_the_configmap_mounted_as_a_directory(objects, pod, container):
    env = {item["name"]: item["value"] for item in container["env"]}
    (volume,) = [v for v in pod["volumes"] if "configMap" in v]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    # A subPath mount never sees ConfigMap updates; the directory mount gets them by a symlink
    # swap, which the poller's re-read of the path follows (tests/e2e/test_discovery.py).
    assert "subPath" not in mount
    configmap = objects[f"ConfigMap/{volume['configMap']['name']}"]
    (key,) = configmap["data"]
    assert env["IP_LIST_FILE"] == f"{mount['mountPath']}/{key}"


def test_the_configmap_list_parses_and_names_the_headless_service(objects, caplog):
    (text,) = objects["ConfigMap/vllm-forwarder-backends"]["data"].values()
    with caplog.at_level(logging.WARNING, logger="forwarder.fleet.backend_list"):
        entries = parse_backend_list(text, "ip.txt", 8101)
    assert not caplog.records, "the shipped ip.txt has lines the forwarder would skip"
    (entry,) = entries
    service = objects["Service/vllm"]["spec"]
    assert service["clusterIP"] == "None", "dns+ needs a headless Service (one record per pod)"
    assert entry == DnsName("vllm", service["ports"][0]["port"])


def test_probes_ask_the_health_endpoint_on_the_port_gunicorn_binds(container, tmp_path):
    ip_file = tmp_path / "ip.txt"
    ip_file.write_text("")
    app = create_app(settings.load({"IP_LIST_FILE": str(ip_file)}), Registry())
    probes = [container[name] for name in ("startupProbe", "readinessProbe", "livenessProbe")]
    for probe in probes:
        path = probe["httpGet"]["path"]
        assert container_port(container, probe["httpGet"]["port"]) == bind_port()
        # Before the first poll cycle the endpoint answers 503: it exists, and is not ready.
        response = app.test_client().get(path)
        assert response.status_code == 503 and response.json["status"] == "starting"


def test_the_service_reaches_the_containers_port(objects, container):
    service = objects["Service/vllm-forwarder"]["spec"]
    assert service["selector"].items() <= \
        objects["Deployment/vllm-forwarder"]["spec"]["template"]["metadata"]["labels"].items()
    (port,) = service["ports"]
    assert container_port(container, port["targetPort"]) == bind_port()


def test_the_grace_period_covers_prestop_and_gunicorns_graceful_timeout(pod, container):
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] >= \
        float(command[1]) + gunicorn_config()["graceful_timeout"]


def test_the_image_runs_the_readmes_command_as_a_non_root_user(pod):
    instructions = dockerfile()
    (base,) = [args for instruction, args in instructions if instruction == "FROM"]
    assert re.fullmatch(r"python:3\.11-slim\S*", base)
    (cmd,) = [json.loads(args) for instruction, args in instructions if instruction == "CMD"]
    readme_lines = (ROOT / "README.md").read_text().splitlines()
    assert shlex.join(cmd) in readme_lines, "the image's command is not the README's"
    (exposed,) = [int(args) for instruction, args in instructions if instruction == "EXPOSE"]
    assert exposed == bind_port()
    (user,) = [args for instruction, args in instructions if instruction == "USER"]
    uid = int(user.split(":")[0])
    assert uid != 0
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == uid
    for instruction, args in instructions:
        if instruction == "COPY":
            *sources, _ = args.split()
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
