//! The Helm chart (`deploy/chart`) against upstream's values, the kustomize manifests and the
//! agent itself, rendered by the real helm 4 and kubectl 1.35: a values file written for
//! upstream's chart installs this agent unchanged, with this agent's least-privilege pod.

use anyhow::{Context, Result};
use clap::Parser as _;
use serde_json::Value;
use tests::chart::{
    argv, helm_notes, helm_template, helm_template_text, kustomize, of_kind, tool, validate,
    without_helm_labels,
};

/// Kubernetes versions the renders must be valid for (as the kustomize manifests).
const VERSIONS: [&str; 2] = ["1.30.0", "1.33.0"];
/// The values files the chart is tested with (relative to the chart).
const VALUES: [&str; 2] = ["ci/upstream-values.yaml", "ci/hybrid-iso-values.yaml"];

fn container<'a>(ds: &'a Value, list: &str) -> &'a Value {
    &ds["spec"]["template"]["spec"][list][0]
}

/// The agent's CLI as a container runs it.
fn parse(c: &Value) -> Result<agent::config::Cli> {
    let argv = argv(c);
    agent::config::Cli::try_parse_from(&argv).map_err(|e| anyhow::anyhow!("{argv:?}: {e}"))
}

/// This agent's pod, whatever the values: no privilege, only the capabilities it needs, a
/// read-only root, the runtime's seccomp profile, no API token.
fn assert_least_privilege(ds: &Value) {
    let spec = &ds["spec"]["template"]["spec"];
    assert_eq!(spec["automountServiceAccountToken"], false, "{ds}");
    for (list, caps) in [
        ("initContainers", vec!["NET_ADMIN"]),
        ("containers", vec!["BPF", "NET_ADMIN", "NET_BIND_SERVICE"]),
    ] {
        let sc = &container(ds, list)["securityContext"];
        assert_eq!(sc["privileged"], false, "{list}: {sc}");
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{list}: {sc}");
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{list}: {sc}");
        assert_eq!(
            sc["seccompProfile"]["type"], "RuntimeDefault",
            "{list}: {sc}"
        );
        assert_eq!(
            sc["capabilities"]["drop"],
            serde_json::json!(["ALL"]),
            "{list}"
        );
        assert_eq!(sc["capabilities"]["add"], serde_json::json!(caps), "{list}");
    }
}

