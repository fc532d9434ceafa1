//! The deploy manifests as the real tools render them: the Helm chart (`deploy/chart`, by
//! helm 4) and the kustomize tree (`deploy/`, by kubectl 1.35), both installed by
//! `cargo xtask setup` under `target/tools/bin`, as JSON objects.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// A path in the repository.
pub fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// The chart's directory.
pub fn chart_dir() -> PathBuf {
    repo("deploy/chart")
}

/// helm or kubectl, as `cargo xtask setup` installs them.
pub fn tool(name: &str) -> Result<Command> {
    let path = repo("target/tools/bin").join(name);
    if !path.exists() {
        bail!(
            "{} is missing: `cargo xtask setup` installs it",
            path.display()
        );
    }
    Ok(Command::new(path))
}

/// Every YAML document of `text`, empty ones left out (PyYAML from the test virtualenv).
pub fn yaml_docs(text: &str) -> Result<Vec<Value>> {
    use std::io::Write as _;
    let mut child = Command::new(repo("target/pyenv/bin/python"))
        .args([
            "-c",
            "import json,sys,yaml; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d is not None]))",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running the virtualenv python (cargo xtask setup)")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// What a render printed, or why it failed.
fn rendered(what: &str, out: Output) -> Result<String> {
    if !out.status.success() {
        bail!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// `helm template` of the chart as release `eks-pod-identity-agent` in kube-system, with each
/// values file of `values` (relative to the chart) and `sets` (`key=value`): the YAML text.
pub fn helm_template_text(values: &[&str], sets: &[&str]) -> Result<String> {
    let mut cmd = tool("helm")?;
    cmd.args(["template", "eks-pod-identity-agent"])
        .arg(chart_dir())
        .args(["--namespace", "kube-system"]);
    for v in values {
        cmd.arg("--values").arg(chart_dir().join(v));
    }
    for s in sets {
        cmd.args(["--set", s]);
    }
    rendered(&format!("helm template {values:?} {sets:?}"), cmd.output()?)
}

/// [`helm_template_text`], parsed.
pub fn helm_template(values: &[&str], sets: &[&str]) -> Result<Vec<Value>> {
    yaml_docs(&helm_template_text(values, sets)?)
}

/// `helm install --dry-run` of the chart with `values`: the NOTES it prints.
pub fn helm_notes(values: &[&str], sets: &[&str]) -> Result<String> {
    let mut cmd = tool("helm")?;
    cmd.args(["install", "eks-pod-identity-agent"])
        .arg(chart_dir())
        .args(["--namespace", "kube-system", "--dry-run=client"]);
    for v in values {
        cmd.arg("--values").arg(chart_dir().join(v));
    }
    for s in sets {
        cmd.args(["--set", s]);
    }
    let text = rendered("helm install --dry-run", cmd.output()?)?;
    Ok(text
        .split_once("NOTES:")
        .map(|(_, notes)| notes.to_owned())
        .unwrap_or_default())
}

/// `kubectl kustomize deploy/`: the YAML text.
pub fn kustomize_text() -> Result<String> {
    let mut cmd = tool("kubectl")?;
    cmd.arg("kustomize").arg(repo("deploy"));
    rendered("kubectl kustomize deploy/", cmd.output()?)
}

/// [`kustomize_text`], parsed.
pub fn kustomize() -> Result<Vec<Value>> {
    yaml_docs(&kustomize_text()?)
}

/// Labels Helm's conventions add that a kustomize install has no use for: which release,
/// chart and tool made an object.
pub const HELM_LABELS: [&str; 4] = [
    "helm.sh/chart",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
];

/// Objects by (kind, name), with [`HELM_LABELS`] removed from every label map and selector.
pub fn without_helm_labels(objects: &[Value]) -> BTreeMap<(String, String), Value> {
    fn strip(v: &mut Value) {
        match v {
            Value::Object(map) => {
                for key in ["labels", "matchLabels", "selector"] {
                    if let Some(Value::Object(labels)) = map.get_mut(key) {
                        for l in HELM_LABELS {
                            labels.remove(l);
                        }
                    }
                }
                map.values_mut().for_each(strip);
            }
            Value::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    objects
        .iter()
        .map(|o| {
            let mut o = o.clone();
            strip(&mut o);
            let key = (
                o["kind"].as_str().unwrap_or_default().to_owned(),
                o["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            );
            (key, o)
        })
        .collect()
}

/// The objects of `kind`.
pub fn of_kind<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

/// A container's `env` entries, in order.
pub fn container_env(container: &Value) -> Vec<(String, String)> {
    container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            (
                e["name"].as_str().unwrap_or_default().to_owned(),
                e["value"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// A container's `key` list (`command` or `args`) with each `$(VAR)` replaced from `vars`,
/// as the kubelet expands them.
pub fn expand(container: &Value, key: &str, vars: &[(String, String)]) -> Vec<String> {
    container[key]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| {
            let mut a = a.as_str().unwrap_or_default().to_owned();
            for (k, v) in vars {
                a = a.replace(&format!("$({k})"), v);
            }
            a
        })
        .collect()
}

/// A container's command line as the kubelet runs it: `command` then `args`, expanded from
/// the container's `env`.
pub fn argv(container: &Value) -> Vec<String> {
    let env = container_env(container);
    let mut argv = expand(container, "command", &env);
    argv.extend(expand(container, "args", &env));
    argv
}

/// `kubernetes-validate --strict` of `text` for each of `versions` (the virtualenv's).
pub fn validate(text: &str, versions: &[&str]) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("pia-render-{}", crate::names::unique()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("render.yaml");
    std::fs::write(&file, text)?;
    let result = versions.iter().try_for_each(|version| {
        let out = Command::new(repo("target/pyenv/bin/kubernetes-validate"))
            .args(["--strict", "--quiet", "-k", version])
            .arg(&file)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "invalid for Kubernetes {version}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    });
    let _ = std::fs::remove_dir_all(&dir);
    result
}
