"""Reading ray-dstack's metrics from a local Ray head's metrics export port (Prometheus text format)."""

from __future__ import annotations

from collections import defaultdict

import httpx
from prometheus_client.parser import text_string_to_metric_families


def _find(obj, keys):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in keys and v:
                yield v
            yield from _find(v, keys)
    elif isinstance(obj, list):
        for v in obj:
            yield from _find(v, keys)


def metrics_url(dashboard: str = "http://127.0.0.1:8265") -> str:
    """The head node's metrics export endpoint, from the dashboard's node view."""
    from ray_dstack.deploy.dashboard import DashboardClient  # sends Ray's auth token when the cluster wants one

    with DashboardClient(dashboard) as client:
        resp = client._request("GET", "/nodes", params={"view": "summary"})
        resp.raise_for_status()
        body = resp.json()
    ports = list(_find(body, {"metricsExportPort", "metrics_export_port"}))
    ips = list(_find(body, {"nodeManagerAddress", "node_ip", "ip"}))
    assert ports and ips, f"no metrics export port in the dashboard's node view: {str(body)[:2000]}"
    return f"http://{ips[0]}:{ports[0]}/metrics"


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    text = httpx.get(url, timeout=10, trust_env=False).text
    samples: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("ray_dstack_"):
                samples[s.name].append((s.labels, s.value))
    return samples


def total(samples, name: str, **labels: str) -> float:
    return sum(v for lab, v in samples.get(name, []) if all(lab.get(k) == want for k, want in labels.items()))
