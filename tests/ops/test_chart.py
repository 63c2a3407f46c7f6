"""The Helm chart: lint, render with default and production values, validate every
manifest against the Kubernetes schemas, and check that the rendered tessera.toml is
accepted by the services' own configuration loader (`--check-config`)."""

import os
import pathlib
import json
import subprocess

import kubernetes_validate
import pytest
import yaml
from helm_python.chart import Chart, lint

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "tessera"
PRODUCTION = yaml.safe_load((CHART / "values-production.yaml").read_text())
KUBE_VERSION = "1.30.0"
SECRET = {"pseudonymSecret": "chart-test-pseudonym-secret-0123456789abcdef"}
# The defaults with the one value a deployment must set.
VALUES = {"default": SECRET, "production": PRODUCTION}


def render(values, secret=True):
    """The chart's manifests for these values (with a pseudonym secret, which a
    deployment must set, unless `secret` is false)."""
    if secret and not (values or {}).get("existingConfigSecret"):
        values = {**SECRET, **(values or {})}
    with Chart.load(CHART) as chart:
        out = chart.render(values, name="shop", namespace="cdp", is_install=True)
    docs = []
    for path, text in out.items():
        if path.endswith(".txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def configuration(docs, tmp_path):
    """The rendered tessera.toml with the definitions ConfigMap written where it points
    (as the pod's mount would have them), so `--check-config` checks the definitions too."""
    folder = tmp_path / "definitions"
    folder.mkdir(exist_ok=True)
    cm = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-definitions")][0]
    for name, text in cm["data"].items():
        (folder / name).write_text(text)
    toml_text = by_kind(docs, "Secret")[0]["stringData"]["tessera.toml"]
    config = tmp_path / "tessera.toml"
    config.write_text(toml_text.replace("/etc/tessera/definitions", str(folder)))
    return config


@pytest.mark.parametrize("name", VALUES)
def test_chart_lints_clean_in_strict_mode(name):
    report = lint(CHART, VALUES[name], strict=True, kube_version="v" + KUBE_VERSION)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


@pytest.mark.parametrize("name", VALUES)
def test_every_manifest_is_valid_kubernetes(name):
    docs = render(VALUES[name])
    assert docs
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            # A Prometheus Operator CRD: not in the core schemas.
            assert doc["spec"]["endpoints"][0]["path"] == "/metrics"
            continue
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("name", VALUES)
def test_stateful_services_keep_rocksdb_on_volumes_and_are_probed(name):
    docs = render(VALUES[name])
    sets = {d["metadata"]["name"]: d for d in by_kind(docs, "StatefulSet")}
    assert set(sets) == {"shop-tessera-identity", "shop-tessera-profiles", "shop-tessera-activation"}
    for s in sets.values():
        pod = s["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert s["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "state"
        assert {"name": "state", "mountPath": "/var/lib/tessera"} in container["volumeMounts"]
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        names = [e["name"] for e in container["env"]]
        assert "TESSERA__KAFKA__GROUP_INSTANCE_ID" in names, "static membership from the pod name"
    assert "shop-tessera-ingest" in {d["metadata"]["name"] for d in by_kind(docs, "Deployment")}
    assert {d["metadata"]["name"] for d in by_kind(docs, "PodDisruptionBudget")} == {
        "shop-tessera-ingest", "shop-tessera-identity", "shop-tessera-profiles", "shop-tessera-activation"
    }


def test_production_values_autoscale_ingest_and_take_config_from_an_existing_secret():
    docs = render(PRODUCTION)
    assert not by_kind(docs, "Secret"), "write keys stay out of the chart"
    assert by_kind(docs, "HorizontalPodAutoscaler")[0]["spec"]["maxReplicas"] == 20
    ingest = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"].endswith("-ingest")][0]
    assert "replicas" not in ingest["spec"], "the HPA owns replicas"
    console = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"].endswith("-console")]
    assert console and console[0]["spec"]["template"]["spec"]["containers"][0]["command"] == ["/usr/local/bin/tessera-console"]
    for workload in by_kind(docs, "Deployment") + by_kind(docs, "StatefulSet"):
        volumes = workload["spec"]["template"]["spec"]["volumes"]
        assert {"name": "config", "secret": {"secretName": "tessera-config-prod"}} in volumes
    assert by_kind(docs, "ServiceMonitor")[0]["metadata"]["labels"]["release"] == "prometheus"


def test_the_rendered_configuration_is_accepted_by_every_service(tmp_path):
    values = {
        "kafka": {"properties": {"security.protocol": "SASL_SSL", "sasl.password": "s3cret"}},
        "apiTokens": [{"name": "console", "token": "change-me-console-token"}],
        "console": {"enabled": True, "apiToken": "change-me-console-token",
                    "users": [{"name": "ops", "password": "change-me-long-passphrase"}]},
    }
    config = configuration(render(values), tmp_path)
    bin_dir = pathlib.Path(os.environ["TESSERA_BIN_DIR"])
    for service in ["ingest", "identity", "profiles", "activation", "console"]:
        out = subprocess.run(
            [bin_dir / f"tessera-{service}", "--config", config, "--check-config"],
            capture_output=True, text=True, env={"PATH": os.environ["PATH"]},
        )
        assert out.returncode == 0, out.stderr
        assert '"bootstrap": "kafka:9092"' in out.stdout
        assert "s3cret" not in out.stdout and "change-me" not in out.stdout, "secrets are masked"


def test_the_chart_needs_a_pseudonym_secret_and_the_services_get_it(tmp_path):
    with pytest.raises(Exception, match="pseudonymSecret"):
        render({}, secret=False)
    with pytest.raises(Exception, match="pseudonymSecret"):
        render({"pseudonymSecret": "short"}, secret=False)
    config = configuration(render({}), tmp_path)
    assert SECRET["pseudonymSecret"] in config.read_text()


def test_a_broken_value_is_refused_by_the_services(tmp_path):
    secret = by_kind(render({"topics": {"partitions": 0}}), "Secret")[0]
    config = tmp_path / "tessera.toml"
    config.write_text(secret["stringData"]["tessera.toml"])
    out = subprocess.run(
        [pathlib.Path(os.environ["TESSERA_BIN_DIR"]) / "tessera-profiles", "--config", config, "--check-config"],
        capture_output=True, text=True, env={"PATH": os.environ["PATH"]},
    )
    assert out.returncode != 0
    assert "partitions" in out.stderr


def test_identity_rules_from_values_reach_identity_and_are_checked(tmp_path):
    rules = (pathlib.Path(__file__).parents[2] / "services/identity/rules.toml").read_text()
    custom = rules.replace('phone_default_region = "US"', 'phone_default_region = "GB"')
    docs = render({"identityRules": custom})
    cm = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-definitions")][0]
    assert 'phone_default_region = "GB"' in cm["data"]["identity-rules.toml"]
    toml_text = by_kind(docs, "Secret")[0]["stringData"]["tessera.toml"]
    assert 'rules_file = "/etc/tessera/definitions/identity-rules.toml"' in toml_text
    bin_dir = pathlib.Path(os.environ["TESSERA_BIN_DIR"])
    for text, ok in [(custom, True), (custom.replace("limit = 1\n", "limit = 0\n", 1), False)]:
        rules_file = tmp_path / "identity-rules.toml"
        rules_file.write_text(text)
        config = tmp_path / "tessera.toml"
        config.write_text(toml_text.replace("/etc/tessera/definitions/identity-rules.toml", str(rules_file)))
        out = subprocess.run(
            [bin_dir / "tessera-identity", "--config", config, "--check-config"],
            capture_output=True, text=True, env={"PATH": os.environ["PATH"]},
        )
        assert (out.returncode == 0) == ok, out.stderr
        if not ok:
            assert "limit must be at least 1" in out.stderr


def test_trait_strategies_from_values_are_accepted_by_profiles(tmp_path):
    values = {"traitStrategies": {"lifetime_value": {"strategy": "max"},
                                  "email": {"strategy": "source_priority", "sources": ["crm", "web"]}}}
    config = configuration(render(values), tmp_path)
    toml_text = config.read_text()
    bin_dir = pathlib.Path(os.environ["TESSERA_BIN_DIR"])
    for text, ok in [(toml_text, True), (toml_text.replace('"max"', '"maximum"'), False)]:
        config.write_text(text)
        out = subprocess.run(
            [bin_dir / "tessera-profiles", "--config", config, "--check-config"],
            capture_output=True, text=True, env={"PATH": os.environ["PATH"]},
        )
        assert (out.returncode == 0) == ok, out.stderr
        if ok:
            assert '"sources": [' in out.stdout and '"strategy": "max"' in out.stdout
        else:
            assert "maximum" in out.stderr


def test_definitions_from_values_are_checked_by_profiles(tmp_path):
    good = {"segments": {"lapsed.yaml": "id: lapsed\ncondition:\n  not:\n    event_count: {event: Order Completed, min: 1, within: 30d}\n"}}
    bad = {"segments": {"lapsed.yaml": "id: lapsed\ncondition:\n  not:\n    event_count: {event: Order Completed, min: 1, within: 3y}\n"}}
    bin_dir = pathlib.Path(os.environ["TESSERA_BIN_DIR"])
    for values, ok in [(good, True), (bad, False)]:
        config = configuration(render(values), tmp_path)
        out = subprocess.run(
            [bin_dir / "tessera-profiles", "--config", config, "--check-config"],
            capture_output=True, text=True, env={"PATH": os.environ["PATH"]},
        )
        assert (out.returncode == 0) == ok, out.stderr
        if not ok:
            assert "lapsed.yaml" in out.stderr and "unit must be m, h, d or w" in out.stderr


def test_sources_and_destinations_from_values_reach_the_services(tmp_path):
    """Key rotation, a disabled source and a rate limit reach ingest; destinations with
    kinds, caps and suppressions reach activation; a cap that is no duration is refused."""
    values = {
        "apiTokens": [{"name": "crm-sync", "token": "a-long-api-token-for-crm"}],
        "privacyTokens": [{"name": "dpo", "token": "a-long-privacy-token-for-dpo"}],
        "classification": {"pii": ["email", "phone"], "sensitive": ["health"]},
        "sources": [
            {"name": "web", "writeKey": "k-new", "previousWriteKeys": ["k-old"]},
            {"name": "old-app", "writeKey": "o", "enabled": False},
            {"name": "partner", "writeKey": "p", "maxEventsPerSecond": 200},
        ],
        "destinations": [
            {"id": "ads", "kind": "meta_ads", "segments": ["buyers"], "fields": ["email", "phone"],
             "format": "avro"},
            {"id": "cart", "kind": "email", "triggers": ["abandoned-cart"], "fields": ["email"],
             "frequencyCap": {"max": 2, "per": "12h"}},
            {"id": "care", "kind": "email", "segments": ["buyers"], "fields": ["email", "health"],
             "allowLabels": ["pii", "sensitive"]},
        ],
        "suppressions": [{"id": "no-ads", "segment": "buyers", "destinations": ["ads"]}],
    }
    config = configuration(render(values), tmp_path)
    bin_dir = pathlib.Path(os.environ["TESSERA_BIN_DIR"])

    def check(service):
        return subprocess.run(
            [bin_dir / f"tessera-{service}", "--config", config, "--check-config"],
            capture_output=True, text=True, env={"PATH": os.environ["PATH"]},
        )

    out = check("ingest")
    assert out.returncode == 0, out.stderr
    assert '"previous_write_keys": [' in out.stdout and '"***"' in out.stdout
    assert "k-old" not in out.stdout and '"enabled": false' in out.stdout
    assert '"max_events_per_second": 200' in out.stdout
    assert '"name": "crm-sync"' in out.stdout and "a-long-api-token" not in out.stdout
    # The privacy API takes only the chart's privacy tokens, never the built-in demo one.
    assert '"name": "dpo"' in out.stdout and "a-long-privacy-token" not in out.stdout
    assert "demo-privacy" not in out.stdout
    assert '"sensitive": [' in out.stdout
    out = check("activation")
    assert out.returncode == 0, out.stderr
    assert '"kind": "meta_ads"' in out.stdout and '"per": "12h"' in out.stdout
    assert '"allow_labels": [' in out.stdout
    config.write_text(config.read_text().replace('per = "12h"', 'per = "twice"'))
    out = check("activation")
    assert out.returncode != 0 and "twice" in out.stderr, out.stderr


def test_the_console_runs_in_production_mode_and_needs_its_users(tmp_path):
    """Enabled without users the chart refuses to render; with a short password the
    console refuses the rendered configuration (production mode)."""
    with pytest.raises(Exception, match="console.users"):
        render({"console": {"enabled": True, "apiToken": "change-me-console-token"}})
    values = {
        "apiTokens": [{"name": "console", "token": "change-me-console-token"}],
        "console": {"enabled": True, "apiToken": "change-me-console-token",
                    "users": [{"name": "ops", "password": "short"}]},
    }
    docs = render(values)
    assert [s["spec"]["ports"][0]["port"] for s in by_kind(docs, "Service") if s["metadata"]["name"].endswith("-console")] == [80]
    config = configuration(docs, tmp_path)
    out = subprocess.run(
        [pathlib.Path(os.environ["TESSERA_BIN_DIR"]) / "tessera-console", "--config", config, "--check-config"],
        capture_output=True, text=True, env={"PATH": os.environ["PATH"]},
    )
    assert out.returncode != 0 and "12 characters" in out.stderr, out.stderr


def test_the_chart_refuses_a_second_identity_and_scales_the_others(tmp_path):
    """Identity's graph is not partition-local: a second replica would resolve against
    part of it. Profiles and activation scale (tests/tests/faults.rs); profiles
    instances are told each other's addresses, and profiles accepts them."""
    with pytest.raises(Exception, match="identity runs one replica"):
        render({"identity": {"replicas": 2}})
    docs = render({"activation": {"replicas": 3}, "profiles": {"replicas": 3}})
    sets = {d["metadata"]["name"]: d for d in by_kind(docs, "StatefulSet")}
    assert sets["shop-tessera-activation"]["spec"]["replicas"] == 3
    assert sets["shop-tessera-profiles"]["spec"]["replicas"] == 3
    env = {e["name"]: e.get("value") for e in sets["shop-tessera-profiles"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    peers = [f"http://shop-tessera-profiles-{i}.shop-tessera-profiles.cdp.svc:8080" for i in range(3)]
    config = configuration(docs, tmp_path)
    out = subprocess.run(
        [pathlib.Path(os.environ["TESSERA_BIN_DIR"]) / "tessera-profiles", "--config", config, "--check-config"],
        capture_output=True, text=True,
        env={"PATH": os.environ["PATH"], "TESSERA__PROFILES__PEERS": env["TESSERA__PROFILES__PEERS"]},
    )
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout[out.stdout.index("{"):])
    assert shown["profiles"]["peers"] == peers, "profiles reads the pods' addresses"
    single = by_kind(render({}), "StatefulSet")
    for s in single:
        names = {e["name"] for e in s["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert "TESSERA__PROFILES__PEERS" not in names, "one instance has no peers"


def check_config(service, config, **env):
    return subprocess.run(
        [pathlib.Path(os.environ["TESSERA_BIN_DIR"]) / f"tessera-{service}", "--config", config,
         "--check-config"],
        capture_output=True, text=True, env={"PATH": os.environ["PATH"], **env},
    )


def test_a_configuration_of_ones_own_has_no_demo_credential_and_refuses_them(tmp_path):
    """The audit's finding: configuration layers merge key by key, so a Secret of one's own
    (existingConfigSecret) that set `[admin] tokens` but not `privacy_tokens` kept the
    built-in demo privacy token, and anyone who read the README could export or erase any
    person. The demo credentials exist only in demo mode, and outside it every service
    refuses to start with one of them."""
    config = tmp_path / "tessera.toml"
    secret = '\n[privacy]\npseudonym_secret = "own-pseudonym-secret-0123456789abcdef"\n'
    config.write_text('[admin]\ntokens = [{ name = "ops", token = "ops-token-0123456789" }]\n' + secret)
    for service in ["ingest", "identity", "profiles", "activation"]:
        out = check_config(service, config)
        assert out.returncode == 0, out.stderr
        assert '"name": "ops"' in out.stdout
        assert '"privacy_tokens": []' in out.stdout and '"sources": []' in out.stdout, out.stdout
        assert "demo-privacy" not in out.stdout and '"name": "demo"' not in out.stdout, out.stdout
        assert '"demo": false' in out.stdout
    demo_credentials = [
        '[admin]\nprivacy_tokens = [{ name = "dpo", token = "demo-privacy-token" }]\n',
        '[admin]\ntokens = [{ name = "ops", token = "demo-admin-token" }]\n',
        '[ingest]\nsources = [{ name = "web", write_key = "demo-write-key" }]\n',
        '[console]\nusers = [{ name = "admin", password = "tessera-demo" }]\n',
    ]
    for text in demo_credentials:
        config.write_text(text + secret)
        for service in ["ingest", "identity", "console"]:
            out = check_config(service, config)
            assert out.returncode != 0, (service, text, out.stdout)
            assert "demo credential" in out.stderr and "demo mode" in out.stderr, out.stderr
    # The demo mode's pseudonym secret is public too, and a deployment has to have one.
    config.write_text('[privacy]\npseudonym_secret = "demo-pseudonym-secret-not-for-production"\n')
    out = check_config("identity", config)
    assert out.returncode != 0 and "privacy.pseudonym_secret" in out.stderr, out.stderr
    config.write_text("")
    out = check_config("ingest", config)
    assert out.returncode != 0 and "privacy.pseudonym_secret" in out.stderr, out.stderr
    # Demo mode (deploy/run.sh) accepts them, and the console starts with its demo user.
    config.write_text("")
    out = check_config("console", config, TESSERA__DEMO="true")
    assert out.returncode == 0, out.stderr
    config.write_text(secret)
    out = check_config("console", config)
    assert out.returncode != 0 and "console.users" in out.stderr, out.stderr