#[test]
fn helm_lint_passes_with_the_defaults_and_every_tested_values_file() -> Result<()> {
    for values in [None].into_iter().chain(VALUES.map(Some)) {
        let mut cmd = tool("helm")?;
        cmd.args(["lint", "--strict"])
            .arg(tests::chart::chart_dir());
        if let Some(v) = values {
            cmd.arg("--values").arg(tests::chart::chart_dir().join(v));
        }
        let out = cmd.output()?;
        assert!(
            out.status.success(),
            "helm lint {values:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

#[test]
fn the_default_render_is_the_kustomize_output() -> Result<()> {
    let chart = without_helm_labels(&helm_template(&[], &[])?);
    let kustomize = without_helm_labels(&kustomize()?);
    assert_eq!(
        chart.keys().collect::<Vec<_>>(),
        kustomize.keys().collect::<Vec<_>>(),
        "the same objects"
    );
    for (key, object) in &chart {
        assert_eq!(
            object, &kustomize[key],
            "{key:?} differs between the chart and kustomize"
        );
    }
    Ok(())
}

#[test]
fn a_values_file_written_for_upstreams_chart_installs_this_agent_unchanged() -> Result<()> {
    let objects = helm_template(&["ci/upstream-values.yaml"], &[])?;
    let sets = of_kind(&objects, "DaemonSet");
    assert_eq!(sets.len(), 1, "only the cloud DaemonSet");
    let ds = sets[0];
    // Upstream's names and selector: `helm upgrade` of an upstream release keeps the
    // DaemonSet (its selector cannot change).
    assert_eq!(ds["metadata"]["name"], "eks-pod-identity-agent");
    assert_eq!(
        ds["spec"]["selector"]["matchLabels"],
        serde_json::json!({
            "app.kubernetes.io/name": "eks-pod-identity-agent",
            "app.kubernetes.io/instance": "eks-pod-identity-agent",
        })
    );
    assert_least_privilege(ds);
    for list in ["initContainers", "containers"] {
        let c = container(ds, list);
        // This agent's image, never the reference agent's that the registry and tag name.
        assert_eq!(c["image"], "eks-pod-identity-agent:0.1.0", "{list}");
        assert_eq!(c["imagePullPolicy"], "Always", "the user's pull policy");
        let cli = parse(c)?;
        assert_eq!(
            matches!(cli.command, agent::config::Command::Server(_)),
            list == "containers"
        );
        assert!(!argv(c).iter().any(|a| a.contains("go-runner")), "{c}");
    }
    let agent_c = container(ds, "containers");
    let agent::config::Command::Server(server) = parse(agent_c)?.command else {
        unreachable!("checked above")
    };
    assert_eq!(server.cluster_name, "prod-west", "the user's cluster");
    let env = &agent_c["env"];
    assert!(
        env.as_array()
            .into_iter()
            .flatten()
            .any(|e| e["name"] == "AWS_REGION" && e["value"] == "us-west-2"),
        "{env}"
    );
    // Upstream's `resources: {}` merges with (so keeps) this chart's measured figures.
    assert_eq!(
        agent_c["resources"]["limits"]["memory"], "128Mi",
        "{agent_c}"
    );
    // The user's metrics settings: a Service (its labels strings) and a ServiceMonitor.
    let service = of_kind(&objects, "Service")[0];
    assert_eq!(
        service["metadata"]["labels"]["prometheus.io/port"], "2705",
        "a label value is a string"
    );
    assert_eq!(of_kind(&objects, "ServiceMonitor").len(), 1);
    // serviceAccount.create: false, as the user had it: the namespace's default account,
    // still without a token.
    assert!(of_kind(&objects, "ServiceAccount").is_empty());
    assert!(ds["spec"]["template"]["spec"]
        .get("serviceAccountName")
        .is_none());
    // The user's update strategy merges with the chart's surge (Helm merges values): the
    // DaemonSet controller in surge mode replaces a serving agent only once the new one is
    // ready, so the handover still happens.
    assert_eq!(ds["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"], 1);
    let notes = helm_notes(&["ci/upstream-values.yaml"], &[])?;
    assert!(
        notes.contains(
            "image.containerRegistry, image.region and image.tag name AWS's Go agent image"
        ),
        "{notes}"
    );
    Ok(())
}

#[test]
fn hybrid_and_isolated_region_values_render_what_those_nodes_need() -> Result<()> {
    let objects = helm_template(&["ci/hybrid-iso-values.yaml"], &[])?;
    let sets = of_kind(&objects, "DaemonSet");
    let names: Vec<_> = sets.iter().map(|d| d["metadata"]["name"].clone()).collect();
    assert_eq!(
        names,
        ["eks-pod-identity-agent", "eks-pod-identity-agent-hybrid"],
        "cloud and hybrid"
    );
    for ds in &sets {
        assert_least_privilege(ds);
        let spec = &ds["spec"]["template"]["spec"];
        let c = container(ds, "containers");
        assert_eq!(
            c["image"],
            "registry.example.com/eks-pod-identity-agent:0.1.0"
        );
        assert_eq!(spec["imagePullSecrets"][0]["name"], "registry-example");
        assert_eq!(
            ds["spec"]["template"]["metadata"]["labels"]["team"],
            "platform"
        );
        // The isolated region's private CA, mounted from the node and named to the SDK.
        assert!(c["env"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["name"] == "AWS_CA_BUNDLE"
                && e["value"] == "/etc/pki/tls/certs/ca-bundle.crt"));
        assert!(c["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|m| m["mountPath"] == "/etc/pki/tls/certs/ca-bundle.crt"));
        let agent::config::Command::Server(server) = parse(c)?.command else {
            panic!("not server: {c}")
        };
        assert_eq!(server.cluster_name, "iso-hybrid");
        assert_eq!(server.max_cache_size, 5000, "agent.additionalArgs");
        let hybrid = ds["metadata"]["name"] == "eks-pod-identity-agent-hybrid";
        assert_eq!(
            server.rotate_credentials, hybrid,
            "only hybrid nodes rotate"
        );
        let terms = &spec["affinity"]["nodeAffinity"]
            ["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]
            ["matchExpressions"];
        let compute = terms
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["key"] == "eks.amazonaws.com/compute-type")
            .context("no compute-type term")?;
        if hybrid {
            assert_eq!(compute["operator"], "In");
            let mount = c["volumeMounts"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|m| m["mountPath"] == "/root/.aws")
                .context("no credentials mount")?;
            assert_eq!(mount["readOnly"], true);
        } else {
            assert_eq!(
                compute["operator"], "NotIn",
                "the cloud set avoids hybrid nodes"
            );
            assert!(compute["values"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|v| v == "hybrid"));
        }
    }
    // podLiveness is accepted and grants nothing.
    assert!(of_kind(&objects, "ClusterRole").is_empty());
    assert!(of_kind(&objects, "ClusterRoleBinding").is_empty());
    let notes = helm_notes(&["ci/hybrid-iso-values.yaml"], &[])?;
    assert!(
        notes.contains("podLiveness is accepted and grants nothing"),
        "{notes}"
    );
    Ok(())
}

#[test]
fn a_misspelt_or_mistyped_value_is_an_error_that_names_it() -> Result<()> {
    for (set, named) in [
        ("clusterNmae=prod", "clusterNmae"),
        ("agent.probeport=2703", "probeport"),
        ("daemonsets.hybrid.creat=true", "creat"),
        ("image.pullPolicy=Sometimes", "pullPolicy"),
        ("agent.probePort=http", "probePort"),
    ] {
        let err = helm_template_text(&[], &[set])
            .err()
            .with_context(|| format!("--set {set} rendered"))?;
        assert!(err.to_string().contains(named), "--set {set}: {err}");
    }
    Ok(())
}

#[test]
fn every_render_is_valid_for_the_kubernetes_versions_supported() -> Result<()> {
    validate(&tests::chart::kustomize_text()?, &VERSIONS)?;
    validate(&helm_template_text(&[], &[])?, &VERSIONS)?;
    for v in VALUES {
        validate(&helm_template_text(&[v], &[])?, &VERSIONS).context(v)?;
    }
    Ok(())
}

#[test]
fn the_alerts_and_the_dashboard_ship_in_the_chart_as_their_files_hold_them() -> Result<()> {
    // Off by default: the default render stays the kustomize output (another test).
    let defaults = helm_template(&[], &[])?;
    assert!(of_kind(&defaults, "PrometheusRule").is_empty());
    assert!(of_kind(&defaults, "ConfigMap").is_empty());
    let sets = [
        "metrics.prometheusRule.enabled=true",
        "metrics.prometheusRule.extraLabels.release=kube-prometheus-stack",
        "metrics.dashboard.enabled=true",
    ];
    let objects = helm_template(&[], &sets)?;
    let rules = of_kind(&objects, "PrometheusRule");
    assert_eq!(rules.len(), 1);
    // Helm does not template the file: Prometheus' own `{{ $labels.… }}` arrive intact.
    let file = std::fs::read_to_string(tests::chart::repo("deploy/chart/files/alerts.yaml"))?;
    let plain = &tests::chart::yaml_docs(&file)?[0];
    assert_eq!(rules[0]["spec"], *plain);
    assert_eq!(
        rules[0]["metadata"]["labels"]["release"],
        "kube-prometheus-stack"
    );
    assert!(file.contains("{{ $labels.instance }}"));
    let maps = of_kind(&objects, "ConfigMap");
    assert_eq!(maps.len(), 1);
    assert_eq!(maps[0]["metadata"]["labels"]["grafana_dashboard"], "1");
    let shipped: Value = serde_json::from_str(
        maps[0]["data"]["eks-pod-identity-agent.json"]
            .as_str()
            .context("the dashboard's JSON")?,
    )?;
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(tests::chart::repo(
        "deploy/chart/files/dashboard.json",
    ))?)?;
    assert_eq!(shipped, dashboard);
    // The ConfigMap is checked against Kubernetes' schemas (PrometheusRule is a CRD, which
    // kubernetes-validate does not hold).
    let text = helm_template_text(&[], &sets)?;
    let kept: Vec<&str> = text
        .split("\n---")
        .filter(|doc| !doc.contains("kind: PrometheusRule"))
        .collect();
    validate(&kept.join("\n---"), &VERSIONS)
}
