#!/usr/bin/env python3
"""Offline validation of the Helm chart (helm/imbridge) and the plain deployment files (deploy/).

    python3 helm/imbridge/tests/validate.py

No cluster and no helm binary: helm-python-sdk bundles Helm's Go SDK, so linting and rendering
use Helm's own engine, and kubernetes-validate bundles the Kubernetes JSON schemas. `./test`
installs both (pinned); tests/it/helm_chart.rs runs this script from `cargo test`, passing the
binary it built in IMBRIDGE_BIN so every rendered configuration also goes through
`imbridge check-config`.

For the default values, each examples/values-*.yaml and a few variants (the internal listener
on and off, anonymous, client tokens from the chart's Secret, an existingSecret or extraEnv),
the chart is:
  1. linted, strict, by Helm's linter for the oldest and newest Kubernetes versions below;
  2. rendered by Helm's engine, as `helm template` would;
  3. validated manifest by manifest against the Kubernetes schemas of those versions in strict
     mode (unknown fields are errors). The ServiceMonitor is a CRD, absent from those schemas:
     check_service_monitor checks it by hand;
  4. checked for the properties the chart promises (check_release, check_internal: POST
     /notify only on the internal listener's own Service, which no Ingress reaches and no
     NetworkPolicy opens to everyone, with each client's token from the environment).
The values the chart must refuse are checked to be refused, each for its reason.
deploy/k8s gets steps 3 and 4 and is compared with the chart's defaults (internal listener
on); deploy/compose.yaml and deploy/Dockerfile are checked against deploy/imbridge.toml, the
image's default config.

Exit status: 0 when everything holds, 1 with every failure listed, 2 when a package is missing.
"""

from __future__ import annotations

import base64
import copy
import os
import re
import subprocess
import sys
import tempfile
import tomllib
import traceback
from pathlib import Path

try:
    import helm_python as helm
    import kubernetes_validate
    import yaml
except ImportError as missing:
    sys.stderr.write(
        f"validate.py: the Python package {missing.name!r} is missing. `./test` installs "
        "the pinned helm-python-sdk and kubernetes-validate before running the tests.\n"
    )
    sys.exit(2)

ROOT = Path(__file__).resolve().parents[3]
CHART = ROOT / "helm" / "imbridge"
DEPLOY = ROOT / "deploy"
RELEASE = "imbridge"
NAMESPACE = "imbridge"

# The oldest version the chart supports (Chart.yaml kubeVersion) and the newest whose schemas
# the pinned kubernetes-validate bundles. Fixed, so a package upgrade cannot move them silently.
KUBE_VERSIONS = ("1.25.0", "1.37.0")

# A valid EncodingAESKey (43 characters of [A-Za-z0-9]) put in place of the examples'
# placeholders, which the daemon rightly refuses, so check-config can judge the rest.
TEST_AES_KEY = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQ"


class Checker:
    """Collects failures instead of stopping at the first, so one run shows them all."""

    def __init__(self) -> None:
        self.failures: list[str] = []
        self.passed = 0

    def check(self, ok: object, what: str) -> bool:
        if ok:
            self.passed += 1
        else:
            self.failures.append(what)
        return bool(ok)


# ---------------------------------------------------------------------------------------------
# Rendering


def values_file(path: Path) -> dict:
    """A values file parsed by Helm's own YAML reader, as `helm install -f` reads it."""
    return helm.values_from_yaml(path.read_text())


def render(chart: helm.Chart, values: dict) -> tuple[list[dict], str]:
    """The chart's manifests (parsed) and its NOTES.txt, for `values` over the defaults."""
    rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    docs, notes = [], ""
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc.setdefault("metadata", {}).setdefault("annotations", {})
                docs.append({**doc, "_source": path})
    return docs, notes


def strip_source(doc: dict) -> dict:
    doc = {k: v for k, v in doc.items() if k != "_source"}
    if doc.get("metadata", {}).get("annotations") == {}:
        doc["metadata"] = {k: v for k, v in doc["metadata"].items() if k != "annotations"}
    return doc


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(c: Checker, label: str, docs: list[dict], kind: str) -> dict | None:
    found = of_kind(docs, kind)
    c.check(len(found) == 1, f"{label}: expected one {kind}, found {len(found)}")
    return found[0] if len(found) == 1 else None


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# ---------------------------------------------------------------------------------------------
# Schemas


def check_schemas(c: Checker, label: str, docs: list[dict]) -> None:
    """Every manifest against the Kubernetes schemas (strict); CRDs by hand."""
    for doc in docs:
        doc = strip_source(doc)
        name = f"{label}: {doc['kind']} {doc['metadata'].get('name')}"
        if doc["apiVersion"] == "monitoring.coreos.com/v1":
            if doc["kind"] == "PrometheusRule":
                check_prometheus_rule(c, name, doc)
            else:
                check_service_monitor(c, name, doc, docs)
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
                c.check(True, "")
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                c.check(False, f"{name}: invalid for Kubernetes {version} at {path}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                c.check(False, f"{name}: {e.message}")


def check_service_monitor(c: Checker, name: str, sm: dict, docs: list[dict]) -> None:
    """The ServiceMonitor CRD by hand: the fields Prometheus Operator needs, pointing at the
    Service's admin port."""
    c.check(sm.get("kind") == "ServiceMonitor", f"{name}: kind")
    c.check(set(sm) <= {"apiVersion", "kind", "metadata", "spec"}, f"{name}: unknown top-level fields")
    spec = sm.get("spec", {})
    c.check(set(spec) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}, f"{name}: unknown spec fields")
    selector = spec.get("selector", {})
    services = [s for s in of_kind(docs, "Service") if selector_matches(selector, s["metadata"].get("labels", {}))]
    c.check(len(services) == 1, f"{name}: selector matches {len(services)} Services, expected 1")
    endpoints = spec.get("endpoints", [])
    c.check(len(endpoints) == 1, f"{name}: expected one endpoint")
    for ep in endpoints:
        c.check(set(ep) <= {"port", "path", "interval", "scrapeTimeout"}, f"{name}: unknown endpoint fields")
        c.check(ep.get("port") == "admin" and ep.get("path") == "/metrics", f"{name}: must scrape admin /metrics")
        for field in ("interval", "scrapeTimeout"):
            c.check(re.fullmatch(r"([0-9]+(ms|s|m|h))+", str(ep.get(field, ""))), f"{name}: {field} is not a duration")
        if services:
            port_names = [p["name"] for p in services[0]["spec"]["ports"]]
            c.check(ep.get("port") in port_names, f"{name}: port {ep.get('port')} not on the Service")


