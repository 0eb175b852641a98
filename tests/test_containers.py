"""deploy/: the Dockerfile, docker-compose.yml and k8s manifests agree with the entry points.

No Docker engine or cluster runs here, so the files are parsed and checked against the code:
every command is an entry point, every variable is one it reads, ports agree, and each
container's environment, with its mounts filled from files the credentials tool writes, is
accepted by the entry points' own parsers.
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from sigmax_fl.data import BUNDLED
from sigmax_fl.deploy import credentials
from sigmax_fl.deploy.env import (
    APP_VARIABLES,
    CLIENT_VARIABLES,
    DEFAULT_SERVER,
    SERVER_VARIABLES,
    address,
    client_id,
    client_options,
    data_source,
    server_options,
    server_run_config,
)

from .conftest import DATA, ROOT

DEPLOY = ROOT / "deploy"
ENTRY_POINTS = {
    ("python", "-m", "sigmax_fl.deploy.server"): SERVER_VARIABLES,
    ("python", "-m", "sigmax_fl.deploy.client"): CLIENT_VARIABLES,
}
SERVER, CLIENT = ENTRY_POINTS
CREDENTIALS_TOOL = ("python", "-m", "sigmax_fl.deploy.credentials")
PORT = address(DEFAULT_SERVER).port
BUILD_VARIABLES = {
    "PYTHONDONTWRITEBYTECODE",
    "PYTHONUNBUFFERED",
    "PIP_NO_CACHE_DIR",
    "PIP_DISABLE_PIP_VERSION_CHECK",
}


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def _allowed(command: tuple[str, ...]) -> set[str]:
    return set(ENTRY_POINTS[command]) | set(APP_VARIABLES)


def _remap(env: dict[str, str], mounts: dict[str, Path]) -> dict[str, str]:
    """Container paths -> the host folders standing in for their mounts."""
    out = {}
    for name, value in env.items():
        for container, host in mounts.items():
            value = re.sub(rf"(^|,){re.escape(container)}/", rf"\g<1>{host}/", value)
        out[name] = value
    return out


def _names(cert: Path) -> set[str]:
    san = x509.load_pem_x509_certificate(cert.read_bytes()).extensions
    values = san.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(values.get_values_for_type(x509.DNSName)) | {
        str(ip) for ip in values.get_values_for_type(x509.IPAddress)
    }


# --- Dockerfile ---------------------------------------------------------------------


def test_dockerfile_installs_cpu_torch_before_the_project_and_runs_the_server() -> None:
    steps = _dockerfile()
    runs = [args for kind, args in steps if kind == "RUN"]
    torch_step = next(i for i, a in enumerate(runs) if "torch==2.13.0" in a)
    project_step = next(i for i, a in enumerate(runs) if re.search(r"pip install -e \.", a))

    assert steps[0] == ("FROM", "python:3.11-slim")
    assert "--index-url https://download.pytorch.org/whl/cpu" in runs[torch_step]
    assert torch_step < project_step
    assert ("EXPOSE", str(PORT)) in steps
    (cmd,) = [args for kind, args in steps if kind == "CMD"]
    assert tuple(yaml.safe_load(cmd)) == SERVER
    for kind, args in steps:
        if kind == "COPY":
            *sources, _ = shlex.split(args)
            assert all((ROOT / s).exists() for s in sources), args
        if kind == "ENV":
            known = {*SERVER_VARIABLES, *CLIENT_VARIABLES, *APP_VARIABLES, *BUILD_VARIABLES}
            assert set(re.findall(r"(\w+)=", args)) <= known, args
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".credentials", ".flwr-home", "deploy/k8s/certs"} <= set(ignored)


# --- docker-compose.yml ---------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def _volumes(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> volume name."""
    return {v.split(":")[1]: v.split(":")[0] for v in service.get("volumes", [])}


def test_compose_services_run_the_entry_points_with_their_variables(compose) -> None:
    services = compose["services"]
    assert {"fl-server", "fl-client-1", "fl-client-2"} <= set(services)
    assert tuple(services["fl-server"]["command"]) == SERVER
    for name in ("fl-client-1", "fl-client-2"):
        assert tuple(services[name]["command"]) == CLIENT
    for name, service in services.items():
        command = tuple(service["command"])
        if command[:3] == CREDENTIALS_TOOL:
            continue
        assert set(service["environment"]) <= _allowed(command), name
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (DEPLOY / service["build"]["context"] / "deploy" / "Dockerfile").is_file()


