"""ops/: promtool on the live exposition, the Prometheus config, the alert rules and their unit tests; the
Grafana dashboard and provisioning, docker-compose and the systemd unit read for consistency; the Kubernetes
manifests and the multi-GPU compose override (torchrun's flags read by torchrun's own parser, every --config
and --set resolved, the compose entrypoint run); and the drift guard: every streamssl_* name used anywhere in
ops/ exists in the exposition of ``Metrics``."""

from __future__ import annotations

import configparser
import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from streamssl.config import MetricsConfig
from streamssl.learner.engine import ENGINE_PARTS
from streamssl.learner.methods import METHODS
from streamssl.service.metrics import Metrics

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
OPS = ROOT / "ops"
PROM = OPS / "prometheus"
DASHBOARD = OPS / "grafana" / "streamssl-dashboard.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian: apt-get install "
                                    "prometheus)")
METRIC_NAME = re.compile(r"\bstreamssl_[a-z0-9_]*[a-z0-9]")


def exposition() -> str:
    """The text exposition of a Metrics instance with every method called once (histograms filled)."""
    registry = CollectorRegistry()
    # every method's diagnostics and parts at once: the dashboard has panels for all of them
    diagnostics = {d.name: d for cls in METHODS.values() for d in cls.diagnostics}
    parts = tuple(dict.fromkeys(p for cls in METHODS.values() for p in cls.parts)) + ENGINE_PARTS
    m = Metrics(registry, arch="resnet18", diagnostics=[(d.name, d.metric, d.help) for d in diagnostics.values()],
                parts=parts)
    m.observe_step(n_images=64, loss=7.5, lr=0.002, step_s=0.4, data_wait_s=0.05, skipped=False,
                   diagnostics=dict.fromkeys(diagnostics, 0.25), parts=dict.fromkeys(parts, 0.002))
    m.set_data_wait_share(0.1)
    m.bad_sample("corrupt")
    m.shard_done()
    m.store_result(False, lag_steps=50)
    m.prototype_drift(0.01)
    m.checkpoint_written(1.7e9)
    m.probe_accuracy(0.5)
    m.collapse(False)
    return generate_latest(registry).decode()


def exposed_names(text: str) -> set[str]:
    """Sample names (with _total/_created/_bucket/_sum/_count suffixes) and family names of an exposition."""
    names = {line.split()[2] for line in text.splitlines() if line.startswith(("# HELP ", "# TYPE "))}
    names |= {re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0)  # type: ignore[union-attr]
              for line in text.splitlines() if line and not line.startswith("#")}
    return names


def unknown_names(text: str, known: set[str]) -> set[str]:
    return set(METRIC_NAME.findall(text)) - known


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], input=stdin, cwd=PROM, capture_output=True, text=True, timeout=120)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


# -- promtool ----------------------------------------------------------------------------------------------


@needs_promtool
def test_promtool_check_metrics_on_the_live_exposition() -> None:
    result = promtool("check", "metrics", stdin=exposition())
    assert result.returncode == 0, result.stdout + result.stderr  # lint findings exit non-zero too


@needs_promtool
def test_promtool_check_metrics_would_catch_a_bad_name() -> None:
    bad = "# HELP streamssl_learner_steps counter without _total\n# TYPE streamssl_learner_steps counter\n" \
          "streamssl_learner_steps 1\n"
    assert promtool("check", "metrics", stdin=bad).returncode != 0


@needs_promtool
def test_promtool_check_config() -> None:
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


@needs_promtool
def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_test_rules() -> None:
    result = promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


# -- alert rules and their tests ---------------------------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(PROM / "alerts.yml")["groups"] for rule in group["rules"] if "alert" in rule]


def test_every_alert_has_for_severity_summary_and_description() -> None:
    rules = alert_rules()
    assert {"StreamsslStalled", "StreamsslNonFiniteSteps", "StreamsslCollapse", "StreamsslStoreFailing",
            "StreamsslCheckpointTooOld"} <= {r["alert"] for r in rules}
    for rule in rules:
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    cases = [case for test in load_yaml(PROM / "alerts_test.yml")["tests"] for case in test["alert_rule_test"]]
    for rule in alert_rules():
        mine = [c for c in cases if c["alertname"] == rule["alert"]]
        assert any(c["exp_alerts"] for c in mine), f"{rule['alert']}: no test where it fires"
        assert any(not c["exp_alerts"] for c in mine), f"{rule['alert']}: no test where it must not fire"


