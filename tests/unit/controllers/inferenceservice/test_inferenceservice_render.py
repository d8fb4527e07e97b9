"""InferenceService → children: what the pods run, how traffic and replicas split, what the autoscaler
gets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from controllers.inferenceservice import render
from controllers.inferenceservice.render import CANARY, PREDICTOR, Models, Owner, RenderConfig
from crds.common import SPEC_MOUNT_DIR
from crds.inferenceservice import InferenceServiceSpec
from runtime.serving import cli

OWNER = Owner(name="bert", namespace="serving", uid="u-1")
GW = render.GATEWAY_API
NO_ROUTE = [("v1", "Service", "bert-predictor"), (GW, "HTTPRoute", "bert"), (GW, "GRPCRoute", "bert")]
CFG = RenderConfig(default_image="ghcr.io/kubeforge/runtime:9", mlflow_tracking_uri="http://mlflow:5000")


def spec(**kw: Any) -> InferenceServiceSpec:
    return InferenceServiceSpec.model_validate({"model": {"uri": "models:/bert/3"}, **kw})


def children(s: InferenceServiceSpec, models: Models | None = None, **kw: Any) -> dict[tuple[str, str], Any]:
    out = render.render(OWNER, s, CFG, models or Models("models:/bert/3", "models:/bert/4"), **kw)
    return {(c["kind"], c["metadata"]["name"]): c for c in out}


@pytest.mark.parametrize(
    ("stable", "percent", "want"),
    [
        (1, 10, 1),
        (9, 10, 1),
        (18, 10, 2),
        (3, 25, 1),
        (4, 50, 4),
        (6, 75, 18),
        (5, 0, 1),
        (5, 100, 5),
        (0, 10, 1),
    ],
)
def test_canary_replicas_give_the_nearest_pod_share(stable: int, percent: int, want: int) -> None:
    assert render.canary_replicas(stable, percent) == want


def test_pods_compile_first_then_serve_the_same_model_under_the_services_name() -> None:
    s = spec(
        accelerator={"vendor": "nvidia", "product": "NVIDIA-H200", "count": 1},
        compile={"cacheClaimName": "compile-cache"},
        env={"HF_HOME": "/tmp/hf"},
    )
    out = children(s, stable_replicas=None)
    assert set(out) == {
        ("ConfigMap", "bert-spec"),
        ("Deployment", "bert-predictor"),
        ("Service", "bert"),
        ("PodDisruptionBudget", "bert-predictor"),
    }
    pdb = out[("PodDisruptionBudget", "bert-predictor")]["spec"]
    assert pdb == {
        "maxUnavailable": 1,
        "selector": {
            "matchLabels": {"kubeforge.io/inference-service": "bert", "kubeforge.io/role": PREDICTOR}
        },
    }
    dep = out[("Deployment", "bert-predictor")]
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    assert dep["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    pod = dep["spec"]["template"]["spec"]
    [init], [server] = pod["initContainers"], pod["containers"]
    assert init["command"] == ["kubeforge-serve", "compile"] and server["command"] == [
        "kubeforge-serve",
        "serve",
    ]
    for c in (init, server):
        assert c["image"] == "ghcr.io/kubeforge/runtime:9"
        assert (
            c["resources"]["limits"]["nvidia.com/gpu"] == "1" == c["resources"]["requests"]["nvidia.com/gpu"]
        )
        i = c["args"].index("--model-uri")
        assert c["args"][i + 1] == "models:/bert/3"
        assert c["args"][c["args"].index("--model-name") + 1] == "bert"
        env = {e["name"]: e["value"] for e in c["env"]}
        assert env == {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "HF_HOME": "/tmp/hf"}
    assert init["args"][-2:] == ["--termination-log", "/dev/termination-log"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["compile-cache"]["persistentVolumeClaim"] == {"claimName": "compile-cache"}
    assert server["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    [spread] = pod["topologySpreadConstraints"]
    assert (spread["topologyKey"], spread["whenUnsatisfiable"]) == (
        "kubernetes.io/hostname",
        "ScheduleAnyway",
    )
    assert spread["labelSelector"]["matchLabels"]["kubeforge.io/role"] == PREDICTOR
    assert [p["containerPort"] for p in server["ports"]] == [8080, 8081]
    svc = out[("Service", "bert")]
    assert svc["spec"]["selector"] == {
        "kubeforge.io/inference-service": "bert",
        "kubeforge.io/role": PREDICTOR,
    }
    assert [p["port"] for p in svc["spec"]["ports"]] == [8080, 8081]


def test_the_rendered_commands_parse_as_kubeforge_serve_reads_them(tmp_path: Path) -> None:
    """The ConfigMap is a valid --spec, and the containers' arguments are valid kubeforge-serve command
    lines."""
    s = spec(batching={"maxBatchSize": 16, "maxDelayMs": 3.5}, ports={"http": 9000, "grpc": 9001})
    out = children(s, stable_replicas=None)
    doc = tmp_path / render.SPEC_FILE
    doc.write_text(out[("ConfigMap", "bert-spec")]["data"][render.SPEC_FILE])
    defaults = cli._spec_defaults(str(doc))
    assert (defaults["max_batch_size"], defaults["max_delay_ms"], defaults["http_port"]) == (16, 3.5, 9000)
    pod = out[("Deployment", "bert-predictor")]["spec"]["template"]["spec"]
    for c, command in ((pod["initContainers"][0], "compile"), (pod["containers"][0], "serve")):
        args = [a.replace(SPEC_MOUNT_DIR, str(tmp_path)) for a in c["args"]]
        parsed = cli._parser().parse_args([command, *args])
        assert parsed.model_uri == "models:/bert/3" and parsed.model_name == "bert"
    assert parsed.host == "0.0.0.0" and parsed.drain_delay_s == render.DRAIN_DELAY_S


def test_a_spec_change_rolls_the_pods_through_the_config_hash() -> None:
    def digest(s: InferenceServiceSpec) -> str:
        dep = children(s, stable_replicas=None)[("Deployment", "bert-predictor")]
        return str(dep["spec"]["template"]["metadata"]["annotations"][render.ANNOTATION_CONFIG_HASH])

    assert digest(spec()) == digest(spec())
    assert digest(spec()) != digest(spec(batching={"maxBatchSize": 8}))
    assert digest(spec()) != digest(spec(compile={"mode": "jit"}))
    # what reaches the pods otherwise, or not at all, does not restart the stable ones
    canary = {"model": {"uri": "models:/bert/4"}, "trafficPercent": 30}
    assert digest(spec()) == digest(spec(replicas=4, canary=canary, autoscaling={"maxReplicas": 3}))


@pytest.mark.parametrize(
    ("percent", "canary_pods", "selected_role"), [(25, 1, None), (100, 3, CANARY), (0, 1, PREDICTOR)]
)
def test_canary_pods_and_the_services_selector_follow_the_traffic_share(
    percent: int, canary_pods: int, selected_role: str | None
) -> None:
    s = spec(replicas=3, canary={"model": {"uri": "models:/bert/4"}, "trafficPercent": percent})
    out = children(s, stable_replicas=None)
    canary = out[("Deployment", "bert-canary")]
    assert canary["spec"]["replicas"] == canary_pods
    args = canary["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--model-uri") + 1] == "models:/bert/4"
    assert args[args.index("--model-name") + 1] == "bert"  # clients address one name whichever pod answers
    assert out[("Service", "bert-canary")]["spec"]["selector"]["kubeforge.io/role"] == CANARY
    assert out[("Service", "bert")]["spec"]["selector"].get("kubeforge.io/role") == selected_role
    assert render.unwanted(s, OWNER) == [
        ("autoscaling/v2", "HorizontalPodAutoscaler", "bert-predictor"),
        *NO_ROUTE,
    ]


def test_an_unresolved_canary_model_renders_no_canary_and_keeps_what_runs() -> None:
    s = spec(canary={"model": {"modelVersion": "bert-v4"}})
    out = children(s, Models("models:/bert/3", None), stable_replicas=None)
    assert ("Deployment", "bert-canary") not in out
    assert render.unwanted(s, OWNER) == [
        ("autoscaling/v2", "HorizontalPodAutoscaler", "bert-predictor"),
        *NO_ROUTE,
    ]


def test_autoscaling_leaves_the_stable_replicas_to_the_hpa_and_sizes_the_canary_from_them() -> None:
    s = spec(
        autoscaling={"minReplicas": 0, "maxReplicas": 10, "targetConcurrency": 8},
        canary={"model": {"uri": "models:/bert/4"}, "trafficPercent": 20},
    )
    out = children(s, stable_replicas=8)
    assert "replicas" not in out[("Deployment", "bert-predictor")]["spec"]
    assert out[("Deployment", "bert-canary")]["spec"]["replicas"] == 2
    hpa = out[("HorizontalPodAutoscaler", "bert-predictor")]["spec"]
    assert hpa["scaleTargetRef"]["name"] == "bert-predictor"
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (1, 10)  # 0 needs the HPAScaleToZero gate
    assert [m["type"] for m in hpa["metrics"]] == ["Pods"]
    assert hpa["metrics"][0]["pods"]["target"] == {"type": "AverageValue", "averageValue": "8"}
    assert render.unwanted(s, OWNER) == NO_ROUTE


@pytest.mark.parametrize(
    ("autoscaling", "types"),
    [
        ({"maxReplicas": 4}, [("Resource", 80)]),
        ({"maxReplicas": 4, "targetCpuUtilization": 60}, [("Resource", 60)]),
        (
            {"maxReplicas": 4, "targetCpuUtilization": 60, "targetConcurrency": 4},
            [("Pods", None), ("Resource", 60)],
        ),
    ],
)
def test_autoscaler_metrics(autoscaling: dict[str, Any], types: list[tuple[str, int | None]]) -> None:
    hpa = children(spec(autoscaling=autoscaling), stable_replicas=None)[
        ("HorizontalPodAutoscaler", "bert-predictor")
    ]
    got = [
        (m["type"], m["resource"]["target"]["averageUtilization"] if m["type"] == "Resource" else None)
        for m in hpa["spec"]["metrics"]
    ]
    assert got == types


def test_without_canary_or_autoscaling_their_children_are_unwanted() -> None:
    assert render.unwanted(spec(), OWNER) == [
        ("apps/v1", "Deployment", "bert-canary"),
        ("v1", "Service", "bert-canary"),
        ("autoscaling/v2", "HorizontalPodAutoscaler", "bert-predictor"),
        *NO_ROUTE,
    ]


ROUTE = {
    "http": {
        "parentRefs": [{"name": "inference", "namespace": "gateways"}],
        "hostnames": ["bert.example.com"],
    },
    "grpc": {"parentRefs": [{"name": "inference", "namespace": "gateways", "sectionName": "grpc"}]},
}


@pytest.mark.parametrize("percent", [0, 10, 100])
def test_routes_split_by_weight_between_the_stable_and_canary_services(percent: int) -> None:
    s = spec(replicas=3, canary={"model": {"uri": "models:/bert/4"}, "trafficPercent": percent}, route=ROUTE)
    out = children(s, stable_replicas=None)
    stable = out[("Service", "bert-predictor")]["spec"]
    assert stable["selector"] == {"kubeforge.io/inference-service": "bert", "kubeforge.io/role": PREDICTOR}
    http = out[("HTTPRoute", "bert")]
    assert http["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert http["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    assert http["spec"]["parentRefs"] == [
        {
            "group": "gateway.networking.k8s.io",
            "kind": "Gateway",
            "name": "inference",
            "namespace": "gateways",
        }
    ]
    assert http["spec"]["hostnames"] == ["bert.example.com"]
    assert http["spec"]["rules"] == [
        {
            "backendRefs": [
                {"name": "bert-predictor", "port": 8080, "weight": 100 - percent},
                {"name": "bert-canary", "port": 8080, "weight": percent},
            ]
        }
    ]
    grpc = out[("GRPCRoute", "bert")]["spec"]
    assert grpc["parentRefs"][0]["sectionName"] == "grpc" and "hostnames" not in grpc
    assert [(b["name"], b["port"], b["weight"]) for b in grpc["rules"][0]["backendRefs"]] == [
        ("bert-predictor", 8081, 100 - percent),
        ("bert-canary", 8081, percent),
    ]
    assert render.unwanted(s, OWNER) == [("autoscaling/v2", "HorizontalPodAutoscaler", "bert-predictor")]
    # the routes are last: a cluster without the Gateway API gets every other child first
    kinds = [k for k, _ in out]
    assert kinds[-2:] == ["HTTPRoute", "GRPCRoute"]


def test_a_route_without_canary_sends_everything_to_the_stable_pods_and_changes_no_pod() -> None:
    s = spec(route={"http": ROUTE["http"]})
    out = children(s, stable_replicas=None)
    assert out[("HTTPRoute", "bert")]["spec"]["rules"] == [
        {"backendRefs": [{"name": "bert-predictor", "port": 8080}]}
    ]
    assert ("GRPCRoute", "bert") not in out
    assert (GW, "GRPCRoute", "bert") in render.unwanted(s, OWNER)
    assert render.config_hash(s) == render.config_hash(spec())  # routing reaches no pod: no restart
    # an unresolved canary model: no canary backend (its Service is not there either)
    canary = spec(canary={"model": {"modelVersion": "bert-v4"}}, route=ROUTE)
    out = children(canary, Models("models:/bert/3", None), stable_replicas=None)
    assert [b["name"] for b in out[("HTTPRoute", "bert")]["spec"]["rules"][0]["backendRefs"]] == [
        "bert-predictor"
    ]


def test_the_canarys_weight_waits_for_a_ready_canary_pod() -> None:
    s = spec(canary={"model": {"uri": "models:/bert/4"}, "trafficPercent": 30}, route=ROUTE)
    out = children(s, stable_replicas=None, canary_serving=False)
    for kind in ("HTTPRoute", "GRPCRoute"):
        weights = [b["weight"] for b in out[(kind, "bert")]["spec"]["rules"][0]["backendRefs"]]
        assert weights == [100, 0]
    assert out[("Deployment", "bert-canary")]["spec"]["replicas"] == 1  # the pods are still made
