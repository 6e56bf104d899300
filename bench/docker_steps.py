"""Run the Dockerfile's build and start steps without a docker engine, then check the server.

No docker engine runs on the development machines, so this script reads ``Dockerfile`` and
replays one target's stages (default ``cpu``) in a temporary root: every absolute path the
Dockerfile uses (``/opt/venv``, ``/wheels``, ``/src``, ``/data``...) becomes ``ROOT/<path>``,
``COPY`` copies from the build context filtered by ``.dockerignore``, ``ARG``/``ENV`` become the
environment of each ``RUN``, and each ``RUN`` line runs through ``/bin/sh -c`` as written.
Then it starts ``ENTRYPOINT + CMD`` the way the container would (image ``ENV`` only, as the
image's ``USER`` when this script runs as root, on 127.0.0.1 and a free port with an API-keys
file), waits for ``GET /health``, runs the ``HEALTHCHECK`` command, checks auth and one chat
completion, sends SIGTERM and checks the exit status; last it lists what the server wrote
outside ``LORADOCK_HOME``.

What it cannot do, and says so in its report: base images (the local Python stands in for
``python:3.11-slim``), ``apt-get`` and ``useradd`` steps (skipped), and the ``cuda`` target
(``--resolve-cuda`` only checks that its pip requirements resolve together for Python 3.12).
Substitutions: llama-cpp-python is taken from the Makefile's wheelhouse when built there
(``--compile-llama`` compiles it as the Dockerfile does), and torch comes from this machine's
pip configuration instead of ``TORCH_INDEX_URL`` unless ``--torch-index-url`` is given.

    python3 bench/docker_steps.py                      # cpu target, report on stdout
    python3 bench/docker_steps.py --json out/docker_steps.json --keep
"""

from __future__ import annotations

import argparse
import fnmatch
import glob
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WHEELHOUSE = Path(os.environ.get("WHEELHOUSE", Path.home() / ".cache/loradock/wheels"))
DOCKER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SYSTEM_COMMANDS = ("apt-get", "groupadd", "useradd")
API_KEY = "sk-docker-steps-admin-0123456789"
_PATH_RE = re.compile(r"(?<![\w.:/-])(/(?:opt|wheels|src|data|etc/loradock|tmp/convert-home|"
                      r"home/loradock)(?:/[\w.*@+-]*)*)(?![\w.-])")


# -- parsing ------------------------------------------------------------------------------------

@dataclass
class Instruction:
    keyword: str
    args: str
    line: int
    flags: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class Stage:
    name: str
    image: str
    instructions: list[Instruction] = field(default_factory=list)


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Return (global ARG defaults, stages) of a Dockerfile; continuation lines joined."""
    logical: list[tuple[int, str]] = []
    buffer, start = "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line.startswith("#") or (not line and buffer):
            continue
        if not buffer:
            start = number
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        if buffer + line:
            logical.append((start, buffer + line))
        buffer = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for number, line in logical:
        keyword, _, rest = line.partition(" ")
        inst = Instruction(keyword.upper(), rest.strip(), number)
        while inst.args.startswith("--"):
            flag, _, remainder = inst.args.partition(" ")
            key, _, value = flag[2:].partition("=")
            inst.flags.setdefault(key, []).append(value)
            inst.args = remainder.strip()
        if inst.keyword == "FROM":
            parts = inst.args.split()
            image = _expand(parts[0], global_args)
            name = parts[2] if len(parts) > 2 and parts[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name, image))
        elif not stages:
            if inst.keyword == "ARG":
                key, value = _split_assignment(inst.args)
                global_args[key] = value or ""
        else:
            stages[-1].instructions.append(inst)
    return global_args, stages


def _split_assignment(text: str) -> tuple[str, str | None]:
    token = shlex.split(text)[0]
    key, eq, value = token.partition("=")
    return key, (value if eq else None)


def _expand(text: str, env: dict[str, str]) -> str:
    """Docker-style ``$VAR`` / ``${VAR}`` substitution (for FROM and ENV values)."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), ""), text)


def exec_form(inst: Instruction) -> list[str]:
    """The JSON array of an ENTRYPOINT/CMD/HEALTHCHECK CMD (shell form is refused)."""
    args = inst.args
    if inst.keyword == "HEALTHCHECK":
        assert args.startswith("CMD "), f"line {inst.line}: HEALTHCHECK must use CMD"
        args = args[4:]
    value = json.loads(args)
    assert isinstance(value, list), f"line {inst.line}: use the exec (JSON) form"
    return value