def check_prometheus_rule(c: Checker, name: str, rule: dict) -> None:
    """The PrometheusRule CRD by hand: its shape, and what every alert must say (a `for`, a
    severity, a summary). tests/it/observability.rs checks the expressions' metric names."""
    c.check(set(rule) <= {"apiVersion", "kind", "metadata", "spec"}, f"{name}: unknown top-level fields")
    groups = rule.get("spec", {}).get("groups", [])
    c.check(bool(groups) and set(rule["spec"]) == {"groups"}, f"{name}: spec must be groups")
    for group in groups:
        c.check(set(group) <= {"name", "interval", "rules"} and group.get("name"), f"{name}: group fields")
        for r in group.get("rules", []):
            alert = r.get("alert", "?")
            c.check(set(r) <= {"alert", "expr", "for", "labels", "annotations"}, f"{name}: {alert}: unknown fields")
            c.check(isinstance(r.get("expr"), str) and r["expr"].strip(), f"{name}: {alert}: no expr")
            c.check(re.fullmatch(r"([0-9]+(ms|s|m|h))+", str(r.get("for", ""))), f"{name}: {alert}: `for` is not a duration")
            c.check(r.get("labels", {}).get("severity") in ("warning", "critical"), f"{name}: {alert}: severity")
            c.check(bool(r.get("annotations", {}).get("summary")), f"{name}: {alert}: no summary")


def check_observability(c: Checker, docs: list[dict]) -> None:
    """The chart's dashboard and rules are deploy/'s, unchanged."""
    import json

    dashboard_file = DEPLOY / "grafana" / "imbridge.json"
    rules_file = DEPLOY / "prometheus" / "imbridge-rules.yaml"
    c.check(
        (CHART / "files" / "imbridge-dashboard.json").read_text() == dashboard_file.read_text(),
        "helm/imbridge/files/imbridge-dashboard.json differs from deploy/grafana/imbridge.json",
    )
    c.check(
        (CHART / "files" / "imbridge-rules.yaml").read_text() == rules_file.read_text(),
        "helm/imbridge/files/imbridge-rules.yaml differs from deploy/prometheus/imbridge-rules.yaml",
    )
    maps = [m for m in of_kind(docs, "ConfigMap") if m["metadata"]["name"].endswith("-dashboard")]
    c.check(len(maps) == 1, f"dashboard: {len(maps)} ConfigMaps")
    for m in maps:
        c.check(m["metadata"]["labels"].get("grafana_dashboard") == "1", "dashboard: sidecar label")
        c.check(json.loads(m["data"]["imbridge.json"]) == json.loads(dashboard_file.read_text()), "dashboard: JSON differs")
    rules = of_kind(docs, "PrometheusRule")
    c.check(len(rules) == 1, f"rules: {len(rules)} PrometheusRules")
    for r in rules:
        c.check(r["spec"] == yaml.safe_load(rules_file.read_text())["spec"], "rules: spec differs from deploy/'s")
        c.check(r["metadata"]["labels"].get("release") == "prometheus", "rules: extra labels")
    check_prometheus_rule(c, "deploy/prometheus/imbridge-rules.yaml", yaml.safe_load(rules_file.read_text()))


# ---------------------------------------------------------------------------------------------
# Properties


def labels_match(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def selector_matches(selector: dict, labels: dict) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) against labels."""
    if not labels_match(selector.get("matchLabels", {}), labels):
        return False
    for e in selector.get("matchExpressions", []):
        key, op, values = e["key"], e["operator"], e.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }.get(op)
        if not ok:
            return False
    return True


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def seconds_of(duration: str) -> float:
    """The daemon's durations as the chart writes them ("20s", "1m", "500ms")."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    total, rest = 0.0, duration.strip()
    for number, unit in re.findall(r"([0-9]+)(ms|s|m|h)", rest):
        total += int(number) * units[unit]
    if not re.fullmatch(r"(?:[0-9]+(?:ms|s|m|h))+", rest):
        raise ValueError(f"unexpected duration {duration!r}")
    return total


def secret_env(secret: dict | None) -> dict[str, str]:
    if secret is None:
        return {}
    env = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    env.update(secret.get("stringData") or {})
    return env


