//! The shipped alerting rules (`packaging/prometheus/lb-rules.yml`): `promtool check rules`
//! accepts them, `promtool test rules` passes their unit tests (every alert fires where it
//! must and stays silent where it must not), and every metric they or their test series name
//! is one lbd documents (the README's metric table, which `e2e_prometheus` checks against a
//! real scrape).
use std::process::Command;
use tests::promql::{metric_names, readme_metrics, workspace_root};

/// Runs promtool (Debian's `prometheus` package, installed by `cargo xtask setup`).
fn promtool(args: &[&str]) -> String {
    let dir = workspace_root().join("packaging/prometheus");
    let out = Command::new("promtool")
        .args(args)
        .current_dir(&dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("running promtool: {e}; install it with `cargo xtask setup` (Debian package prometheus)")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn promtool_checks_the_rules() {
    let out = promtool(&["check", "rules", "lb-rules.yml"]);
    assert!(out.contains("SUCCESS: 6 rules found"), "{out}");
}

#[test]
fn promtool_unit_tests_pass() {
    let out = promtool(&["test", "rules", "lb-rules.test.yml"]);
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn rules_name_only_documented_metrics() {
    let documented = readme_metrics();
    assert!(documented.contains("lb_backend_health"), "{documented:?}");
    let dir = workspace_root().join("packaging/prometheus");
    for file in ["lb-rules.yml", "lb-rules.test.yml"] {
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        let used = metric_names(
            &text
                .lines()
                .filter(|l| {
                    let l = l.trim_start();
                    l.starts_with("expr:") || l.starts_with("- series:")
                })
                .collect::<Vec<_>>()
                .join("\n"),
        );
        assert!(!used.is_empty(), "{file} names no metric");
        let unknown: Vec<_> = used.difference(&documented).collect();
        assert!(
            unknown.is_empty(),
            "{file} names metrics lbd does not export (README, Observe): {unknown:?}"
        );
    }
    // Every alert the brief asks for is there.
    let rules = std::fs::read_to_string(dir.join("lb-rules.yml")).unwrap();
    for alert in [
        "LbdDown",
        "LbBackendDown",
        "LbVipWithoutServingBackend",
        "LbConnectionsLost",
        "LbReloadRefused",
    ] {
        assert!(rules.contains(&format!("alert: {alert}\n")), "no {alert}");
    }
}
