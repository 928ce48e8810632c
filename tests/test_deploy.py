"""deploy/: the alert rules and the dashboard's queries through Prometheus's own tools (promtool), the
metric names they use against what livediff exports, and the RayService's Serve config through Ray
Serve's own schema and application builder."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import yaml

from tests.tools import import_or_skip, which_or_skip

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
CLUSTER_EXTRA = "pip install 'livediff[cluster]'"


def promtool(*args: str, cwd: Path = DEPLOY) -> str:
    program = which_or_skip("promtool", "apt-get install prometheus")
    done = subprocess.run([program, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def dashboard_queries() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_alert_rules_load_and_fire_on_their_conditions() -> None:
    assert "SUCCESS: 9 rules found" in promtool("check", "rules", "alerts.yml")
    promtool("test", "rules", "alerts_test.yml")  # fires on a slow replica, an idle GPU, a growing job queue ...


def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    # promtool parses PromQL in rule files: each panel query becomes a recording rule
    rules = [
        {"record": f"livediff:panel_query_{i}", "expr": expr.replace("$__rate_interval", "2m")}
        for i, expr in enumerate(dashboard_queries())
    ]
    (tmp_path / "queries.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert f"SUCCESS: {len(rules)} rules found" in promtool("check", "rules", "queries.yml", cwd=tmp_path)


def test_dashboard_panels_are_complete() -> None:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)) >= 9
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), panel["title"]
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for wanted in ("p50", "p99", "frame age", "dropped", "sessions per replica", "free", "gpu", "restarts"):
        assert wanted in titles, wanted


def test_the_metrics_named_are_the_ones_livediff_exports(tmp_path: Path) -> None:
    import_or_skip("ray.serve", CLUSTER_EXTRA)
    from prometheus_client.parser import text_string_to_metric_families

    from livediff.cluster.metrics import merge
    from livediff.cluster.routing import ReplicaView
    from livediff.config import StreamParams
    from livediff.jobs.service import Jobs
    from livediff.jobs.settings import JobSettings
    from livediff.server.metrics import Metrics

    metrics = Metrics()
    Jobs(JobSettings(), tmp_path, None, StreamParams(), metrics.registry)  # the jobs' metrics, as a server has them
    text = merge({"r1": metrics.render().decode()}, [ReplicaView("r1", 0, 0, 4, True, 0.0)]).decode()
    families = list(text_string_to_metric_families(text))
    exported = {s.name for family in families for s in family.samples}
    exported |= {
        family.name + suffix
        for family in families
        if family.type == "histogram"  # labelled ones
        for suffix in ("_bucket", "_sum", "_count")
    }  # have no samples before the first observation
    exported |= {family.name + "_total" for family in families if family.type == "counter"}  # labelled ones
    exported |= {"livediff_job_fps"}  # one sample per running job (jobs/service.py `_JobsCollector`)
    exported |= {"livediff_gpu_utilization_ratio"}  # CUDA only (server/metrics.py `_gpu_metrics`)
    rules = (DEPLOY / "alerts.yml").read_text()
    named = set(re.findall(r"\blivediff_[a-z_]+\b", rules + " ".join(dashboard_queries())))
    named -= {n for n in named if n.startswith("livediff_panel")}
    assert named and named <= exported, sorted(named - exported)


def test_rayservice_serve_config_builds_the_application() -> None:
    import_or_skip("ray.serve", CLUSTER_EXTRA)
    from ray.serve.schema import ServeDeploySchema

    from livediff.cluster.app import build_app

    manifest = yaml.safe_load((DEPLOY / "rayservice.yaml").read_text())
    assert manifest["kind"] == "RayService" and manifest["apiVersion"] == "ray.io/v1"
    config = ServeDeploySchema.model_validate(yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    app = config.applications[0]
    assert app.import_path == "livediff.cluster.app:build_app"
    import ray

    assert manifest["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__
    built = build_app(app.args)  # the same call the Serve controller makes, without a cluster
    engine = built._bound_deployment.init_args[0]  # the gateway's first argument: the engine replicas
    options = engine._bound_deployment.ray_actor_options
    assert options["num_gpus"] == 1.0, options
    workers = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 1
    for group in [manifest["spec"]["rayClusterConfig"]["headGroupSpec"], workers]:
        env = {e["name"]: e.get("value") for e in group["template"]["spec"]["containers"][0]["env"]}
        assert env["RAY_USAGE_STATS_ENABLED"] == "0"