def stage_deps(stage: Stage, names: set[str]) -> set[str]:
    """Names of the stages this stage copies or mounts from (or is built FROM)."""
    deps = {stage.image} & names
    for inst in stage.instructions:
        deps.update(v for v in inst.flags.get("from", []) if v in names)
        for mount in inst.flags.get("mount", []):
            deps.update(kv[5:] for kv in mount.split(",") if kv.startswith("from=") and
                        kv[5:] in names)
    return deps


def target_stages(stages: list[Stage], target: str) -> list[Stage]:
    """The target stage and every stage it needs, in file order."""
    by_name = {s.name: s for s in stages}
    needed, todo = set(), [target]
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo.extend(stage_deps(by_name[name], set(by_name)))
    return [s for s in stages if s.name in needed]


def dockerignore_allows(rel: str, rules: list[str]) -> bool:
    """Docker's .dockerignore matching (last matching rule wins; ``!`` re-includes)."""
    allowed = True
    for rule in rules:
        negate = rule.startswith("!")
        pattern = rule[1:] if negate else rule
        pattern = pattern.rstrip("/")
        candidates = [pattern] + ([pattern[3:]] if pattern.startswith("**/") else [])
        parts = rel.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        hit = any(fnmatch.fnmatchcase(p, c) for c in candidates for p in prefixes)
        if pattern.startswith("**/"):
            hit = hit or any(fnmatch.fnmatchcase(part, pattern[3:]) for part in parts)
        if hit:
            allowed = negate
    return allowed


def stand_in_python() -> str:
    """The local interpreter standing in for the image's: Debian's when present (like the
    image's, it is readable by the unprivileged user), else the one running this script."""
    debian = Path("/usr/bin/python3.11")
    return str(debian) if debian.exists() else os.path.realpath(sys._base_executable)


# -- replaying the build ------------------------------------------------------------------------

