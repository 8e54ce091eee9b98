"""deploy/monitoring and the metric names everything in deploy/ relies on: promtool accepts the
Prometheus config and alert rules and the rules' unit tests pass; the relabelling keeps exactly
the server pods' metrics ports; the Grafana dashboard parses and its PromQL is valid; and every
loraplex_* name the dashboard, the alerts, the KEDA triggers and the endpoint picker's flags
use is present in a live server's /metrics scrape."""
from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml
from loraplex.clients.client import Client
from prometheus_client.parser import text_string_to_metric_families

NAME = re.compile(r"\bloraplex_[a-zA-Z0-9_]+\b")
# Grafana's variables, replaced by values of the same type before promtool parses the queries
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h", "$namespace": "default",
                "$pod": ".+"}


def _promtool(promtool: str, *args: str, cwd=None) -> str:
    proc = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120, cwd=cwd, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def monitoring(deploy_dir):
    return deploy_dir / "monitoring"


@pytest.fixture(scope="module")
def dashboard(monitoring) -> dict:
    return json.loads((monitoring / "grafana-dashboard.json").read_text())


def _dashboard_exprs(dashboard: dict) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def _template_queries(dashboard: dict) -> list[str]:
    return [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]


# ----------------------------------------------------------------------------- Prometheus


def test_alert_rules_check_and_their_unit_tests_pass(promtool, monitoring):
    out = _promtool(promtool, "check", "rules", "alert-rules.yml", cwd=monitoring)
    assert "SUCCESS: 7 rules found" in out
    _promtool(promtool, "test", "rules", "alert-rules.test.yml", cwd=monitoring)


def test_alert_rules_cover_the_issue(monitoring):
    rules = [r for g in yaml.safe_load((monitoring / "alert-rules.yml").read_text())["groups"] for r in g["rules"]]
    exprs = {r["alert"]: r["expr"] for r in rules}
    assert "loraplex_requests_total" in exprs["LoraplexHighErrorRate"]  # error rate
    assert "resource_exhausted" in exprs["LoraplexQueueSaturated"]  # queue saturation
    assert "histogram_quantile(0.99" in exprs["LoraplexSlowTimeToFirstToken"]  # p99 TTFT
    assert "loraplex_adapter_load_failures_total" in exprs["LoraplexAdapterLoadFailures"]
    tested = yaml.safe_load((monitoring / "alert-rules.test.yml").read_text())
    fired = {t["alertname"] for case in tested["tests"] for t in case["alert_rule_test"] if t["exp_alerts"]}
    assert fired == set(exprs), set(exprs) - fired  # every alert is shown to fire in a unit test