def test_compose_ports_addresses_and_data_agree(compose) -> None:
    services = compose["services"]
    server = services["fl-server"]
    bind = address(server["environment"]["FL_SERVER"])
    assert server["ports"] == [f"{bind.port}:{bind.port}"] and bind.port == PORT
    sources = []
    for name in ("fl-client-1", "fl-client-2"):
        target = address(services[name]["environment"]["FL_SERVER"])
        assert (target.host, target.port) == ("fl-server", bind.port)
        sources.append(services[name]["environment"]["DATA_SOURCE"])
    assert len(set(sources)) == 2 and set(sources) <= set(BUNDLED)


def test_compose_environments_pass_the_entry_points_own_checks(compose, tmp_path: Path) -> None:
    # Prepare: run the compose `certs` command with its volume mapped to a folder
    services = compose["services"]
    certs = next(s for s in services.values() if tuple(s["command"][:3]) == CREDENTIALS_TOOL)
    folder = certs["command"][3]
    volume = _volumes(certs)[folder]
    host = tmp_path / volume
    assert credentials.main([str(host), *certs["command"][4:]]) == 0
    mounts = {folder: host}

    # Execute / Assert: the server's environment, as the server parses it
    server = services["fl-server"]
    assert _volumes(server)[folder] == volume
    env = _remap(server["environment"], mounts)
    options = server_options(env, app_dir=ROOT)
    server_run_config(env, ROOT)
    assert options.tls is not None and options.supernode_auth
    authorized = {str(k) for k in options.authorized_keys}
    for name in ("fl-client-1", "fl-client-2"):
        service = services[name]
        assert _volumes(service)[folder] == volume
        env = _remap(service["environment"], mounts)
        opts = client_options(env, client_id(env))
        data_source(env)
        # its key is one the server registers; the certificate names the host it dials
        assert f"{opts.node_key}.pub" in authorized
        assert opts.superlink.host in _names(options.tls.server_cert)


# --- k8s ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def k8s() -> dict[str, Any]:
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    objects: dict[tuple[str, str], dict[str, Any]] = {}
    for resource in kustomization["resources"]:
        for doc in yaml.safe_load_all((DEPLOY / "k8s" / resource).read_text()):
            objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return {"kustomization": kustomization, "objects": objects}


def _generated(kustomization: dict[str, Any]) -> dict[tuple[str, str], dict[str, str]]:
    """(kind, name) -> {key in the object: file the credentials tool writes}."""
    out = {}
    for kind, section in (("Secret", "secretGenerator"), ("ConfigMap", "configMapGenerator")):
        for generator in kustomization[section]:
            out[(kind, generator["name"])] = dict(f.split("=", 1) for f in generator["files"])
    return out


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


