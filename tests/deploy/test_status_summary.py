"""What `status`/`list` print, computed from Serve's application details (no cluster needed)."""

from ray_dstack.deploy import apps
from ray_dstack.plan import build_plan
from ray_dstack.config import parse_service

METRICS = """# HELP ray_dstack_replica_rps Requests per second a replica served over its scaling window
# TYPE ray_dstack_replica_rps gauge
ray_dstack_replica_rps{Component="core_worker",SessionName="s",replica="r1",service="svc"} 2.5
ray_dstack_replica_rps{Component="core_worker",SessionName="s",replica="r2",service="svc"} 1.5
ray_dstack_replica_rps{Component="core_worker",SessionName="s",replica="gone",service="svc"} 40
ray_dstack_replica_rps{Component="core_worker",SessionName="s",replica="r1",service="other"} 7
"""


def test_measured_rps_sums_running_replicas_of_the_service_only():
    assert apps.measured_rps([METRICS], "svc", {"r1", "r2"}) == 4.0
    assert apps.measured_rps([METRICS, METRICS], "svc", {"r1"}) == 5.0  # one sample per node endpoint
    assert apps.measured_rps([METRICS], "svc", set()) is None
    assert apps.measured_rps([""], "svc", {"r1"}) is None


def test_measured_rps_reads_the_exposition_format_not_lines():
    # A node's real exporter text: other families around ours, escaped label values, exponent notation, a
    # timestamp; and a node answering an HTML page instead of its exporter (ignored, not an error).
    text = """# HELP ray_serve_num_http_requests_total The number of HTTP requests processed.
# TYPE ray_serve_num_http_requests_total counter
ray_serve_num_http_requests_total{application="svc",route="/"} 12.0
# HELP ray_dstack_replica_rps Requests per second a replica served over its scaling window
# TYPE ray_dstack_replica_rps gauge
ray_dstack_replica_rps{replica="r}1",service="s\\"q\\""} 2.5e0
ray_dstack_replica_rps{service="s\\"q\\"",replica="r2"} 1.25 1700000000000
ray_dstack_replica_rps_other{replica="r2",service="s\\"q\\""} 99
"""
    html = "<html><body>502 Bad Gateway</body></html>"
    assert apps.measured_rps([text, html], 's"q"', {"r}1", "r2"}) == 3.75
    assert apps.measured_rps([html], 's"q"', {"r2"}) is None


def _details(text: str) -> dict:
    plan = build_plan(parse_service(text, "svc.dstack.yml"), token_sha256="ab" * 32)
    app = plan.to_serve_config()["applications"][0]
    replicas = [
        {"replica_id": "r1", "state": "RUNNING", "node_id": "n1", "node_ip": "10.0.0.1", "pid": 1, "log_file_path": "/serve/r1.log"},
        {"replica_id": "r2", "state": "STARTING", "node_id": "n2", "node_ip": "10.0.0.2", "pid": 2, "log_file_path": "/serve/r2.log"},
    ]
    return {
        "http_options": {"host": "0.0.0.0", "port": 8100},
        "applications": {
            "svc": {
                "status": "DEPLOYING",
                "message": "",
                "route_prefix": "/svc",
                "deployed_app_config": app,
                "deployments": {"ServiceReplica": {"target_num_replicas": 2, "replicas": replicas, "message": ""}},
            },
            "not-ours": {"status": "RUNNING", "deployed_app_config": {"import_path": "x:y"}, "deployments": {}},
        },
    }


def test_summary_of_a_model_service_with_scaling():
    details = _details(
        "type: service\nname: svc\ncommands: [x]\nport: 8000\nreplicas: 1..3\n"
        "scaling: {metric: rps, target: 10}\nmodel: {type: chat, name: m1, format: openai}\n"
    )
    [summary] = apps.service_summaries(details, "http://head.example:8265")
    assert summary["name"] == "svc"
    assert summary["url"] == "http://head.example:8100/svc"
    assert summary["replicas"]["running"] == 1 and summary["replicas"]["target"] == 2
    assert [r["node_ip"] for r in summary["replicas"]["items"]] == ["10.0.0.1", "10.0.0.2"]
    assert summary["model"] == {"name": "m1", "format": "openai", "openai_base_url": "http://head.example:8100/v1",
                                "routing": "prefix"}
    assert summary["auth"] is True
    assert summary["scaling"]["min"] == 1 and summary["scaling"]["max"] == 3 and summary["scaling"]["target_rps"] == 10
    apps.with_measured_rps([summary], [METRICS])
    assert summary["scaling"]["measured_rps"] == 2.5  # only r1 is RUNNING


def test_gateway_routes_and_model_name_clash():
    details = _details("type: service\nname: svc\ncommands: [x]\nport: 8000\nmodel: m1\n")
    services = {"svc": details["applications"]["svc"]["deployed_app_config"]}
    routes = apps.gateway_routes(services)
    assert routes["m1"]["app"] == "svc" and routes["m1"]["format"] == "openai"
    assert routes["m1"]["auth"]["token_sha256"] == "ab" * 32
    import pytest

    from ray_dstack.errors import UsageError

    with pytest.raises(UsageError, match="already served by service 'svc'"):
        apps.gateway_routes({**services, "svc2": {**services["svc"], "name": "svc2"}})


def test_merge_keeps_other_apps_and_adds_the_gateway():
    details = _details("type: service\nname: svc\ncommands: [x]\nport: 8000\nmodel: m1\n")
    details["applications"]["not-ours"]["deployed_app_config"] = {"name": "not-ours", "import_path": "x:y", "route_prefix": "/x"}
    merged = apps.merged_config(details)
    names = [a["name"] for a in merged["applications"]]
    assert names == ["not-ours", "svc", "ray-dstack-gateway"]
    assert merged["http_options"] == {"host": "0.0.0.0", "port": 8100}
    removed = apps.merged_config(details, remove="svc")
    assert [a["name"] for a in removed["applications"]] == ["not-ours"]  # no models left: no gateway
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(merged)