def test_every_alert_has_a_runbook_section() -> None:
    readme = (OPS / "README.md").read_text()
    for rule in alert_rules():
        assert re.search(rf"^### .*\b{rule['alert']}\b", readme, re.MULTILINE), rule["alert"]


# -- Grafana -----------------------------------------------------------------------------------------------


def test_dashboard_panels_have_a_datasource_and_targets() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert 36 <= dash["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["datasource"]["uid"] == "${datasource}"
    panels = dash["panels"]
    assert len({p["id"] for p in panels}) == len(panels) >= 12
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], f"{panel['title']}: no target"
        for target in panel["targets"]:
            assert target["expr"].strip() and target["refId"], panel["title"]
            assert target.get("datasource", panel["datasource"])["uid"] == "${datasource}"
            assert 'instance=~"$instance"' in target["expr"], f"{panel['title']}: ignores the instance variable"
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("throughput", "data-wait", "loss", "learning rate", "entropy", "queue", "bad samples", "store",
                  "checkpoint age", "probe", "skipped", "collapse"):
        assert topic in titles, topic


def test_grafana_provisioning_matches_compose() -> None:
    datasources = load_yaml(OPS / "grafana/provisioning/datasources/prometheus.yml")["datasources"]
    assert [d["type"] for d in datasources] == ["prometheus"]
    assert datasources[0]["url"] == "http://prometheus:9090"
    provider = load_yaml(OPS / "grafana/provisioning/dashboards/streamssl.yml")["providers"][0]
    grafana = load_yaml(OPS / "docker-compose.yml")["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("./"))
    assert mounts["./grafana/streamssl-dashboard.json"].startswith(provider["options"]["path"].rstrip("/") + "/")
    assert mounts["./grafana/provisioning/datasources"] == "/etc/grafana/provisioning/datasources"
    assert mounts["./grafana/provisioning/dashboards"] == "/etc/grafana/provisioning/dashboards"


# -- docker-compose ----------------------------------------------------------------------------------------


def test_compose_stack() -> None:
    services = load_yaml(OPS / "docker-compose.yml")["services"]
    assert set(services) == {"redis", "prometheus", "grafana", "streamssl"}
    app = services["streamssl"]
    assert (OPS / app["build"]["context"] / app["build"].get("dockerfile", "Dockerfile")).resolve() == \
        ROOT / "Dockerfile"
    assert app["command"] == ["run", "--config", "cpu-small", "--set", "store.url=redis://redis:6379/0",
                              "--set", "metrics.host=0.0.0.0"]
    assert app["depends_on"]["redis"]["condition"] == "service_healthy"
    for name, service in services.items():  # every bind mount exists; host ports bind to loopback
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (OPS / source).exists(), f"{name}: {source}"
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port}"
    # Prometheus resolves rule_files relative to its config: both files must land in the same folder.
    prom_mounts = dict(v.split(":")[:2] for v in services["prometheus"]["volumes"] if v.startswith("./"))
    config_target = Path(prom_mounts["./prometheus/prometheus.yml"])
    for rule_file in load_yaml(PROM / "prometheus.yml")["rule_files"]:
        assert str(config_target.parent / rule_file) in prom_mounts.values(), rule_file
    assert f"--config.file={config_target}" in services["prometheus"]["command"]


def test_scrape_target_is_the_compose_service_on_the_default_port() -> None:
    jobs = {j["job_name"]: j for j in load_yaml(PROM / "prometheus.yml")["scrape_configs"]}
    targets = [t for c in jobs["streamssl"]["static_configs"] for t in c["targets"]]
    assert targets == [f"streamssl:{MetricsConfig().port}"]
    assert jobs["streamssl"].get("metrics_path", "/metrics") == "/metrics"


# -- systemd -----------------------------------------------------------------------------------------------