def _materialise(
    pod: dict[str, Any], container: dict[str, Any], generated, certs: Path, root: Path
) -> dict[str, Path]:
    """Fill each Secret/ConfigMap mount from the generator's files; container path -> folder."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {}
    for mount in container["volumeMounts"]:
        volume = volumes.get(mount["name"], {})
        source = ("Secret", volume["secret"]["secretName"]) if "secret" in volume else None
        if "configMap" in volume:
            source = ("ConfigMap", volume["configMap"]["name"])
        if source is None:
            continue
        assert source in generated, f"{source} is mounted but never generated"
        folder = root / mount["name"]
        folder.mkdir(parents=True)
        for key, file in generated[source].items():
            shutil.copy(certs / Path(file).relative_to("certs"), folder / key)
        mounts[mount["mountPath"]] = folder
    return mounts


def test_k8s_superlink_deployment_and_service_agree(k8s) -> None:
    objects = k8s["objects"]
    deployment = objects[("Deployment", "sigmax-fl-superlink")]
    service = objects[("Service", "sigmax-fl-superlink")]
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    env = _env(container)

    assert tuple(container["command"]) == SERVER
    assert set(env) <= _allowed(SERVER)
    (port,) = container["ports"]
    assert port["containerPort"] == address(env["FL_SERVER"]).port == PORT
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] in (port["name"], port["containerPort"])
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert deployment["spec"]["selector"]["matchLabels"] == pod["metadata"]["labels"]
    assert env["FL_KEEP_RUNNING"] == "1"  # a Deployment restarts a process that exits
    volumes = pod["spec"]["volumes"]
    claims = [
        v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v
    ]
    assert claims and all(("PersistentVolumeClaim", c) in objects for c in claims)


def test_k8s_only_supernodes_reach_the_superlink_port(k8s) -> None:
    objects = k8s["objects"]
    policy = objects[("NetworkPolicy", "sigmax-fl-superlink")]["spec"]
    superlink = objects[("Deployment", "sigmax-fl-superlink")]["spec"]["template"]
    supernode = objects[("StatefulSet", "sigmax-fl-client")]["spec"]["template"]

    assert policy["podSelector"]["matchLabels"] == superlink["metadata"]["labels"]
    (rule,) = policy["ingress"]
    (source,) = rule["from"]
    assert source["podSelector"]["matchLabels"] == supernode["metadata"]["labels"]
    assert [p["port"] for p in rule["ports"]] == [PORT]


def test_k8s_supernodes_have_stable_identity_own_key_and_own_data(k8s) -> None:
    objects = k8s["objects"]
    sts = objects[("StatefulSet", "sigmax-fl-client")]
    pod = sts["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    env = _env(container)
    service = objects[("Service", "sigmax-fl-superlink")]

    # an entry point reading only its variables (POD_NAME feeds them)
    assert tuple(container["command"]) == CLIENT
    assert set(env) - {"POD_NAME"} <= _allowed(CLIENT)
    pod_name = next(e for e in container["env"] if e["name"] == "POD_NAME")
    assert pod_name["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    # stable identity: a headless governing Service, the pod name as instance id
    headless = objects[("Service", sts["spec"]["serviceName"])]
    assert headless["spec"]["clusterIP"] == "None"
    assert env["FL_CLIENT_ID"] == "$(POD_NAME)"
    # it dials the SuperLink's Service on its port
    target = address(env["FL_SERVER"])
    assert target.host == service["metadata"]["name"]
    assert target.port == service["spec"]["ports"][0]["port"]
    # its own key, from a Secret holding one per replica, named after the pod
    keys = _generated(k8s["kustomization"])[("Secret", "sigmax-fl-node-keys")]
    replicas = [f"{sts['metadata']['name']}-{i}" for i in range(sts["spec"]["replicas"])]
    assert sorted(keys) == sorted(f"{name}.key" for name in replicas)
    assert env["FL_NODE_KEY"].endswith("/$(POD_NAME).key")
    # its own data and state volumes, the init container waiting for the data file
    templates = {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    data_dir = str(Path(env["DATA_SOURCE"]).parent)
    assert mounts[data_dir] in templates and mounts[env["FL_STATE_DIR"]] in templates
    (init,) = pod["spec"]["initContainers"]
    assert env["DATA_SOURCE"] in " ".join(init["command"])


def test_k8s_environments_pass_the_entry_points_own_checks(k8s, tmp_path: Path) -> None:
    # Prepare: the files the README's credentials command writes
    kustomization, objects = k8s["kustomization"], k8s["objects"]
    generated = _generated(kustomization)
    sts = objects[("StatefulSet", "sigmax-fl-client")]
    replicas = [f"{sts['metadata']['name']}-{i}" for i in range(sts["spec"]["replicas"])]
    service = objects[("Service", "sigmax-fl-superlink")]["metadata"]["name"]
    certs = tmp_path / "certs"
    nodes = [arg for name in replicas for arg in ("--node", name)]
    assert credentials.main([str(certs), "--host", service, *nodes]) == 0

    # Execute / Assert: the SuperLink's environment
    pod = objects[("Deployment", "sigmax-fl-superlink")]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mounts = _materialise(pod, container, generated, certs, tmp_path / "superlink")
    env = _remap(_env(container), mounts)
    env["FL_STATE_DIR"] = str(tmp_path / "state")
    options = server_options(env, app_dir=ROOT)
    server_run_config(env, ROOT)
    assert len(options.authorized_keys) == len(replicas)
    assert service in _names(options.tls.server_cert)

    # Execute / Assert: each replica's environment, with its pod name and data file
    pod = sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    for name in replicas:
        root = tmp_path / name
        mounts = _materialise(pod, container, generated, certs, root)
        env = {k: v.replace("$(POD_NAME)", name) for k, v in _env(container).items()}
        data = Path(env["DATA_SOURCE"])
        (root / "data").mkdir()
        shutil.copy(DATA / BUNDLED["coinbase-btc-usd-1d"].file, root / "data" / data.name)
        mounts[str(data.parent)] = root / "data"
        mounts[env["FL_STATE_DIR"]] = root / "state"
        env = _remap(env, mounts)
        env["FL_STATE_DIR"] = str(root / "state")
        assert client_id(env) == name
        opts = client_options(env, name)
        data_source(env)
        assert f"{opts.node_key}.pub".endswith(f"{name}.key.pub")


# --- documentation -------------------------------------------------------------------


def test_docs_list_every_variable_and_say_the_containers_were_not_run() -> None:
    text = (ROOT / "README.md").read_text()
    for name in {*SERVER_VARIABLES, *CLIENT_VARIABLES}:
        assert f"`{name}`" in text, name
    assert "not run against a live" in text