@dataclass
class Replay:
    root: Path
    build_args: dict[str, str]
    compile_llama: bool = False
    log: list[dict] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    stage_env: dict[str, dict[str, str]] = field(default_factory=dict)
    user: str = "root"

    def path(self, text: str) -> str:
        return _PATH_RE.sub(lambda m: str(self.root) + m.group(1), text)

    def record(self, stage: Stage, inst: Instruction, action: str, seconds: float = 0.0,
               note: str = "") -> None:
        entry = {"stage": stage.name, "line": inst.line, "instruction": inst.keyword,
                 "action": action, "seconds": round(seconds, 1), "note": note}
        self.log.append(entry)
        print(f"[{stage.name}:{inst.line}] {inst.keyword} {action} {note}".rstrip(), flush=True)

    def run_stage(self, stage: Stage, global_args: dict[str, str]) -> None:
        shim = self.root / ".shim"
        shim.mkdir(parents=True, exist_ok=True)
        for name in ("python", "python3"):
            link = shim / name
            if not link.exists():
                link.symlink_to(stand_in_python())
        self.env = {"PATH": f"{shim}:{DOCKER_PATH}", "HOME": "/root"}
        self.user = "root"
        cwd = self.root
        for inst in stage.instructions:
            kw = inst.keyword
            if kw == "ARG":
                key, default = _split_assignment(inst.args)
                value = self.build_args.get(key, default if default is not None
                                            else global_args.get(key, ""))
                self.env[key] = value
            elif kw == "ENV":
                for token in shlex.split(inst.args):
                    key, _, value = token.partition("=")
                    self.env[key] = self.path(_expand(value, self.env))
            elif kw == "WORKDIR":
                cwd = Path(self.path(inst.args)) if inst.args.startswith("/") else cwd / inst.args
                cwd.mkdir(parents=True, exist_ok=True)
            elif kw == "COPY":
                self.copy(stage, inst, cwd)
                continue
            elif kw == "RUN":
                self.run(stage, inst, cwd)
                continue
            elif kw == "USER":
                self.user = inst.args
            self.record(stage, inst, "applied")
        self.stage_env[stage.name] = dict(self.env, USER=self.user, WORKDIR=str(cwd))

    def copy(self, stage: Stage, inst: Instruction, cwd: Path) -> None:
        *sources, dest = shlex.split(inst.args)
        target = Path(self.path(dest)) if dest.startswith("/") else cwd / dest
        if inst.flags.get("from"):
            for src in sources:
                if Path(self.path(src)) != target:
                    shutil.copytree(self.path(src), target, dirs_exist_ok=True)
            self.record(stage, inst, "applied", note="(same path in the replay root)")
            return
        rules = [r.strip() for r in (REPO / ".dockerignore").read_text().splitlines()
                 if r.strip() and not r.strip().startswith("#")]
        copied = 0
        for src in sources:
            base = REPO / src
            files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
            for file in files:
                rel = file.relative_to(REPO).as_posix()
                if not dockerignore_allows(rel, rules):
                    continue
                out = target / file.name if base.is_file() else target / file.relative_to(base)
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, out)
                copied += 1
        assert copied, f"line {inst.line}: COPY {inst.args} copied nothing (.dockerignore?)"
        self.record(stage, inst, "applied", note=f"{copied} files")

    def run(self, stage: Stage, inst: Instruction, cwd: Path) -> None:
        command = inst.args
        if command.split()[0] in SYSTEM_COMMANDS:
            self.record(stage, inst, "skipped", note="system step (needs the base image/root)")
            return
        if "llama-cpp-python==" in command and not self.compile_llama:
            version = self.env.get("LLAMA_CPP_VERSION", "")
            cached = sorted(WHEELHOUSE.glob(f"llama_cpp_python-{version}-*.whl"))
            if cached:
                wheels = self.root / "wheels"
                wheels.mkdir(parents=True, exist_ok=True)
                shutil.copy2(cached[-1], wheels)
                self.record(stage, inst, "substituted",
                            note=f"reused {cached[-1].name} from {WHEELHOUSE} (no compile)")
                return
        if "--index-url" in command and not self.env.get("TORCH_INDEX_URL"):
            command = command.replace('--index-url "${TORCH_INDEX_URL}"', "")
            note = "torch from this machine's pip configuration (TORCH_INDEX_URL unset)"
        else:
            note = ""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("LORADOCK_", "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"))}
        env.update(self.env)
        started = time.monotonic()
        out = subprocess.run(["nice", "-n", "15", "/bin/sh", "-c", self.path(command)],
                             cwd=cwd, env=env, capture_output=True, text=True)
        seconds = time.monotonic() - started
        if out.returncode != 0:
            sys.stderr.write(out.stdout[-4000:] + out.stderr[-4000:])
            self.record(stage, inst, "FAILED", seconds, f"exit {out.returncode}")
            raise SystemExit(f"RUN at Dockerfile line {inst.line} failed")
        last = (out.stdout.strip().splitlines() or [""])[-1][:120]
        self.record(stage, inst, "ran", seconds, note or last)


# -- starting the image's entry point -----------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(url: str, *, key: str | None = None, body: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode() if body else None)
    request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, {}


def listing(path: Path) -> list[str]:
    if not path.exists():
        return []
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*"))


def peak_rss_mb(session: int) -> float:
    """Largest peak resident set (VmHWM) among the processes of one session."""
    peak = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) != session:
                continue
            status = (stat.parent / "status").read_text()
        except (OSError, IndexError, ValueError):
            continue
        match = re.search(r"VmHWM:\s+(\d+) kB", status)
        peak = max(peak, int(match.group(1)) if match else 0)
    return round(peak / 1024, 1)