def test_systemd_unit() -> None:
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    unit.read_string((OPS / "systemd/streamssl.service").read_text())
    service = unit["Service"]
    assert service["ExecStart"].startswith("/opt/streamssl/.venv/bin/streamssl run --config ")
    assert service["User"] not in ("", "root")
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"
    assert int(service["TimeoutStopSec"]) >= 120  # a step plus a checkpoint write
    assert service["EnvironmentFile"] == "-/etc/streamssl/env"
    assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"
    assert service["ReadWritePaths"]
    assert unit["Install"]["WantedBy"] == "multi-user.target"


# -- drift guard -------------------------------------------------------------------------------------------


def ops_files() -> list[Path]:
    return [p for p in sorted(OPS.rglob("*")) if p.is_file()]


def test_every_metric_name_in_ops_exists_in_the_code() -> None:
    known = exposed_names(exposition())
    assert "streamssl_learner_step_seconds_bucket" in known and "streamssl_source_shards_total" in known
    referenced: dict[str, set[str]] = {}
    for path in ops_files():
        for name in unknown_names(path.read_text(), set()):
            referenced.setdefault(name, set()).add(str(path.relative_to(OPS)))
    # The guard sees the files that matter.
    seen_in = {f for files in referenced.values() for f in files}
    assert {"grafana/streamssl-dashboard.json", "prometheus/alerts.yml", "prometheus/alerts_test.yml"} <= seen_in
    unknown = {name: sorted(files) for name, files in referenced.items() if name not in known}
    assert not unknown, f"metric names used in ops/ that the code does not expose: {unknown}"


def test_drift_guard_catches_a_renamed_metric() -> None:
    known = exposed_names(exposition())
    expr = 'rate(streamssl_learner_images_total[5m]) + streamssl_learner_imgs_total + streamssl_store_lag_steps'
    assert unknown_names(expr, known) == {"streamssl_learner_imgs_total"}


# -- many machines: Kubernetes manifests and the multi-GPU compose override --------------------------------

K8S = OPS / "k8s"
GPU_COMPOSE = OPS / "docker-compose.gpu.yml"
PROM_GPU = PROM / "prometheus.gpu.yml"


def run_args(args: list[str]) -> tuple[str, list[str]]:
    """The --config profile and the --set overrides that follow ``streamssl.cli run`` in ``args``."""
    assert args[args.index("-m") + 1:args.index("-m") + 3] == ["streamssl.cli", "run"], args
    rest = args[args.index("run") + 1:]
    assert all(a in ("--config", "--set") for a in rest[::2]), rest  # nothing else: every value checked below
    return rest[rest.index("--config") + 1], [rest[i + 1] for i, a in enumerate(rest) if a == "--set"]


def resolved(args: list[str], env: list[dict[str, Any]]) -> Any:
    """The configuration ``args`` and the container's STREAMSSL_* variables give: every --set key and the
    profile must exist (resolve raises on an unknown one), and so must every variable's section and key."""
    from streamssl.config import SECTIONS, resolve

    for var in (e["name"] for e in env if e["name"].startswith("STREAMSSL_")):
        section, _, key = var[len("STREAMSSL_"):].lower().partition("_")
        assert section in SECTIONS and key in {f.name for f in dataclasses.fields(SECTIONS[section])}, var
    profile, sets = run_args(args)
    return resolve(profile, environ={}, overrides=sets)


def torchrun_flags(argv: list[str]) -> Any:
    """``argv`` parsed by torchrun's own parser (an unknown or misspelt flag fails here)."""
    from torch.distributed.run import get_args_parser

    return get_args_parser().parse_args(argv)


def k8s_pods() -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """Per manifest: (the workload document, its pod template spec)."""
    pods = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] == "StatefulSet":
                pods[path.name] = (doc, doc["spec"]["template"]["spec"])
            elif doc and doc["kind"] == "PyTorchJob":
                pods[path.name] = (doc, doc["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"])
    return pods