def test_prometheus_config_checks(promtool, monitoring, tmp_path):
    """Debian's promtool is built without Kubernetes service discovery, so the check runs on a
    copy whose kubernetes_sd_configs is swapped for a static target; everything else (relabel
    rules, the rule file) is checked as written."""
    config = yaml.safe_load((monitoring / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "loraplex" and job["kubernetes_sd_configs"] == [{"role": "pod"}]
    job.pop("kubernetes_sd_configs")
    job["static_configs"] = [{"targets": ["127.0.0.1:9400"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    (tmp_path / "alert-rules.yml").write_text((monitoring / "alert-rules.yml").read_text())
    out = _promtool(promtool, "check", "config", "prometheus.yml", cwd=tmp_path)
    assert "SUCCESS: 1 rule files found" in out


def _relabel(rules: list[dict], labels: dict[str, str]) -> dict[str, str] | None:
    """Prometheus' keep and replace (the default action) relabelling, for the rules we use."""
    labels = dict(labels)
    for rule in rules:
        value = rule.get("separator", ";").join(labels.get(name, "") for name in rule["source_labels"])
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        action = rule.get("action", "replace")
        if action == "keep":
            if not match:
                return None
        elif action == "replace":
            if match:
                labels[rule["target_label"]] = match.expand(rule.get("replacement", r"\1").replace("$1", r"\1"))
        else:
            raise AssertionError(f"relabel action {action} not simulated")
    return labels


def test_scrape_keeps_only_the_server_metrics_ports(monitoring, render):
    (job,) = yaml.safe_load((monitoring / "prometheus.yml").read_text())["scrape_configs"]
    objects = render("overlays/cpu-trial")

    def targets(workload: dict):
        pod = workload["spec"]["template"]
        for container in pod["spec"]["containers"]:
            for port in container.get("ports", []):
                meta = {"__meta_kubernetes_namespace": "loraplex-trial", "__meta_kubernetes_pod_name": "p-0",
                        "__meta_kubernetes_pod_node_name": "n1", "__meta_kubernetes_pod_container_port_name":
                        port.get("name", "")}
                meta.update({"__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", k): v
                             for k, v in pod["metadata"]["labels"].items()})
                yield port, _relabel(job["relabel_configs"], meta)

    kept = {}
    for workload in (o for o in objects if o["kind"] in ("Deployment", "StatefulSet")):
        for port, labels in targets(workload):
            if labels is not None:
                kept[(workload["metadata"]["name"], port["containerPort"])] = labels
    assert list(kept) == [("loraplex", 9400)]
    labels = kept[("loraplex", 9400)]
    assert (labels["namespace"], labels["pod"], labels["node"]) == ("loraplex-trial", "p-0", "n1")


# ----------------------------------------------------------------------------- Grafana


def test_dashboard_is_well_formed(dashboard):
    assert dashboard["uid"] and dashboard["title"] == "loraplex"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "namespace", "pod"} <= variables
    graphs = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(graphs) >= 20
    for panel in graphs:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for target in panel["targets"]:  # every query is scoped to the chosen namespace and replicas
            for selector in re.findall(r"loraplex_\w+\{([^}]*)\}", target["expr"]):
                assert 'namespace="$namespace"' in selector and 'pod=~"$pod"' in selector, target["expr"]
    used = {m for e in _dashboard_exprs(dashboard) for m in re.findall(r"\$\w+", e)}
    assert used <= set(GRAFANA_VARS)


def test_dashboard_queries_are_valid_promql(promtool, dashboard, tmp_path):
    exprs = _dashboard_exprs(dashboard)
    for name, value in GRAFANA_VARS.items():
        exprs = [e.replace(name, value) for e in exprs]
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:q{i}", "expr": e}
                                                        for i, e in enumerate(exprs)]}]}
    (tmp_path / "dashboard-rules.yml").write_text(yaml.safe_dump(rules))
    out = _promtool(promtool, "check", "rules", "dashboard-rules.yml", cwd=tmp_path)
    assert f"SUCCESS: {len(exprs)} rules found" in out


# ----------------------------------------------------------------------------- names vs /metrics


def _referenced_names(monitoring, dashboard: dict, render) -> dict[str, set[str]]:
    rules = [r["expr"] for g in yaml.safe_load((monitoring / "alert-rules.yml").read_text())["groups"]
             for r in g["rules"] if not r["expr"].startswith("up{")]  # `up`: Prometheus' own, per target
    production = render("overlays/gpu-production")
    keda = [t["metadata"]["query"] for o in production if o["kind"] == "ScaledObject" for t in o["spec"]["triggers"]]
    epp = next(o for o in production if o["kind"] == "Deployment" and o["metadata"]["name"] == "loraplex-epp")
    flags = [value for flag, _, value in (a.partition("=") for a in epp["spec"]["template"]["spec"]["containers"][0]["args"])
             if flag.endswith("-metric")]
    sources = {"dashboard": _dashboard_exprs(dashboard) + _template_queries(dashboard), "alert rules": rules,
               "KEDA triggers": keda, "endpoint picker flags": flags}
    names = {where: {n for text in texts for n in NAME.findall(text)} for where, texts in sources.items()}
    for where, texts in sources.items():
        assert texts and all(NAME.search(t) for t in texts), f"{where}: a query names no loraplex metric"
    return names


def test_every_referenced_metric_is_exported(live_server, monitoring, dashboard, render):
    with Client(live_server.target, timeout=60) as client:
        client.generate("hello world", max_new_tokens=3, ignore_eos=True)
        client.generate("the quick brown fox", adapter="alpha", max_new_tokens=3, ignore_eos=True)
    text = live_server.metrics()
    exported = {s.name for family in text_string_to_metric_families(text) for s in family.samples}
    referenced = _referenced_names(monitoring, dashboard, render)
    assert referenced["endpoint picker flags"] == {"loraplex_queue_depth", "loraplex_kv_cache_usage_ratio",
                                                   "loraplex_lora_requests_info"}
    for where, names in referenced.items():
        missing = names - exported
        assert not missing, f"{where} use metrics /metrics does not export: {sorted(missing)}"
    everything = set().union(*referenced.values())
    assert len(everything) >= 20  # the dashboard covers the exported metrics, not a handful