def check_release(c: Checker, label: str, docs: list[dict], *, env: dict[str, str], helm_release: bool = True) -> dict:
    """The properties that matter, on one rendered set of manifests. Returns the parsed TOML."""
    # The configuration's ConfigMap; the Grafana dashboard's (metrics.grafanaDashboard) is another.
    configs = [d for d in docs if not (d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard"))]
    cm = one(c, label, configs, "ConfigMap")
    dep = one(c, label, docs, "Deployment")
    if cm is None or dep is None:
        return {}
    pod_meta = dep["spec"]["template"]["metadata"]
    pod = dep["spec"]["template"]["spec"]
    containers = pod["containers"]
    c.check(len(containers) == 1, f"{label}: one container expected")
    ctr = containers[0]

    # The rendered TOML parses, and names the ports the container exposes.
    text = cm["data"].get("imbridge.toml", "")
    try:
        config = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        c.check(False, f"{label}: the ConfigMap's imbridge.toml does not parse: {e}\n{text}")
        return {}
    server = config.get("server", {})
    for key in ("listen", "admin_listen", "shutdown_grace"):
        c.check(key in server, f"{label}: server.{key} missing from the rendered config")
    ports = {p["name"]: p["containerPort"] for p in ctr.get("ports", [])}
    if "listen" in server and "admin_listen" in server:
        expected = {"http": port_of(server["listen"]), "admin": port_of(server["admin_listen"])}
        if "internal_listen" in server:
            expected["internal"] = port_of(server["internal_listen"])
        c.check(
            ports == expected,
            f"{label}: container ports {ports} differ from server.listen {server['listen']} / "
            f"admin_listen {server['admin_listen']} / internal_listen {server.get('internal_listen')}",
        )

    # The config is what the daemon reads: mounted where the args point.
    serve = ["serve", "--config", "/etc/imbridge/imbridge.toml"]
    c.check(ctr.get("args") in (serve, serve + ["--watch"]), f"{label}: args")
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {m["mountPath"]: m for m in ctr.get("volumeMounts", [])}
    config_mount = mounts.get("/etc/imbridge")
    c.check(
        config_mount is not None
        and volumes.get(config_mount["name"], {}).get("configMap", {}).get("name") == cm["metadata"]["name"],
        f"{label}: ConfigMap {cm['metadata']['name']} is not mounted at /etc/imbridge",
    )

    # Probes: liveness /healthz and readiness /readyz, both on the admin port.
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = ctr.get(probe, {}).get("httpGet", {})
        c.check(get.get("path") == path, f"{label}: {probe} path is {get.get('path')}, expected {path}")
        c.check(
            get.get("port") == "admin" or get.get("port") == ports.get("admin"),
            f"{label}: {probe} is not on the admin port ({get.get('port')})",
        )

    # Security: non-root, read-only root filesystem, no escalation, no capabilities, seccomp.
    psc, sc = pod.get("securityContext", {}), ctr.get("securityContext", {})
    c.check(psc.get("runAsNonRoot") is True, f"{label}: pod runAsNonRoot must be true")
    c.check(sc.get("runAsNonRoot") is True, f"{label}: container runAsNonRoot must be true")
    c.check((sc.get("runAsUser", psc.get("runAsUser")) or 0) > 0, f"{label}: runAsUser must not be 0")
    c.check(sc.get("readOnlyRootFilesystem") is True, f"{label}: readOnlyRootFilesystem must be true")
    c.check(sc.get("allowPrivilegeEscalation") is False, f"{label}: allowPrivilegeEscalation must be false")
    c.check("ALL" in sc.get("capabilities", {}).get("drop", []), f"{label}: capabilities must drop ALL")
    c.check(
        sc.get("seccompProfile", psc.get("seccompProfile", {})).get("type") == "RuntimeDefault",
        f"{label}: seccompProfile must be RuntimeDefault",
    )
    c.check(pod.get("automountServiceAccountToken") is False, f"{label}: the API token must not be mounted")

    # Graceful termination: Kubernetes waits at least for the preStop sleep and the daemon's grace.
    grace = seconds_of(server.get("shutdown_grace", "0s"))
    pre_stop = ctr.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    sleep = float(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0.0
    tgps = pod.get("terminationGracePeriodSeconds", 30)
    c.check(tgps >= grace + sleep, f"{label}: terminationGracePeriodSeconds {tgps} < preStop {sleep} + shutdown_grace {grace}")

    # Secrets reach the container only as environment from a Secret.
    secret_refs = [e["secretRef"]["name"] for e in ctr.get("envFrom", []) if "secretRef" in e]
    c.check(len(secret_refs) == 1, f"{label}: expected one envFrom secretRef, found {secret_refs}")
    secrets = of_kind(docs, "Secret")
    if secrets:
        c.check(secret_refs == [secrets[0]["metadata"]["name"]], f"{label}: envFrom does not name the Secret")

    # Checksums so pods roll on change (the chart's; plain manifests roll by hand).
    if helm_release:
        reload = "--watch" in containers[0].get("args", [])
        for key in ("checksum/restart" if reload else "checksum/config", "checksum/secret"):
            c.check(
                re.fullmatch(r"[0-9a-f]{64}", str(pod_meta.get("annotations", {}).get(key, ""))),
                f"{label}: pod annotation {key} missing",
            )

    # Everything that selects the pods selects them, by their named ports.
    pod_labels = pod_meta.get("labels", {})
    c.check(labels_match(dep["spec"]["selector"]["matchLabels"], pod_labels), f"{label}: Deployment selector")
    # The main Service (public and admin ports); the internal listener's is check_internal's.
    main = [s for s in of_kind(docs, "Service") if not is_internal_service(s)]
    c.check(len(main) == 1, f"{label}: expected one main Service, found {len(main)}")
    svc = main[0] if len(main) == 1 else None
    if svc:
        c.check(labels_match(svc["spec"]["selector"], pod_labels), f"{label}: Service selector")
        svc_ports = {p["name"]: p for p in svc["spec"]["ports"]}
        c.check(set(svc_ports) == {"http", "admin"}, f"{label}: Service ports {sorted(svc_ports)}")
        for name, p in svc_ports.items():
            c.check(p.get("targetPort") in (name, ports.get(name)), f"{label}: Service port {name} targets {p.get('targetPort')}")
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        for d in of_kind(docs, kind):
            sel = d["spec"].get("selector", d["spec"].get("podSelector", {})).get("matchLabels", {})
            c.check(labels_match(sel, pod_labels), f"{label}: {kind} selector does not select the pods")
    for np in of_kind(docs, "NetworkPolicy"):
        for rule in np["spec"].get("ingress", []):
            # A rule without ports would open every port, the internal one included.
            c.check(rule.get("ports"), f"{label}: a NetworkPolicy rule without ports opens them all")
            for p in rule.get("ports", []):
                c.check(p.get("port") in ports, f"{label}: NetworkPolicy names port {p.get('port')}")
    for hpa in of_kind(docs, "HorizontalPodAutoscaler"):
        c.check(hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"], f"{label}: HPA target")
        c.check("replicas" not in dep["spec"], f"{label}: with an HPA the Deployment must not set replicas")
    for ing in of_kind(docs, "Ingress"):
        for rule in ing["spec"]["rules"]:
            for p in rule["http"]["paths"]:
                backend = p["backend"]["service"]
                c.check(
                    svc is not None and backend["name"] == svc["metadata"]["name"] and backend["port"].get("name") == "http",
                    f"{label}: Ingress path {p['path']} must go to the Service's http port",
                )
    # The pod's environment: the Secret's variables, then the container's own env entries (a
    # valueFrom stands for a value of another Secret, which this check cannot read).
    pod_env = dict(env)
    for e in ctr.get("env", []):
        pod_env[e["name"]] = e.get("value", f"from-another-secret-{e['name'].lower()}")
    check_internal(c, label, docs, config, ports, pod_labels, pod_env)

    # `helm test`: a hook pod asking /readyz on the Service's admin port.
    if helm_release and svc:
        tests = [d for d in of_kind(docs, "Pod") if d["metadata"]["annotations"].get("helm.sh/hook") == "test"]
        c.check(len(tests) == 1, f"{label}: expected one helm test pod")
        for t in tests:
            script = " ".join(" ".join(x.get("command", []) + x.get("args", [])) for x in t["spec"]["containers"])
            url = f"http://{svc['metadata']['name']}:{svc_ports['admin']['port']}/readyz"
            c.check(url in script, f"{label}: the test pod does not fetch {url}")

    check_config(c, label, text, pod_env)
    return config


def is_internal_service(svc: dict) -> bool:
    return svc["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "internal"


def check_internal(
    c: Checker, label: str, docs: list[dict], config: dict, ports: dict[str, int], pod_labels: dict, env: dict[str, str]
) -> None:
    """The internal listener (POST /notify): on when server.internal_listen is set, and then on
    a ClusterIP Service of its own that no Ingress reaches, behind a NetworkPolicy rule that
    never allows everyone; each client's token comes from the environment, never the config."""
    internal = [s for s in of_kind(docs, "Service") if is_internal_service(s)]
    listen = config.get("server", {}).get("internal_listen")
    clients = config.get("clients", {})
    if listen is None:
        c.check(not internal, f"{label}: an internal Service without server.internal_listen")
        c.check("internal" not in ports, f"{label}: an internal container port without server.internal_listen")
        c.check(not clients, f"{label}: [clients] without the internal listener that serves them")
        return
    c.check(len(internal) == 1, f"{label}: server.internal_listen is set: expected one internal Service, found {len(internal)}")
    for svc in internal:
        name = svc["metadata"]["name"]
        c.check(labels_match(svc["spec"]["selector"], pod_labels), f"{label}: Service {name} does not select the pods")
        c.check(
            [(p["name"], p.get("targetPort")) for p in svc["spec"]["ports"]] in ([("internal", "internal")], [("internal", ports.get("internal"))]),
            f"{label}: Service {name} must have the internal port only: {svc['spec']['ports']}",
        )
        c.check(len(name) <= 63, f"{label}: Service name {name} is longer than a DNS label")
    for svc in of_kind(docs, "Service"):
        if not is_internal_service(svc):
            targets = {p.get("targetPort") for p in svc["spec"]["ports"]}
            c.check(not targets & {"internal", ports.get("internal")}, f"{label}: the main Service exposes the internal listener")

    # No Ingress reaches the internal listener, whatever its paths: it routes only the main
    # Service's public port, and the internal one is on another Service.
    internal_names = {s["metadata"]["name"] for s in internal}
    for ing in of_kind(docs, "Ingress"):
        backends = [p["backend"]["service"] for rule in ing["spec"]["rules"] for p in rule["http"]["paths"]]
        for backend in backends:
            c.check(
                backend["name"] not in internal_names
                and backend["port"].get("name") != "internal"
                and backend["port"].get("number") not in (ports.get("internal"), *(p["port"] for s in internal for p in s["spec"]["ports"])),
                f"{label}: the Ingress reaches the internal listener: {backend}",
            )

    # NetworkPolicy: the internal port is named by a rule that lists peers, never everyone,
    # and shares no rule with the public port.
    for np in of_kind(docs, "NetworkPolicy"):
        rules = np["spec"].get("ingress", [])
        internal_rules = [r for r in rules if any(p.get("port") in ("internal", ports.get("internal")) for p in r.get("ports", []))]
        c.check(internal_rules, f"{label}: the NetworkPolicy leaves the internal port closed")
        for rule in internal_rules:
            c.check(rule.get("from"), f"{label}: the NetworkPolicy opens the internal port to everyone")
            named = {p.get("port") for p in rule.get("ports", [])}
            c.check(not named & {"http", ports.get("http")}, f"{label}: the internal and public ports share a NetworkPolicy rule")

    # Clients: tokens from the environment (the Secret), never in the ConfigMap.
    for name, client in clients.items():
        c.check("token" not in client, f"{label}: clients.{name}.token is in the ConfigMap")
        c.check(f"IMBRIDGE_CLIENTS__{name.upper()}__TOKEN" in env, f"{label}: no IMBRIDGE_CLIENTS__{name.upper()}__TOKEN for client {name}")


def imbridge_binary() -> Path | None:
    candidates = [os.environ.get("IMBRIDGE_BIN"), ROOT / "target" / "debug" / "imbridge"]
    if os.environ.get("CARGO_TARGET_DIR"):
        candidates.append(Path(os.environ["CARGO_TARGET_DIR"]) / "debug" / "imbridge")
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


SKIPPED_CHECK_CONFIG: list[str] = []


def check_config(c: Checker, label: str, toml_text: str, env: dict[str, str]) -> None:
    """`imbridge check-config` on the rendered file, with the secrets as the pod's environment
    (and nothing else of this process's environment)."""
    binary = imbridge_binary()
    if binary is None:
        SKIPPED_CHECK_CONFIG.append(label)
        return
    placeholders = [k for k, v in env.items() if CLIENT_TOKEN.fullmatch(k) and v.startswith("REPLACE_ME")]
    if placeholders:
        # The examples' client tokens are placeholders the daemon must refuse, so that none is
        # ever deployed as is.
        run = run_check_config(binary, toml_text, env)
        for key in placeholders:
            name = CLIENT_TOKEN.fullmatch(key).group(1).lower()
            c.check(
                run.returncode != 0 and f"clients.{name}.token" in run.stderr + run.stdout,
                f"{label}: check-config accepted the placeholder {key}",
            )
    env = {
        k: TEST_AES_KEY if k.endswith("__AES_KEY") and not re.fullmatch(r"[A-Za-z0-9]{43}", v) else v
        for k, v in env.items()
    }
    env.update({k: f"test-token-of-{k.lower()}" for k in placeholders})
    run = run_check_config(binary, toml_text, env)
    c.check(run.returncode == 0, f"{label}: imbridge check-config exited {run.returncode}:\n{run.stderr}{run.stdout}")


# A notify client's token variable; group 1 is the client's name.
CLIENT_TOKEN = re.compile(r"IMBRIDGE_CLIENTS__([A-Z0-9_]+?)__TOKEN")


def run_check_config(binary: Path, toml_text: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "imbridge.toml"
        path.write_text(toml_text)
        return subprocess.run(
            [str(binary), "check-config", "--config", str(path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )


# ---------------------------------------------------------------------------------------------
# The chart


def lint(c: Checker, label: str, values: dict) -> None:
    for version in KUBE_VERSIONS:
        report = helm.lint(CHART, values, strict=True, kube_version=f"v{version}")
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        c.check(
            not problems and not report["errors"],
            f"{label}: helm lint (Kubernetes {version}): {problems or report['errors']}",
        )


def check_values_comments(c: Checker) -> None:
    """Every key of values.yaml has a comment right above it (or on its line)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^\s*(- )?[A-Za-z0-9_.-]+:", line) and not line.lstrip().startswith("#"):
            above = lines[i - 1].strip() if i else ""
            c.check(above.startswith("#") or " # " in line, f"values.yaml:{i + 1}: key without a comment: {line.strip()}")


def check_notes(c: Checker, label: str, notes: str, values: dict) -> None:
    """NOTES.txt names the callback URL of every configured app, and POST /notify on the
    internal Service only (the bus subjects when the internal listener is off)."""
    apps = values.get("config", {}).get("apps", {})
    for platform, by_name in apps.items():
        for name, app in by_name.items():
            url = f"/callbacks/{platform}/{name}"
            if (app or {}).get("mode") in ("stream", "websocket"):
                # No route: the app dials out, and the notes say so.
                c.check(url not in notes and f"{platform}/{name}" in notes, f"{label}: NOTES.txt lists {url} of a stream-mode app, or omits it")
            else:
                c.check(url in notes, f"{label}: NOTES.txt lacks {url}")
    c.check(f"http://{RELEASE}.{NAMESPACE}.svc:" not in notes, f"{label}: NOTES.txt sends notifications to the main Service")
    internal = deep_merge({"enabled": False, "service": {"port": 8081}}, values.get("internal", {}))
    base = f"http://{RELEASE}-internal.{NAMESPACE}.svc:{internal['service']['port']}/notify/"
    if internal["enabled"]:
        c.check(f"POST {base}<target>" in notes and "Authorization: Bearer" in notes, f"{label}: NOTES.txt lacks {base}")
    else:
        c.check("/notify/" not in notes, f"{label}: NOTES.txt names a /notify URL with the internal listener off")
    for target in values.get("config", {}).get("targets", {}):
        expected = f"{base}{target}" if internal["enabled"] else f"notify.{target}"
        c.check(expected in notes, f"{label}: NOTES.txt lacks {expected}")


def checksum(docs: list[dict], key: str) -> str:
    dep = of_kind(docs, "Deployment")[0]
    return dep["spec"]["template"]["metadata"]["annotations"].get(key, f"no {key}")


def refused(chart: helm.Chart, values: dict) -> str | None:
    """The error when the chart refuses `values`, None when it renders them."""
    try:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    except (helm.HelmValuesError, helm.HelmRenderError) as e:
        return str(e)
    return None


def check_chart(c: Checker) -> dict[str, list[dict]]:
    chart = helm.Chart.load(CHART)
    c.check(chart.metadata.get("apiVersion") == "v2", "Chart.yaml: apiVersion must be v2")
    c.check(chart.metadata.get("appVersion") == "0.1.0", "Chart.yaml: appVersion must be 0.1.0")
    c.check(chart.metadata.get("version") == "0.5.0", "Chart.yaml: version must be 0.5.0")
    check_values_comments(c)

    nats = values_file(CHART / "examples" / "values-nats.yaml")
    kafka = values_file(CHART / "examples" / "values-kafka.yaml")
    policy = values_file(CHART / "examples" / "values-networkpolicy.yaml")
    everything = deep_merge(
        nats,
        {
            "metrics": {
                "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
                "prometheusRule": {"enabled": True, "labels": {"release": "prometheus"}},
                "grafanaDashboard": {"enabled": True, "annotations": {"grafana_folder": "imbridge"}},
            },
            "autoscaling": {"enabled": True},
            "networkPolicy": {"enabled": True},
            "podAnnotations": {"example.com/team": "platform"},
            "extraEnv": [{"name": "RUST_LOG", "value": "info"}],
        },
    )
    cases = {
        "default values": {},
        "examples/values-nats.yaml": nats,
        "examples/values-kafka.yaml": kafka,
        "values-nats.yaml + values-networkpolicy.yaml": deep_merge(nats, policy),
        "values-nats.yaml + every optional resource": everything,
        "values-nats.yaml + a DingTalk app in stream mode": deep_merge(
            nats,
            {
                "config": {
                    "apps": {"dingtalk": {"ops": {"mode": "stream", "client_id": "dingopsclient"}}},
                    "streams": {"ping_interval": "30s", "down_fails_readiness": False},
                },
                "secrets": {"IMBRIDGE_APPS__DINGTALK__OPS__CLIENT_SECRET": "REPLACE_ME"},
            },
        ),
        "values-nats.yaml + a Lark app on the long connection": deep_merge(
            nats,
            {
                "config": {"apps": {"lark": {"ops": {"mode": "websocket", "app_id": "cli_ops", "domain": "https://open.larksuite.com"}}}},
                "secrets": {"IMBRIDGE_APPS__LARK__OPS__APP_SECRET": "REPLACE_ME"},
            },
        ),
        **internal_cases(nats),
    }
    rendered: dict[str, list[dict]] = {}
    for label, values in cases.items():
        lint(c, label, values)
        docs, notes = render(chart, values)
        rendered[label] = docs
        check_schemas(c, label, docs)
        secret = next(iter(of_kind(docs, "Secret")), None)
        check_release(c, label, docs, env=secret_env(secret))
        check_notes(c, label, notes, values)
    kinds = {d["kind"] for d in rendered["values-nats.yaml + every optional resource"]}
    for kind in ("Ingress", "ServiceMonitor", "PrometheusRule", "HorizontalPodAutoscaler", "NetworkPolicy", "PodDisruptionBudget"):
        c.check(kind in kinds, f"every optional resource: {kind} was not rendered")
    check_observability(c, rendered["values-nats.yaml + every optional resource"])
    for label, docs in rendered.items():
        if label != "values-nats.yaml + every optional resource":
            c.check(not of_kind(docs, "PrometheusRule"), f"{label}: a PrometheusRule by default")

    check_secrets_stay_secret(c, chart)
    check_checksums(c, chart, nats)
    check_reload(c, chart, nats, env=secret_env(next(iter(of_kind(rendered["examples/values-nats.yaml"], "Secret")))))
    check_network_policy_example(c, rendered["values-nats.yaml + values-networkpolicy.yaml"], policy["networkPolicy"])
    check_ingress_never_internal(c, chart, nats)

    # existingSecret: no Secret from the chart, the pods read the named one.
    label = "existingSecret"
    docs, _ = render(chart, deep_merge(nats, {"existingSecret": "imbridge-managed"}))
    check_schemas(c, label, docs)
    c.check(not of_kind(docs, "Secret"), f"{label}: the chart must not create a Secret")
    check_release(c, label, docs, env=secret_env(next(iter(of_kind(rendered["examples/values-nats.yaml"], "Secret")))))
    dep = of_kind(docs, "Deployment")[0]
    refs = [e["secretRef"]["name"] for e in dep["spec"]["template"]["spec"]["containers"][0]["envFrom"]]
    c.check(refs == ["imbridge-managed"], f"{label}: envFrom names {refs}")

    # Ports and grace period come from one value each; the daemon and the pod agree on them.
    label = "ports and grace changed"
    docs, _ = render(chart, deep_merge(nats, {"ports": {"http": 18080, "admin": 19090}, "shutdownGraceSeconds": 45}))
    config = check_release(c, label, docs, env=secret_env(of_kind(docs, "Secret")[0]))
    c.check(config.get("server", {}).get("shutdown_grace") == "45s", f"{label}: shutdown_grace {config.get('server')}")
    c.check(of_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 55, f"{label}: grace")

    # What the chart must refuse.
    refusals = {
        "a token under config.apps": {"config": {"apps": {"dingtalk": {"main": {"receiver_id": "x", "token": "t"}}}}},
        "an aes_key under config.apps": {"config": {"apps": {"wecom": {"main": {"corp_id": "x", "aes_key": "k"}}}}},
        "a Lark encrypt_key under config.apps": {"config": {"apps": {"lark": {"main": {"encrypt_key": "k"}}}}},
        "a DingTalk client_secret under config.apps": {"config": {"apps": {"dingtalk": {"s": {"mode": "stream", "client_id": "d", "client_secret": "s"}}}}},
        "a stream-mode DingTalk app without its client_id": {"config": {"apps": {"dingtalk": {"s": {"mode": "stream"}}}}},
        "an unknown key under config.streams": {"config": {"streams": {"ping": "1s"}}},
        "a Lark app_secret under config.apps": {"config": {"apps": {"lark": {"s": {"mode": "websocket", "app_id": "cli_s", "app_secret": "s"}}}}},
        "a websocket-mode Lark app without its app_id": {"config": {"apps": {"lark": {"s": {"mode": "websocket"}}}}},
        "an http:// Lark domain": {"config": {"apps": {"lark": {"s": {"mode": "websocket", "app_id": "cli_s", "domain": "http://x"}}}}},
        "a webhook url under config.targets": {"config": {"targets": {"ops": {"kind": "dingtalk_robot", "url": "u"}}}},
        "an app_secret under config.targets": {"config": {"targets": {"w": {"kind": "wecom_app", "app_secret": "s"}}}},
        "a NATS password under config.bus": {"config": {"bus": {"nats": {"password": "p"}}}},
        "a proxy (it may hold credentials) under config.http": {"config": {"http": {"proxy": "http://u:p@proxy:3128"}}},
        "a target's proxy under config.targets": {"config": {"targets": {"ops": {"kind": "dingtalk_robot", "proxy": "none"}}}},
        "a Kafka sasl.password under config.bus": {"config": {"bus": {"kafka": {"properties": {"sasl.password": "p"}}}}},
        "server.listen (the chart's own)": {"config": {"server": {"listen": "0.0.0.0:1"}}},
        "a secret overriding [server]": {"secrets": {"IMBRIDGE_SERVER__LISTEN": "0.0.0.0:1"}},
        "a secret not named IMBRIDGE_…": {"secrets": {"PASSWORD": "p"}},
        "an upper-case app name (env names are lower-cased)": {"config": {"apps": {"lark": {"Main": {}}}}},
        "two replicas on the in-process memory bus": {"replicaCount": 2},
        "autoscaling on the in-process memory bus": {"autoscaling": {"enabled": True}},
        "a mount over the config directory": {"extraVolumeMounts": [{"name": "x", "mountPath": "/etc/imbridge"}]},
    }
    for what, values in refusals.items():
        c.check(refused(chart, values) is not None, f"the chart accepted {what}")

    # The internal listener's refusals, each for its own reason (the message names it).
    internal_refusals = {
        "server.internal_listen (the chart's own)": ({"config": {"server": {"internal_listen": "0.0.0.0:1"}}}, "internal_listen"),
        "the internal listener without clients or allow_anonymous": ({"internal": {"enabled": True}}, "allow_anonymous"),
        "clients without the internal listener": (
            {"config": {"clients": {"ci": {"targets": ["ops"]}}}, "secrets": {"IMBRIDGE_CLIENTS__CI__TOKEN": "0123456789abcdef"}},
            "internal.enabled is false",
        ),
        "a token under config.clients": (
            {"internal": {"enabled": True}, "config": {"clients": {"ci": {"targets": ["ops"], "token": "0123456789abcdef"}}}},
            "'token' not allowed",
        ),
        "a client without its token in secrets": (
            {"internal": {"enabled": True}, "config": {"clients": {"ci": {"targets": ["ops"]}}}},
            "secrets.IMBRIDGE_CLIENTS__CI__TOKEN",
        ),
        "a client naming no target": (
            {
                "internal": {"enabled": True},
                "config": {"clients": {"ci": {"targets": []}}},
                "secrets": {"IMBRIDGE_CLIENTS__CI__TOKEN": "0123456789abcdef"},
            },
            "/config/clients/ci/targets",
        ),
        "a client name that is no variable name (\"-\")": (
            {
                "internal": {"enabled": True},
                "config": {"clients": {"c-i": {"targets": ["ops"]}}},
                "secrets": {"IMBRIDGE_CLIENTS__C-I__TOKEN": "0123456789abcdef"},
            },
            "'c-i'",
        ),
        "the internal port equal to the public one": (
            {"internal": {"enabled": True}, "config": {"server": {"allow_anonymous": True}}, "ports": {"internal": 8080}},
            "must differ",
        ),
        "the internal port equal to the admin one": (
            {"internal": {"enabled": True}, "config": {"server": {"allow_anonymous": True}}, "ports": {"internal": 9090}},
            "must differ",
        ),
        "an empty networkPolicy.internalFrom (everyone)": ({"networkPolicy": {"enabled": True, "internalFrom": []}}, "/networkPolicy/internalFrom"),
        "an unknown internal Service type": ({"internal": {"service": {"type": "ExternalName"}}}, "/internal/service/type"),
    }
    for what, (values, reason) in internal_refusals.items():
        error = refused(chart, values)
        c.check(error is not None and reason in error, f"the chart accepted {what}, or refused it for another reason: {error}")
    return rendered


def internal_cases(nats: dict) -> dict[str, dict]:
    """Render sets of the internal listener beyond the examples: anonymous, tokens from
    existingSecret and from extraEnv, another port and Service type, the memory bus."""
    anonymous = deep_merge(nats, {"config": {"server": {"allow_anonymous": True}}, "networkPolicy": {"enabled": True}})
    del anonymous["config"]["clients"], anonymous["secrets"]["IMBRIDGE_CLIENTS__CI__TOKEN"]
    return {
        "internal listener, anonymous": anonymous,
        "internal listener, two clients, token from extraEnv": deep_merge(
            nats,
            {
                "ports": {"internal": 18081},
                "internal": {"service": {"port": 8443, "type": "LoadBalancer", "annotations": {"networking.gke.io/load-balancer-type": "Internal"}}},
                "config": {"clients": {"zentao": {"targets": ["ops*"], "allow_recipients": True, "allow_raw": False}}},
                "extraEnv": [{"name": "IMBRIDGE_CLIENTS__ZENTAO__TOKEN", "valueFrom": {"secretKeyRef": {"name": "zentao", "key": "token"}}}],
                "networkPolicy": {"enabled": True, "internalFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "zentao"}}}]},
                "ingress": {"hosts": [{"host": "imbridge.example.com", "paths": [{"path": "/", "pathType": "Prefix"}]}]},
            },
        ),
        "internal listener on the memory bus": {
            "internal": {"enabled": True},
            "config": {"targets": {"ops": {"kind": "dingtalk_robot"}}, "clients": {"ci": {"targets": ["ops"]}}},
            "secrets": {
                "IMBRIDGE_CLIENTS__CI__TOKEN": "REPLACE_ME",
                "IMBRIDGE_TARGETS__OPS__URL": "https://oapi.dingtalk.com/robot/send?access_token=x",
            },
        },
    }


def check_network_policy_example(c: Checker, docs: list[dict], example: dict) -> None:
    """examples/values-networkpolicy.yaml: each listener's port gets exactly the example's peers."""
    label = "values-networkpolicy.yaml"
    np = one(c, label, docs, "NetworkPolicy")
    if np is None:
        return
    by_port = {}
    for rule in np["spec"]["ingress"]:
        for p in rule["ports"]:
            by_port[p["port"]] = rule.get("from", [])
    c.check(set(by_port) == {"http", "internal", "admin"}, f"{label}: ports {sorted(by_port)}")
    for port, key in (("http", "httpFrom"), ("internal", "internalFrom"), ("admin", "adminFrom")):
        c.check(by_port.get(port) == example[key], f"{label}: port {port} allows {by_port.get(port)}, not {key}")
        c.check(by_port.get(port), f"{label}: the example leaves port {port} open to everyone")


def check_ingress_never_internal(c: Checker, chart: helm.Chart, nats: dict) -> None:
    """Whatever paths the Ingress routes (/notify, /), it reaches the public port only; the
    public Service has no internal port to route to."""
    label = "Ingress with every path"
    paths = [{"path": p, "pathType": "Prefix"} for p in ("/", "/notify", "/callbacks")]
    docs, _ = render(chart, deep_merge(nats, {"ingress": {"hosts": [{"host": "imbridge.example.com", "paths": paths}]}}))
    ing = one(c, label, docs, "Ingress")
    backends = [p["backend"]["service"] for rule in (ing or {"spec": {"rules": []}})["spec"]["rules"] for p in rule["http"]["paths"]]
    c.check(len(backends) == 3, f"{label}: expected 3 paths, found {len(backends)}")
    c.check(all(b == {"name": RELEASE, "port": {"name": "http"}} for b in backends), f"{label}: backends {backends}")
    check_release(c, label, docs, env=secret_env(of_kind(docs, "Secret")[0]))


def check_secrets_stay_secret(c: Checker, chart: helm.Chart) -> None:
    """Secret values set to marker strings appear in the Secret and nowhere else (raw or base64),
    and the daemon gets a complete configuration from the ConfigMap plus that environment."""
    label = "secret markers"
    markers = {
        "IMBRIDGE_APPS__DINGTALK__MAIN__TOKEN": "markerDingTalkToken1",
        "IMBRIDGE_APPS__DINGTALK__MAIN__AES_KEY": "MarkerDingTalkAesKey" + "x" * 23,
        "IMBRIDGE_APPS__WECOM__MAIN__TOKEN": "markerWeComToken2",
        "IMBRIDGE_APPS__WECOM__MAIN__AES_KEY": "MarkerWeComAesKey" + "y" * 26,
        "IMBRIDGE_APPS__LARK__MAIN__VERIFICATION_TOKEN": "markerLarkToken3",
        "IMBRIDGE_APPS__LARK__MAIN__ENCRYPT_KEY": "markerLarkEncryptKey4",
        "IMBRIDGE_TARGETS__OPS__URL": "https://oapi.dingtalk.com/robot/send?access_token=markerAccessToken5",
        "IMBRIDGE_TARGETS__OPS__SECRET": "SECmarkerRobotSecret6",
        "IMBRIDGE_TARGETS__WAPP__APP_SECRET": "markerAppSecret7",
        "IMBRIDGE_BUS__NATS__PASSWORD": "markerNatsPassword8",
        "IMBRIDGE_CLIENTS__CI__TOKEN": "markerClientToken9abcdef",
    }
    values = {
        "replicaCount": 2,
        "ingress": {"enabled": True},
        "internal": {"enabled": True},
        "secrets": markers,
        "config": {
            "bus": {"kind": "nats", "nats": {"url": "nats://nats:4222", "user": "imbridge"}},
            "apps": {
                "dingtalk": {"main": {"receiver_id": "dingcorp"}},
                "wecom": {"main": {"corp_id": "wwcorp"}},
                "lark": {"main": {}},
            },
            "targets": {
                "ops": {"kind": "dingtalk_robot"},
                "wapp": {"kind": "wecom_app", "corp_id": "wwcorp", "agent_id": 1000002, "users": ["zhangsan"]},
            },
            "users": {"zhangsan": {"wecom": "ZhangSan"}},
            "clients": {"ci": {"targets": ["ops", "wapp"]}},
        },
    }
    docs, notes = render(chart, values)
    check_schemas(c, label, docs)
    secret = one(c, label, docs, "Secret")
    env = secret_env(secret)
    c.check(env == markers, f"{label}: the Secret does not hold exactly the secrets")
    elsewhere = yaml.safe_dump_all([strip_source(d) for d in docs if d["kind"] != "Secret"]) + notes
    for key, marker in markers.items():
        encoded = base64.b64encode(marker.encode()).decode()
        c.check(marker not in elsewhere and encoded not in elsewhere, f"{label}: the value of {key} leaked outside the Secret")
    # Complete: check-config passes with the ConfigMap and exactly these variables.
    check_release(c, label, docs, env=env)


def check_checksums(c: Checker, chart: helm.Chart, base: dict) -> None:
    """checksum/config follows the config and only it; checksum/secret follows the secrets."""
    label = "checksums"
    docs, _ = render(chart, base)
    config_changed, _ = render(chart, deep_merge(base, {"config": {"log": {"level": "debug"}}}))
    port_changed, _ = render(chart, deep_merge(base, {"ports": {"http": 8082}}))
    secrets = dict(base.get("secrets", {}), IMBRIDGE_APPS__DINGTALK__MAIN__TOKEN="rotated")
    secret_changed, _ = render(chart, {**base, "secrets": secrets})
    again, _ = render(chart, base)
    c.check(checksum(docs, "checksum/config") == checksum(again, "checksum/config"), f"{label}: not deterministic")
    c.check(checksum(docs, "checksum/config") != checksum(config_changed, "checksum/config"), f"{label}: config change, same checksum/config")
    c.check(checksum(docs, "checksum/config") != checksum(port_changed, "checksum/config"), f"{label}: port change, same checksum/config")
    c.check(checksum(docs, "checksum/secret") == checksum(config_changed, "checksum/secret"), f"{label}: config change moved checksum/secret")
    c.check(checksum(docs, "checksum/secret") != checksum(secret_changed, "checksum/secret"), f"{label}: secret change, same checksum/secret")
    c.check(checksum(docs, "checksum/config") == checksum(secret_changed, "checksum/config"), f"{label}: secret change moved checksum/config")


def check_reload(c: Checker, chart: helm.Chart, base: dict, env: dict[str, str]) -> None:
    """config.reload: the daemon watches the mounted file (a directory mount, which the kubelet
    updates; a subPath mount never is), a change the daemon reloads leaves the pods alone,
    and what it applies only at start still rolls them."""
    label = "config.reload"
    on = deep_merge(base, {"config": {"reload": True}})
    docs, _ = render(chart, on)
    # The switch is the chart's, not a key of the file: check-config passes on the result.
    parsed = check_release(c, label, docs, env=env)
    c.check("reload" not in parsed, f"{label}: rendered into the TOML")
    dep = one(c, label, docs, "Deployment")
    if dep is None:
        return
    container = dep["spec"]["template"]["spec"]["containers"][0]
    c.check(container["args"][-1] == "--watch", f"{label}: serve without --watch")
    mounts = [m for m in container.get("volumeMounts", []) if m["name"] == "config"]
    c.check(all("subPath" not in m for m in mounts), f"{label}: a subPath mount is never updated")
    off, _ = render(chart, base)
    off_dep = one(c, label, off, "Deployment")
    c.check("--watch" not in off_dep["spec"]["template"]["spec"]["containers"][0]["args"], f"{label}: --watch without it")
    template_changed, _ = render(chart, deep_merge(on, {"config": {"templates": {"reloaded": {"text": "x"}}}}))
    port_changed, _ = render(chart, deep_merge(on, {"ports": {"http": 8082}}))
    bus_changed, _ = render(chart, deep_merge(on, {"config": {"log": {"level": "debug"}}}))
    pod = lambda d: one(c, label, d, "Deployment")["spec"]["template"]
    c.check(pod(docs) == pod(template_changed), f"{label}: a reloadable change rolls the pods")
    c.check(checksum(docs, "checksum/restart") != checksum(port_changed, "checksum/restart"), f"{label}: port change, same checksum/restart")
    c.check(checksum(docs, "checksum/restart") != checksum(bus_changed, "checksum/restart"), f"{label}: log change, same checksum/restart")


# ---------------------------------------------------------------------------------------------
# deploy/


def check_plain_manifests(c: Checker) -> None:
    """deploy/k8s: valid, the same properties as the chart, and the chart's defaults with the
    internal listener on and the NetworkPolicy of examples/values-networkpolicy.yaml."""
    label = "deploy/k8s"
    docs = []
    examples = [DEPLOY / "k8s" / "secret.yaml.example", DEPLOY / "k8s" / "networkpolicy.yaml.example"]
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")) + examples:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                c.check("namespace" not in doc["metadata"], f"{path.name}: must not name a namespace")
                doc["metadata"].setdefault("annotations", {})
                docs.append({**doc, "_source": path.name})
    check_schemas(c, label, docs)
    check_release(c, label, docs, env=secret_env(one(c, label, docs, "Secret")), helm_release=False)

    # The same pod as the chart renders by default with the internal listener on, but for the
    # replica count and the image; the same Services and policies.
    def essentials(docs: list[dict]) -> dict:
        dep = of_kind(docs, "Deployment")[0]
        pod = copy.deepcopy(dep["spec"]["template"]["spec"])
        for ctr in pod["containers"]:
            ctr.pop("image")
        services = {is_internal_service(s): s["spec"] for s in of_kind(docs, "Service")}
        pdb = of_kind(docs, "PodDisruptionBudget")[0]["spec"]
        policy = of_kind(docs, "NetworkPolicy")[0]["spec"]
        return {
            "pod": pod,
            "service": services.get(False),
            "internal service": services.get(True),
            "pdb": pdb,
            "networkpolicy": policy,
            "selector": dep["spec"]["selector"],
        }

    chart_docs, _ = render(
        helm.Chart.load(CHART),
        {
            "internal": {"enabled": True},
            "config": {"server": {"allow_anonymous": True}},
            "networkPolicy": values_file(CHART / "examples" / "values-networkpolicy.yaml")["networkPolicy"],
        },
    )
    ours, chart = essentials(docs), essentials(chart_docs)
    for part in ours:
        c.check(ours[part] == chart[part], f"{label}: {part} differs from the chart's defaults:\n{ours[part]}\n{chart[part]}")
    c.check(of_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["image"] == "imbridge:0.1.0", f"{label}: image")


def dockerfile_instructions(text: str) -> list[str]:
    """The Dockerfile's instructions, comments dropped, continuations joined, spaces collapsed."""
    instructions, current = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        if current.strip():
            instructions.append(" ".join(current.split()))
        current = ""
    return instructions


def check_image_and_compose(c: Checker) -> None:
    """The Dockerfile and compose file agree with the image's default config."""
    label = "deploy/"
    default_toml = (DEPLOY / "imbridge.toml").read_text()
    server = tomllib.loads(default_toml)["server"]
    listen, admin = port_of(server["listen"]), port_of(server["admin_listen"])
    check_config(c, "deploy/imbridge.toml", default_toml, {})

    instructions = dockerfile_instructions((DEPLOY / "Dockerfile").read_text())
    exposed = [line.split()[1:] for line in instructions if line.startswith("EXPOSE ")]
    c.check(exposed == [[str(listen), str(admin)]], f"{label}Dockerfile: EXPOSE {exposed}, config has {listen} {admin}")
    builds = [line for line in instructions if line.startswith("RUN ") and "cargo build" in line]
    c.check(
        len(builds) == 2 and all(re.search(r"cargo build --release --locked( &&|$)", line) for line in builds),
        f"{label}Dockerfile: both builds (dependencies, then the crate) must be `cargo build --release --locked`",
    )
    for expected in (
        "COPY deploy/imbridge.toml /etc/imbridge/imbridge.toml",
        "USER 65532:65532",
        'ENTRYPOINT ["/usr/local/bin/imbridge"]',
        'CMD ["serve", "--config", "/etc/imbridge/imbridge.toml"]',
    ):
        c.check(expected in instructions, f"{label}Dockerfile: missing `{expected}`")
    ignore = (ROOT / ".dockerignore").read_text().split()
    for line in instructions:
        if not line.startswith("COPY ") or line.startswith("COPY --from"):
            continue
        for source in line.split()[1:-1]:
            c.check(f"!{source}" in ignore or f"!{source}/" in ignore, f"{label}.dockerignore leaves out {source}")

    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    c.check("-js" in services["nats"]["command"], f"{label}compose.yaml: NATS without JetStream")
    bridge = services["imbridge"]
    env = {k: str(v) for k, v in bridge["environment"].items()}
    c.check(env.get("IMBRIDGE_BUS__KIND") == "nats", f"{label}compose.yaml: bus is not nats")
    check_config(c, "deploy/compose.yaml", default_toml, env)
    published = {p.split(":")[-1] for p in bridge["ports"]}
    internal = env.get("IMBRIDGE_SERVER__INTERNAL_LISTEN")
    c.check(internal is not None, f"{label}compose.yaml: the internal listener (POST /notify) is off")
    expected = {str(listen), str(admin)} | ({str(port_of(internal))} if internal else set())
    c.check(published == expected, f"{label}compose.yaml: ports {published}, expected {expected}")
    # POST /notify is published on the loopback interface only, never on the host's network.
    for p in bridge["ports"]:
        if internal and p.split(":")[-1] == str(port_of(internal)):
            c.check(p.startswith("127.0.0.1:"), f"{label}compose.yaml: the internal port is published as {p}")
    c.check(f"/dev/tcp/127.0.0.1/{admin}" in " ".join(bridge["healthcheck"]["test"]), f"{label}compose.yaml: healthcheck port")
    c.check(seconds_of(bridge["stop_grace_period"]) > seconds_of(server["shutdown_grace"]), f"{label}compose.yaml: stop_grace_period")


def main() -> int:
    c = Checker()
    print(f"helm-python-sdk {helm.__version__} (Helm {helm.helm_sdk_version()}), "
          f"kubernetes-validate {kubernetes_validate.__version__}, Kubernetes {' and '.join(KUBE_VERSIONS)}")
    # A stage that crashes (a manifest missing a field the checks read) is one more failure;
    # the other stages still run, so one run lists everything.
    for stage in (
        lambda: check_chart(c),
        lambda: check_plain_manifests(c),
        lambda: check_image_and_compose(c),
    ):
        try:
            stage()
        except Exception:
            c.check(False, f"a check crashed:\n{traceback.format_exc()}")
    if SKIPPED_CHECK_CONFIG:
        print(f"note: no imbridge binary (IMBRIDGE_BIN, target/debug/imbridge): check-config skipped for "
              f"{len(SKIPPED_CHECK_CONFIG)} configurations")
    for failure in c.failures:
        print(f"FAIL {failure}")
    print(f"{c.passed} passed, {len(c.failures)} failed")
    return 1 if c.failures else 0


if __name__ == "__main__":
    sys.exit(main())