def start_and_check(replay: Replay, stage: Stage, start_timeout_s: float) -> dict:
    """Start ENTRYPOINT + CMD as the container would; return the checks' results."""
    env_img = replay.stage_env[stage.name]
    insts = {i.keyword: i for i in stage.instructions}
    argv = exec_form(insts["ENTRYPOINT"]) + exec_form(insts["CMD"])
    health_cmd = exec_form(insts["HEALTHCHECK"])
    port = free_port()
    notes: list[str] = []
    if argv[0] == "tini" and shutil.which("tini") is None:
        argv = argv[argv.index("--") + 1:] if "--" in argv else argv[1:]
        notes.append("tini not installed here: started loradock directly (signals go to it)")
    argv = [replay.path(a) for a in argv]
    argv[argv.index("--host") + 1] = "127.0.0.1"
    argv[argv.index("--port") + 1] = str(port)
    health_cmd = [replay.path(a).replace(":8000/", f":{port}/") for a in health_cmd]
    uid, _, gid = env_img["USER"].partition(":")
    as_user = os.geteuid() == 0 and uid not in ("root", "0") and shutil.which("setpriv")
    owner = (int(uid), int(gid or uid)) if as_user else (os.getuid(), os.getgid())
    home = Path(replay.path("/home/loradock"))
    tmp = replay.root / "tmp"
    keys = Path(replay.path("/etc/loradock/api-keys.yaml"))
    data = Path(env_img["LORADOCK_HOME"])
    for folder in (home, tmp, data, keys.parent):
        folder.mkdir(parents=True, exist_ok=True)
    keys.write_text(f"{API_KEY}:\n  name: docker-steps\n  admin: true\n  adapters: ['*']\n")
    os.chmod(replay.root, 0o755)
    os.chmod(tmp, 0o1777)
    for folder in (home, data):
        os.chown(folder, *owner)
    env = {k: v for k, v in env_img.items() if k not in ("USER", "WORKDIR")}
    env.update(HOME=str(home), TMPDIR=str(tmp), LANG="C.UTF-8")
    env["PATH"] = env["PATH"].replace(str(replay.root / ".shim") + ":", "")
    prefix = ["setpriv", f"--reuid={owner[0]}", f"--regid={owner[1]}", "--clear-groups"]
    prefix = prefix if as_user else []
    if not as_user:
        notes.append("not root: server ran as the current user, not the image's USER")
    cache = Path(env_img["LORADOCK_CACHE"])
    cache_before = listing(cache)
    print("starting:", shlex.join(argv), flush=True)
    started = time.monotonic()
    log_path = replay.root / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(prefix + argv, env=env, cwd=env_img["WORKDIR"], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    checks: dict[str, object] = {"argv": prefix + argv, "as_user": owner[0], "notes": notes}
    status, body = 0, {}
    while time.monotonic() - started < start_timeout_s and proc.poll() is None:
        status, body = http(url + "/health")
        if status == 200:
            break
        time.sleep(1)
    checks["health_status"] = status
    checks["health_body"] = body
    checks["ready_s"] = round(time.monotonic() - started, 1)
    try:
        if status == 200:
            hc = subprocess.run(prefix + health_cmd, env=env, capture_output=True, timeout=30)
            checks["healthcheck_exit"] = hc.returncode
            checks["models_without_key"] = http(url + "/v1/models")[0]
            code, models = http(url + "/v1/models", key=API_KEY)
            checks["models_with_key"] = code
            checks["models_listed"] = [m.get("id") for m in models.get("data", [])]
            code, reply = http(url + "/v1/chat/completions", key=API_KEY, body={
                "model": "smollm2", "max_tokens": 4, "temperature": 0,
                "messages": [{"role": "user", "content": "Say hi."}]})
            checks["chat_status"] = code
            checks["chat_text"] = (reply.get("choices") or [{}])[0].get("message", {}).get(
                "content")
    finally:
        checks["peak_rss_mb"] = peak_rss_mb(proc.pid)
        if proc.poll() is None:
            stop = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            try:
                checks["exit_code"] = proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                checks["exit_code"] = "killed after 90 s"
            checks["stop_s"] = round(time.monotonic() - stop, 1)
        else:
            checks["exit_code"] = f"exited early with {proc.returncode}"
    checks["cache_unchanged"] = listing(cache) == cache_before
    checks["written_home"] = listing(home)[:40]
    checks["written_tmp"] = listing(tmp)[:40]
    checks["written_data"] = [p for p in listing(data) if p.count("/") < 2]
    checks["log_tail"] = log_path.read_text()[-1500:]
    return checks


def resolve_cuda(replay: Replay, stage: Stage) -> dict:
    """Dry-run the cuda stage's pip requirements together for Python 3.12 (no install)."""
    reqs: list[str] = []
    for inst in stage.instructions:
        if inst.keyword != "RUN" or "pip install" not in inst.args:
            continue
        for part in inst.args.split("&&"):
            words = shlex.split(_expand(part, {**replay.env, **_stage_args(stage)}))
            if words[:2] != ["pip", "install"] or "--no-deps" in words:
                continue
            for word in words[2:]:
                if not word.startswith("-"):
                    reqs.extend(glob.glob(replay.path(word)) if word.startswith("/") else [word])
    report = replay.root / "cuda-resolve.json"
    # Ubuntu 24.04's glibc 2.39 runs every manylinux tag up to 2.39 (older pips do not expand it).
    tags = [f"manylinux_2_{minor}_x86_64" for minor in range(17, 40)]
    tags += ["manylinux2014_x86_64", "linux_x86_64"]
    platforms = [arg for tag in tags for arg in ("--platform", tag)]
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--target",
           str(replay.root / "cuda-target"), "--report", str(report), "--python-version", "3.12",
           "--only-binary=:all:", *platforms, *reqs]
    started = time.monotonic()
    out = subprocess.run(["nice", "-n", "15", *cmd], capture_output=True, text=True)
    result: dict[str, object] = {"requirements": [Path(r).name for r in reqs],
                                 "exit": out.returncode,
                                 "seconds": round(time.monotonic() - started, 1)}
    if out.returncode == 0:
        installed = json.loads(report.read_text())["install"]
        versions = {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"]
                    for i in installed}
        result["packages"] = len(versions)
        result["resolved"] = {k: versions.get(k) for k in (
            "torch", "vllm", "transformers", "bitsandbytes", "peft", "llama-cpp-python",
            "loradock")}
    else:
        result["error"] = out.stderr[-2000:]
    return result


