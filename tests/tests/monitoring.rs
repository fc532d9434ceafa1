//! The alert rules and the dashboard the chart ships, checked with the real `promtool`
//! (Debian's prometheus): the rules load, every alert fires where its unit test says and
//! stays quiet where it says, and every dashboard query parses. (That they read series the
//! agent exports is the agent's unit test; a real Prometheus scraping a real agent is the
//! real node's.)

use std::collections::BTreeSet;
use std::process::Command;

use anyhow::{Context, Result};
use serde_json::Value;
use tests::chart::{repo, yaml_docs};

const PROMTOOL: &str = "/usr/bin/promtool";

fn promtool(args: &[&str]) -> Result<String> {
    let out = Command::new(PROMTOOL)
        .args(args)
        .current_dir(repo(""))
        .output()
        .with_context(|| format!("{PROMTOOL} (`cargo xtask setup` installs prometheus)"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    anyhow::ensure!(out.status.success(), "promtool {args:?}: {text}");
    Ok(text)
}

fn yaml_file(path: &str) -> Result<Value> {
    let docs = yaml_docs(&std::fs::read_to_string(repo(path))?)?;
    docs.into_iter().next().context("an empty file")
}

/// Every alert's name in the rules file.
fn alert_names() -> Result<BTreeSet<String>> {
    let rules = yaml_file("deploy/chart/files/alerts.yaml")?;
    Ok(rules["groups"]
        .as_array()
        .context("groups")?
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .filter_map(|r| r["alert"].as_str().map(str::to_owned))
        .collect())
}

/// The `instance` label of a series selector as promtool's tests write it.
fn instance_of(series: &str) -> Option<&str> {
    let (_, rest) = series.split_once("instance=\"")?;
    rest.split_once('"').map(|(i, _)| i)
}

#[test]
fn every_alert_fires_where_it_should_and_stays_quiet_where_it_should_not() -> Result<()> {
    let checked = promtool(&["check", "rules", "deploy/chart/files/alerts.yaml"])?;
    let names = alert_names()?;
    assert!(
        checked.contains(&format!("SUCCESS: {} rules found", names.len())),
        "{checked}"
    );
    assert!(names.len() >= 15, "{names:?}");
    let tested = promtool(&["test", "rules", "tests/prometheus/alerts.test.yaml"])?;
    assert!(tested.contains("SUCCESS"), "{tested}");
    // Each alert has a case where it fires and, in the same case, an instance (or a moment)
    // where it must not: promtool fails a case on an alert it did not expect.
    let cases = yaml_file("tests/prometheus/alerts.test.yaml")?;
    for name in &names {
        let mut fires = false;
        let mut quiet = false;
        for case in cases["tests"].as_array().context("tests")? {
            let evals: Vec<&Value> = case["alert_rule_test"]
                .as_array()
                .context("alert_rule_test")?
                .iter()
                .filter(|t| t["alertname"] == name.as_str())
                .collect();
            if evals.is_empty() {
                continue;
            }
            let firing: BTreeSet<String> = evals
                .iter()
                .flat_map(|t| t["exp_alerts"].as_array().cloned().unwrap_or_default())
                .filter_map(|a| a["exp_labels"]["instance"].as_str().map(str::to_owned))
                .collect();
            fires |= !firing.is_empty();
            let inputs: BTreeSet<&str> = case["input_series"]
                .as_array()
                .context("input_series")?
                .iter()
                .filter_map(|s| s["series"].as_str().and_then(instance_of))
                .collect();
            quiet |= inputs.iter().any(|i| !firing.contains(*i))
                || evals
                    .iter()
                    .any(|t| t["exp_alerts"].as_array().is_none_or(|a| a.is_empty()));
        }
        assert!(fires, "{name}: no case where it fires");
        assert!(quiet, "{name}: no case where it must stay quiet");
    }
    Ok(())
}

#[test]
fn every_dashboard_query_parses_and_every_panel_has_one() -> Result<()> {
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(repo(
        "deploy/chart/files/dashboard.json",
    ))?)?;
    let panels = dashboard["panels"].as_array().context("panels")?;
    let mut exprs = Vec::new();
    for p in panels.iter().filter(|p| p["type"] != "row") {
        let targets = p["targets"].as_array().context("targets")?;
        assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
        exprs.extend(targets.iter().filter_map(|t| t["expr"].as_str()));
    }
    assert!(exprs.len() >= 20, "{exprs:?}");
    // Grafana's variables as Grafana substitutes them, then each query as a recording rule:
    // `promtool check rules` parses every expression.
    let rules: Vec<Value> = exprs
        .iter()
        .enumerate()
        .map(|(i, e)| {
            serde_json::json!({
                "record": format!("dashboard:query_{i}"),
                "expr": e.replace("$__rate_interval", "1m").replace("$instance", ".*"),
            })
        })
        .collect();
    let file = std::env::temp_dir().join(format!(
        "pia-dashboard-rules-{}.json",
        tests::names::unique()
    ));
    // JSON is YAML: promtool reads it as a rules file.
    std::fs::write(
        &file,
        serde_json::json!({"groups": [{"name": "dashboard", "rules": rules}]}).to_string(),
    )?;
    let checked = promtool(&["check", "rules", &file.display().to_string()]);
    let _ = std::fs::remove_file(&file);
    let checked = checked?;
    assert!(
        checked.contains(&format!("SUCCESS: {} rules found", exprs.len())),
        "{checked}"
    );
    Ok(())
}
