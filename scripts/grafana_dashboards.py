"""Write the Grafana dashboards in deploy/grafana/: mediagate's own (its panels are the
data below) and Ray's Serve dashboards, generated with Ray's own dashboard factory (as
the Ray head does at start-up), not copied by hand.

    python scripts/grafana_dashboards.py          # (re)write deploy/grafana/*.json
    python scripts/grafana_dashboards.py --check  # exit 1 if a file is not what it makes

Every query uses the Prometheus names Ray exports (``ray_`` prefixed; counters end in
``_total``); tests/integration/test_prometheus.py runs each one against a real
Prometheus scraping a running service.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent.parent / "deploy" / "grafana"
MEDIAGATE_UID = "mediagate"
WORKERS = "(TextToImage|TextToVideo)-.*"  # every model's workers (autoscaling.naming)

# (title, unit, description, [(expr, legend)]): one time-series panel each, in rows of 2.
PANELS: list[tuple[str, str, str, list[tuple[str, str]]]] = [
    (
        "Queue per model and tier",
        "short",
        "Requests waiting in each model's scheduler, per priority class (the tier's "
        "priority_class in the tier file: free 0, plus 1, pro 2 as shipped).",
        [
            (
                'sum by (model, priority_class) (ray_mediagate_queue_length{model=~"$model"})',
                "{{model}} class {{priority_class}}",
            )
        ],
    ),
    (
        "Running work per model",
        "short",
        "Worker slots busy: batches for image models, jobs for video models.",
        [
            (
                'sum by (model) (ray_mediagate_inflight_batches{model=~"$model"})',
                "{{model}}",
            )
        ],
    ),
    (
        "Scheduler decisions per second",
        "reqps",
        "Admitted, shed at once (503), expired in the queue (503) and preempted (taken "
        "back from a worker for higher-priority work), per model and class.",
        [
            (
                "sum by (model, decision, priority_class) "
                '(rate(ray_mediagate_scheduler_decisions_total{model=~"$model"}'
                "[$__rate_interval]))",
                "{{model}} {{decision}} class {{priority_class}}",
            )
        ],
    ),
    (
        "Wait beyond the admission estimate (p99)",
        "s",
        "How honest the wait estimates are: seconds requests waited past what admission "
        "estimated, p99 over the last 1000 starts per class (negative: sooner). Near 20% "
        "of a tier's max_queue_wait_s, admitted requests start to expire.",
        [
            (
                "max by (model, priority_class) "
                '(ray_mediagate_wait_beyond_estimate_seconds{model=~"$model", quantile="0.99"})',
                "{{model}} class {{priority_class}}",
            )
        ],
    ),
    (
        "Worker replicas against the autoscaling target",
        "short",
        "Healthy replicas of each model's workers, and what the autoscaler asks for.",
        [
            (
                "sum by (deployment) "
                f'(ray_serve_deployment_replica_healthy{{deployment=~"{WORKERS}"}})',
                "{{deployment}} healthy",
            ),
            (
                "max by (deployment) "
                f'(ray_serve_autoscaling_target_replicas{{deployment=~"{WORKERS}"}})',
                "{{deployment}} target",
            ),
        ],
    ),
    (
        "Batch and step occupancy",
        "short",
        "Images per batch sent to batched image workers, and images per denoising step on "
        "step-level workers (higher: the GPU does more per forward pass).",
        [
            (
                'sum by (model) (rate(ray_mediagate_batch_images_sum{model=~"$model"}'
                "[$__rate_interval])) / sum by (model) "
                '(rate(ray_mediagate_batch_images_count{model=~"$model"}[$__rate_interval]))',
                "{{model}} images per batch",
            ),
            (
                "sum by (model) "
                '(rate(ray_mediagate_denoising_images_stepped_total{model=~"$model"}'
                "[$__rate_interval])) / sum by (model) "
                '(rate(ray_mediagate_denoising_steps_total{model=~"$model"}[$__rate_interval]))',
                "{{model}} images per step",
            ),
        ],
    ),
    (
        "Refusals per tier and reason",
        "reqps",
        "Requests of known callers refused (403, 429, 503): quota (insufficient_quota), "
        "cooldown and per-minute limits (rate_limit_exceeded), tier gates, shedding "
        "(server_overloaded).",
        [
            (
                "sum by (tier, reason) (rate(ray_mediagate_refusals_total[$__rate_interval]))",
                "{{tier}} {{reason}}",
            )
        ],
    ),
    (
        "Video jobs finished per minute",
        "short",
        "Video jobs that completed or failed (queued and running jobs are in the queue "
        "and running-work panels).",
        [
            (
                "sum by (model, status) "
                '(rate(ray_mediagate_video_jobs_finished_total{model=~"$model"}'
                "[$__rate_interval])) * 60",
                "{{model}} {{status}}",
            )
        ],
    ),
    (
        "First-step wait on step-level workers (p99)",
        "s",
        "From a request's arrival at a step-level worker to its first denoising step.",
        [
            (
                "histogram_quantile(0.99, sum by (le, model, priority_class) "
                '(rate(ray_mediagate_first_step_wait_seconds_bucket{model=~"$model"}'
                "[$__rate_interval])))",
                "{{model}} class {{priority_class}}",
            )
        ],
    ),
    (
        "HTTP latency at the router (p99)",
        "ms",
        "Serve's request latency per route, from the proxy's view.",
        [
            (
                "histogram_quantile(0.99, sum by (le, route) "
                "(rate(ray_serve_http_request_latency_ms_bucket[$__rate_interval])))",
                "{{route}}",
            )
        ],
    ),
]


def panel(index: int, title: str, unit: str, description: str, queries: Any) -> dict[str, Any]:
    return {
        "id": index + 1,
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"x": (index % 2) * 12, "y": (index // 2) * 8, "w": 12, "h": 8},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
        "targets": [
            {
                "refId": chr(ord("A") + number),
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "expr": expr,
                "legendFormat": legend,
            }
            for number, (expr, legend) in enumerate(queries)
        ],
    }


def mediagate_dashboard() -> dict[str, Any]:
    return {
        "uid": MEDIAGATE_UID,
        "title": "mediagate",
        "description": "Queues, decisions, waits, replicas and refusals per model and tier.",
        "tags": ["mediagate", "ray-serve"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "timezone": "",
        "annotations": {"list": []},
        "links": [
            {"title": "Ray Serve", "type": "link", "url": "/d/rayServeDashboard"},
            {"title": "Serve deployments", "type": "link", "url": "/d/rayServeDeploymentDashboard"},
        ],
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                },
                {
                    "name": "model",
                    "label": "Model",
                    "type": "query",
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "query": "label_values(ray_mediagate_queue_length, model)",
                    "definition": "label_values(ray_mediagate_queue_length, model)",
                    "refresh": 2,
                    "multi": True,
                    "includeAll": True,
                    "allValue": ".*",
                    "current": {"text": "All", "value": "$__all"},
                },
            ]
        },
        "panels": [panel(index, *spec) for index, spec in enumerate(PANELS)],
    }


def dashboards() -> dict[str, str]:
    """File name -> JSON text."""
    from ray.dashboard.modules.metrics import grafana_dashboard_factory as factory

    serve, _ = factory.generate_serve_grafana_dashboard()
    deployments, _ = factory.generate_serve_deployment_grafana_dashboard()
    return {
        "mediagate.json": json.dumps(mediagate_dashboard(), indent=2) + "\n",
        "ray_serve.json": json.dumps(json.loads(serve), indent=2) + "\n",
        "ray_serve_deployment.json": json.dumps(json.loads(deployments), indent=2) + "\n",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    stale = []
    for name, text in dashboards().items():
        path = OUT / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            OUT.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(
            f"stale: {', '.join(stale)}; run python scripts/grafana_dashboards.py", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