def test_k8s_manifests_launch_torchrun_with_keys_that_exist() -> None:
    pods = k8s_pods()
    assert set(pods) == {"streamssl-torchrun.yaml", "streamssl-pytorchjob.yaml"}
    for name, (_, spec) in pods.items():
        (container,) = spec["containers"]
        assert container["command"] == ["torchrun"], name
        args = container["args"]
        flags = torchrun_flags(args)
        assert flags.module and flags.training_script == "streamssl.cli" and flags.nproc_per_node == "gpu", name
        cfg = resolved(args, container.get("env", []))
        assert cfg.model.arch == "resnet50" and cfg.metrics.host == "0.0.0.0", name
        # STREAMSSL_* variables of Service links would be read as configuration keys and stop the daemon
        assert spec["enableServiceLinks"] is False, name
        # restarts that reconnect: no shared rendezvous store with the addresses of the ranks before
        assert {"name": "TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "value": "1"} in container["env"], name
        # rank r serves metrics.port + r: one declared port per GPU of the pod
        gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
        metrics_ports = {p["containerPort"] for p in container["ports"] if p["name"].startswith("metrics-")}
        assert metrics_ports == {cfg.metrics.port + r for r in range(gpus)}, name
        # SIGTERM: torchrun waits --shutdown-timeout for the final checkpoint; the kubelet kills after the grace
        assert flags.shutdown_timeout >= 120 and spec["terminationGracePeriodSeconds"] > flags.shutdown_timeout
        # the run folder: a ReadWriteMany claim mounted on every pod (rank 0 may be on any of them)
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volume = {v["name"]: v for v in spec["volumes"]}[mounts[str(Path(cfg.checkpoint.dir).parent)]]
        claims = {d["metadata"]["name"]: d for d in yaml.safe_load_all((K8S / name).read_text())
                  if d and d["kind"] == "PersistentVolumeClaim"}
        assert claims[volume["persistentVolumeClaim"]["claimName"]]["spec"]["accessModes"] == ["ReadWriteMany"]
        assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"], name


def test_k8s_statefulset_rendezvous() -> None:
    sts, spec = k8s_pods()["streamssl-torchrun.yaml"]
    docs = [d for d in yaml.safe_load_all((K8S / "streamssl-torchrun.yaml").read_text()) if d]
    service = next(d for d in docs if d["kind"] == "Service")
    flags = torchrun_flags(spec["containers"][0]["args"])
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert sts["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    host, port = flags.rdzv_endpoint.split(":")
    assert host == f"{sts['metadata']['name']}-0.{service['metadata']['name']}"  # the first pod's DNS name
    assert int(port) in {p["containerPort"] for p in spec["containers"][0]["ports"]}
    assert flags.rdzv_backend == "c10d" and flags.max_restarts >= 1
    low, high = map(int, flags.nnodes.split(":"))
    assert 1 <= low <= high == sts["spec"]["replicas"]
    assert sts["spec"]["podManagementPolicy"] == "Parallel"  # OrderedReady would wait for a Ready pod 0


def test_k8s_pytorchjob_is_elastic() -> None:
    job, spec = k8s_pods()["streamssl-pytorchjob.yaml"]
    elastic, worker = job["spec"]["elasticPolicy"], job["spec"]["pytorchReplicaSpecs"]["Worker"]
    assert set(job["spec"]["pytorchReplicaSpecs"]) == {"Worker"}  # an elastic job has no Master
    assert elastic["rdzvBackend"] == "c10d" and elastic["minReplicas"] <= elastic["maxReplicas"] == worker["replicas"]
    assert worker["restartPolicy"] == "Always"  # a clean stop exits 0: OnFailure would end the daemon there
    (container,) = spec["containers"]
    assert container["name"] == "pytorch"  # what the operator looks for, with its port pytorchjob-port
    assert any(p["name"] == "pytorchjob-port" for p in container["ports"])
    flags = torchrun_flags(container["args"])
    assert flags.rdzv_endpoint == "" and flags.nnodes == "1:1"  # the operator's PET_* variables set these


def gpu_compose() -> dict[str, Any]:
    return load_yaml(GPU_COMPOSE)["services"]


def run_gpu_entrypoint(tmp_path: Path, gpus: int) -> tuple[Path, list[str]]:
    """The GPU override's entrypoint script, run by sh with GPUS=gpus and a torchrun that records its
    arguments: (the targets file it wrote, torchrun's argv)."""
    app = gpu_compose()["streamssl"]
    shell, flag, script, name = app["entrypoint"]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "torchrun").write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {tmp_path / 'argv'}\n")
    (bin_dir / "torchrun").chmod(0o755)
    targets = tmp_path / "runs" / "prometheus-targets" / "streamssl.json"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "GPUS": str(gpus), "SCRAPE_TARGETS_FILE": str(targets)}
    result = subprocess.run([shell, flag, script.replace("$$", "$"), name, *app["command"]], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return targets, (tmp_path / "argv").read_text().splitlines()


def test_gpu_compose_runs_torchrun_with_keys_that_exist(tmp_path: Path) -> None:
    base, services = load_yaml(OPS / "docker-compose.yml")["services"], gpu_compose()
    assert set(services) <= set(base)  # an override: no service of its own
    app = services["streamssl"]
    targets, argv = run_gpu_entrypoint(tmp_path, 3)
    flags = torchrun_flags(argv)
    assert flags.standalone and flags.nproc_per_node == "3" and flags.max_restarts >= 1
    assert argv[-len(app["command"]):] == app["command"]
    cfg = resolved(argv, [{"name": n} for n in {**base["streamssl"]["environment"], **app["environment"]}])
    assert cfg.model.arch == "resnet50" and cfg.metrics.host == "0.0.0.0"
    assert app["environment"]["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"  # see the k8s test
    assert cfg.store.url == base["streamssl"]["command"][base["streamssl"]["command"].index("--set") + 1
                                                        ].partition("=")[2]  # the stack's Redis
    # one scrape target per rank started, on metrics.port + LOCAL_RANK
    assert json.loads(targets.read_text()) == [{"targets": [f"streamssl:{cfg.metrics.port + r}" for r in range(3)]}]
    # torchrun's wait for the final checkpoint ends before compose's SIGKILL (stop_grace_period, in minutes)
    grace_s = 60 * int(str(app.get("stop_grace_period", base["streamssl"]["stop_grace_period"])).rstrip("m"))
    assert 120 <= flags.shutdown_timeout < grace_s
    ports = [str(p) for p in app["ports"]]
    assert all(p.startswith("127.0.0.1:") for p in ports) and str(base["streamssl"]["ports"][0]) in ports
    assert {f"127.0.0.1:{cfg.metrics.port + r}:{cfg.metrics.port + r}" for r in range(8)} <= set(ports)
    devices = app["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]


def test_gpu_compose_prometheus_reads_the_targets_the_daemon_writes() -> None:
    import fnmatch

    base, services = load_yaml(OPS / "docker-compose.yml")["services"], gpu_compose()
    prom = services["prometheus"]
    mounts = dict(v.split(":")[:2] for v in prom["volumes"])
    config_target = mounts["./prometheus/prometheus.gpu.yml"]
    assert f"--config.file={config_target}" in prom["command"] and (OPS / "prometheus/prometheus.gpu.yml").exists()
    base_mounts = dict(v.split(":")[:2] for v in base["prometheus"]["volumes"])
    config = load_yaml(PROM_GPU)
    for rule_file in config["rule_files"]:  # resolved relative to the config: mounted beside it by the base
        assert str(Path(config_target).parent / rule_file) in base_mounts.values(), rule_file
    # the daemon writes SCRAPE_TARGETS_FILE into a volume; Prometheus mounts that volume and reads the file
    written = Path(services["streamssl"]["environment"]["SCRAPE_TARGETS_FILE"])
    app_volumes = dict(v.split(":")[:2] for v in base["streamssl"]["volumes"])
    volume, inside = next((vol, Path(path)) for vol, path in app_volumes.items() if written.is_relative_to(path))
    seen_at = Path(mounts[volume]) / written.relative_to(inside)
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "streamssl"]  # alerts.yml's job
    assert any(fnmatch.fnmatch(str(seen_at), f) for sd in job["file_sd_configs"] for f in sd["files"])


@needs_promtool
def test_promtool_check_gpu_config_and_the_targets_file(tmp_path: Path) -> None:
    result = promtool("check", "config", "prometheus.gpu.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout
    # the file the entrypoint writes, as Prometheus will read it (promtool parses file_sd files it finds)
    targets, _ = run_gpu_entrypoint(tmp_path, 8)
    shutil.copy(PROM / "alerts.yml", tmp_path / "alerts.yml")
    config = PROM_GPU.read_text().replace("/streamssl-runs/prometheus-targets/*.json", str(targets))
    assert str(targets) in config
    (tmp_path / "prometheus.yml").write_text(config)
    result = subprocess.run([str(PROMTOOL), "check", "config", "prometheus.yml"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "WARNING" not in result.stdout + result.stderr, result.stdout + result.stderr
