//! What the shipped Prometheus and Grafana files ask of lbd's metrics: the `lb_*` metric names
//! a PromQL expression reads, and the names the README's metric table documents.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The workspace root (tests/ is one of its members).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace")
        .to_path_buf()
}

/// The `lb_*` metric names in a PromQL expression (or a series selector); label values in
/// quotes are skipped, so `{vip="lb_x"}` names nothing.
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut quoted = false;
    let mut word = String::new();
    for c in expr.chars().chain(std::iter::once(' ')) {
        if c == '"' {
            quoted = !quoted;
        }
        if !quoted && (c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            word.push(c);
        } else {
            if word.starts_with("lb_") {
                names.insert(word.clone());
            }
            word.clear();
        }
    }
    names
}

/// Every metric name in the README's "Observe" table (`| `lb_x`, `lb_y` | labels | what |`).
pub fn readme_metrics() -> BTreeSet<String> {
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).expect("README.md");
    readme
        .lines()
        .filter(|l| l.starts_with("| `lb_"))
        .flat_map(|l| {
            l.split('|')
                .nth(1)
                .unwrap_or("")
                .split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_outside_quotes() {
        let e = r#"sum by (vip) (rate(lb_vip_packets_total{vip=~"$vip", x="lb_no"}[1m])) / lb_up"#;
        let got: Vec<String> = metric_names(e).into_iter().collect();
        assert_eq!(got, ["lb_up", "lb_vip_packets_total"]);
    }
}