def _stage_args(stage: Stage) -> dict[str, str]:
    args = {}
    for inst in stage.instructions:
        if inst.keyword == "ARG":
            key, value = _split_assignment(inst.args)
            args[key] = value or ""
    return args


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="cpu")
    parser.add_argument("--json", type=Path, help="Write the report here.")
    parser.add_argument("--keep", action="store_true", help="Keep the replay root.")
    parser.add_argument("--compile-llama", action="store_true",
                        help="Compile llama-cpp-python as the Dockerfile does (minutes).")
    parser.add_argument("--torch-index-url", default="",
                        help="Use this torch index (default: this machine's pip config).")
    parser.add_argument("--resolve-cuda", action="store_true",
                        help="Also dry-run-resolve the cuda target's pip requirements.")
    parser.add_argument("--start-timeout-s", type=float, default=600.0)
    opts = parser.parse_args()
    global_args, stages = parse_dockerfile((REPO / "Dockerfile").read_text())
    root = Path(tempfile.mkdtemp(prefix="loradock-docker-steps-"))
    replay = Replay(root, {"TORCH_INDEX_URL": opts.torch_index_url}, opts.compile_llama)
    report: dict[str, object] = {"target": opts.target, "root": str(root)}
    started = time.monotonic()
    ok = False
    try:
        for stage in target_stages(stages, opts.target):
            print(f"== stage {stage.name} (FROM {stage.image}: {stand_in_python()} "
                  "stands in)", flush=True)
            replay.run_stage(stage, global_args)
        report["build_s"] = round(time.monotonic() - started, 1)
        final = next(s for s in stages if s.name == opts.target)
        checks = start_and_check(replay, final, opts.start_timeout_s)
        report["checks"] = checks
        ok = (checks["health_status"] == 200 and checks.get("healthcheck_exit") == 0
              and checks.get("models_without_key") == 401 and checks.get("models_with_key") == 200
              and checks.get("chat_status") == 200 and checks["exit_code"] == 0
              and checks["cache_unchanged"])
        if opts.resolve_cuda:
            report["cuda_resolve"] = resolve_cuda(replay, next(s for s in stages
                                                                if s.name == "cuda"))
            ok = ok and report["cuda_resolve"]["exit"] == 0
    finally:
        report["steps"] = replay.log
        report["total_s"] = round(time.monotonic() - started, 1)
        report["ok"] = ok
        report["not_verified"] = [
            "base images, apt-get and useradd steps (no docker engine here)",
            "the cuda target's install and start (no GPU; --resolve-cuda checks resolution only)",
            "BuildKit cache/bind mounts (pip used this machine's cache; /wheels shared the root)",
        ]
        if opts.json:
            opts.json.parent.mkdir(parents=True, exist_ok=True)
            opts.json.write_text(json.dumps(report, indent=2))
        if not opts.keep:
            shutil.rmtree(root, ignore_errors=True)
    summary = {k: v for k, v in report.items() if k != "steps"}
    print(json.dumps(summary, indent=2))
    print("docker steps:", "OK" if ok else "FAILED", f"in {report['total_s']} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
