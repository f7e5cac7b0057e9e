//! Documentation generated from one source each, so that it cannot drift:
//!
//! * the configuration keys, `packaging/config-keys.toml`: the README's key list ("Every
//!   configuration key", rewritten by `cargo xtask docs`) and the `lbd.toml(5)` man page; the
//!   tests below fail when the README's list is stale or when the file and lbd's parser
//!   disagree on a section's keys;
//! * the FILES, EXIT STATUS and EXAMPLES sections appended to the `lbd(8)` and `lbctl(8)`
//!   pages that clap_mangen renders from the binaries' own clap definitions.
use std::fs;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::util;

/// One key of lbd.toml.
#[derive(Debug, Clone, Deserialize)]
pub struct Key {
    /// `""` (top level), `encap`, `vip`, `vip.health`, `vip.learning`, `vip.backend`.
    pub section: String,
    pub name: String,
    pub default: String,
    /// Only changes when lbd starts.
    pub restart: bool,
    pub doc: String,
}

#[derive(Deserialize)]
struct KeyFile {
    key: Vec<Key>,
}

/// The sections in the order the file and the docs present them, with their TOML header.
pub const SECTIONS: [(&str, &str); 6] = [
    ("", "top level"),
    ("encap", "[encap]"),
    ("vip", "[[vip]]"),
    ("vip.health", "[vip.health]"),
    ("vip.learning", "[vip.learning]"),
    ("vip.backend", "[[vip.backend]]"),
];

/// Markers around the generated list in README.md.
pub const README_BEGIN: &str =
    "<!-- config keys: generated from packaging/config-keys.toml by `cargo xtask docs`; edit there -->";
pub const README_END: &str = "<!-- end of config keys -->";

/// The keys, from `packaging/config-keys.toml`.
pub fn keys() -> Result<Vec<Key>> {
    let path = util::workspace_root().join("packaging/config-keys.toml");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let file: KeyFile =
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    for k in &file.key {
        if !SECTIONS.iter().any(|(s, _)| *s == k.section) {
            bail!(
                "{}: key {} has section {:?}; use one of {:?}",
                path.display(),
                k.name,
                k.section,
                SECTIONS.map(|(s, _)| s)
            );
        }
    }
    Ok(file.key)
}

/// The README's key list (Markdown table), between [`README_BEGIN`] and [`README_END`].
pub fn readme_key_list(keys: &[Key]) -> String {
    let mut out =
        format!("{README_BEGIN}\n\n| section | key | default | what |\n|---|---|---|---|\n");
    for (section, header) in SECTIONS {
        for k in keys.iter().filter(|k| k.section == section) {
            let restart = if k.restart { " (restart)" } else { "" };
            out.push_str(&format!(
                "| {} | `{}` | {} | {}{restart} |\n",
                header,
                k.name,
                if k.default.starts_with('(') || k.default.contains(' ') {
                    k.default.clone()
                } else {
                    format!("`{}`", k.default)
                },
                k.doc.replace('|', "\\|")
            ));
        }
    }
    out.push('\n');
    out.push_str(README_END);
    out
}

/// `cargo xtask docs`: rewrites the README's key list from the key file.
pub fn update_readme() -> Result<()> {
    let path = util::workspace_root().join("README.md");
    let text = fs::read_to_string(&path)?;
    let new = replace_block(&text, &readme_key_list(&keys()?))?;
    if new == text {
        println!("README.md: key list up to date");
    } else {
        fs::write(&path, new)?;
        println!("README.md: key list rewritten from packaging/config-keys.toml");
    }
    Ok(())
}

fn replace_block(text: &str, block: &str) -> Result<String> {
    let (Some(b), Some(e)) = (text.find(README_BEGIN), text.find(README_END)) else {
        bail!("README.md has no {README_BEGIN} ... {README_END} block");
    };
    Ok(format!(
        "{}{block}{}",
        &text[..b],
        &text[e + README_END.len()..]
    ))
}

/// Escapes text for roff: backslashes, hyphens (so they are not hyphenation points), and a
/// leading control character.
pub fn roff(s: &str) -> String {
    let s = s.replace('\\', "\\e").replace('-', "\\-").replace('`', "");
    if s.starts_with('.') || s.starts_with('\'') {
        format!("\\&{s}")
    } else {
        s
    }
}

/// A roff section of paragraphs: `(tag, text)`, tag in bold (an empty tag: a plain paragraph).
fn section(title: &str, items: &[(&str, &str)]) -> String {
    let mut out = format!(".SH \"{title}\"\n");
    for (tag, text) in items {
        if tag.is_empty() {
            out.push_str(&format!(".PP\n{}\n", roff(text)));
        } else {
            out.push_str(&format!(".TP\n\\fB{}\\fR\n{}\n", roff(tag), roff(text)));
        }
    }
    out
}

/// An example: a sentence, then the command lines verbatim.
fn examples(items: &[(&str, &str)]) -> String {
    let mut out = ".SH EXAMPLES\n".to_string();
    for (what, cmds) in items {
        out.push_str(&format!(".PP\n{}\n.PP\n.nf\n.RS 4\n", roff(what)));
        for l in cmds.lines() {
            out.push_str(&format!("{}\n", roff(l)));
        }
        out.push_str(".RE\n.fi\n");
    }
    out
}

/// FILES, EXIT STATUS, EXAMPLES and SEE ALSO for the page of `command` (`lbd` or `lbctl`);
/// `None` for the others (subcommands' pages).
pub fn extra_man_sections(command: &str) -> Option<String> {
    let files = [
        ("/etc/lb/lbd.toml", "The configuration (lbd.toml(5)); lbctl's changes are written back to it."),
        ("/run/lb/lbd.sock", "The control socket lbctl talks to (control_socket)."),
        ("/run/lb/lbd.sock.state", "lbd's run-state file: left behind by an lbd that did not stop cleanly, so the next one can say so (unclean_stop in lbctl status)."),
        ("/sys/fs/bpf/lb", "The pinned maps and XDP link (pin_dir): the datapath outlives lbd."),
        ("/usr/lib/systemd/system/lbd.service", "The balancer's unit (Type=notify, watchdog)."),
        ("/usr/lib/systemd/system/lbd-decap@.service", "lbd decap on a backend, one instance per interface, with /etc/lb/decap-INTERFACE.env."),
        ("/usr/share/lb/", "The shipped configuration, a Grafana dashboard (grafana/lb.json) and Prometheus alerting rules (prometheus/lb-rules.yml)."),
    ];
    match command {
        "lbd" => Some(format!(
            "{}{}{}{}",
            section("FILES", &files),
            section(
                "EXIT STATUS",
                &[
                    ("0", "lbd stopped on SIGINT or SIGTERM (or --check found the file valid)."),
                    ("1", "An error: the configuration is refused (the message names the field and the fix), the interface, a pin or the control socket is unusable, or the datapath failed."),
                    ("2", "The command line is wrong; or lbd cleanup refused because an lbd answers on the control socket (stop it, or use --force)."),
                ],
            ),
            examples(&[
                ("Check a configuration file, then run lbd in the foreground:", "lbd --config /etc/lb/lbd.toml --check\nlbd --config /etc/lb/lbd.toml"),
                ("Apply a changed file (VIPs and backends change live; a refused file changes nothing):", "systemctl reload lbd"),
                ("On a backend, accept IP-in-IP packets for two VIPs:", "lbd decap --interface eth0 --vip 198.51.100.1 --vip 2001:db8:100::1"),
                ("Detach the datapath and remove its pins after stopping lbd:", "systemctl stop lbd\nlbd cleanup"),
            ]),
            ".SH \"SEE ALSO\"\nlbctl(8), lbd.toml(5), lbd\\-decap(8), systemctl(1)\n"
        )),
        "lbctl" => Some(format!(
            "{}{}{}{}",
            section("FILES", &files[..2]),
            section(
                "EXIT STATUS",
                &[
                    ("0", "Done."),
                    ("1", "lbd refused the request; the reason on stderr names the field and the fix."),
                    ("2", "The command line is wrong (bad VIP or address syntax, unknown option, ...)."),
                    ("3", "lbd cannot be reached: not running, another --socket, or no permission on the socket (run as root or as a member of control_group)."),
                ],
            ),
            examples(&[
                ("List the VIPs and their backends' state:", "lbctl vip list\nlbctl backend list 198.51.100.1:443/tcp"),
                ("Drain a backend (no new flows; established ones stay), then bring it back:", "lbctl backend drain 198.51.100.1:443/tcp 192.0.2.21\nlbctl backend undrain 198.51.100.1:443/tcp 192.0.2.21"),
                ("Change a weight, and watch the traffic follow:", "lbctl backend set-weight 198.51.100.1:443/tcp 192.0.2.22 300\nlbctl stats --watch"),
                ("What the learning model decided, as JSON for a script:", "lbctl --json model show"),
            ]),
            ".SH \"SEE ALSO\"\nlbd(8), lbd.toml(5)\n"
        )),
        _ => None,
    }
}

/// The `lbd.toml(5)` man page.
pub fn lbd_toml_5(keys: &[Key]) -> String {
    let mut out = format!(
        ".TH LBD.TOML 5 \"\" \"lb {}\" \"lb\"\n\
         .SH NAME\nlbd.toml \\- configuration of lbd, the lb XDP load balancer\n\
         .SH SYNOPSIS\n/etc/lb/lbd.toml\n\
         .SH DESCRIPTION\n",
        env!("CARGO_PKG_VERSION")
    );
    for p in [
        "lbd reads a TOML file: top-level settings, [encap], and one [[vip]] table per virtual service with its [vip.health], [vip.learning] and [[vip.backend]] tables. A file with any error is rejected whole, with a message naming the field and the fix; on reload a rejected file changes nothing.",
        "Check a file with lbd --check; apply it with systemctl reload lbd (SIGHUP). Keys marked (restart) only change when lbd starts: a reload that changes them is refused. lbctl's changes are written back to the file.",
    ] {
        out.push_str(&format!(".PP\n{}\n", roff(p)));
    }
    for (section, header) in SECTIONS {
        out.push_str(&format!(".SS \"{}\"\n", roff(header)));
        for k in keys.iter().filter(|k| k.section == section) {
            let restart = if k.restart { " (restart)" } else { "" };
            let default = match k.default.as_str() {
                "(required)" => "(required)".to_string(),
                d => format!(
                    "(default: {})",
                    roff(d.trim_matches(|c| c == '(' || c == ')'))
                ),
            };
            out.push_str(&format!(
                ".TP\n\\fB{}\\fR {default}\n{}{restart}\n",
                roff(&k.name),
                roff(&k.doc)
            ));
        }
    }
    out.push_str(&section(
        "FILES",
        &[
            (
                "/etc/lb/lbd.toml",
                "The configuration lbd reads by default (--config).",
            ),
            (
                "/usr/share/lb/lbd.toml",
                "The configuration as shipped, every key commented.",
            ),
        ],
    ));
    out.push_str(&examples(&[(
        "One IPv4 service on port 443 with two backends, health-checked over HTTP:",
        "interface = \"eth0\"\n\n[encap]\nsource_v4 = \"192.0.2.10\"\n\n[[vip]]\naddress = \"198.51.100.1\"\nport = 443\nprotocol = \"tcp\"\n\n[vip.health]\nkind = \"http\"\npath = \"/healthz\"\nport = 8081\n\n[[vip.backend]]\naddress = \"192.0.2.21\"\nweight = 100\n\n[[vip.backend]]\naddress = \"192.0.2.22\"\nweight = 200",
    )]));
    out.push_str(".SH \"SEE ALSO\"\nlbd(8), lbctl(8)\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn readme_key_list_is_generated_from_the_key_file() {
        let readme = fs::read_to_string(util::workspace_root().join("README.md")).unwrap();
        let want = readme_key_list(&keys().unwrap());
        assert!(
            readme.contains(&want),
            "README.md's key list differs from packaging/config-keys.toml: run `cargo xtask docs`"
        );
    }

    /// The keys lbd's parser accepts in `section`, from serde's "unknown field `x`, expected
    /// one of ..." refusal of an unknown key there (subtables' names removed).
    fn parser_keys(section: &str) -> BTreeSet<String> {
        let vip = "[[vip]]\naddress = \"10.0.0.1\"\nport = 80\nprotocol = \"tcp\"\n";
        let text = match section {
            "" => "interface = \"x\"\nzz_unknown = 1\n".to_string(),
            "encap" => "interface = \"x\"\n[encap]\nzz_unknown = 1\n".to_string(),
            "vip" => format!("interface = \"x\"\n{vip}zz_unknown = 1\n"),
            "vip.backend" => {
                format!("interface = \"x\"\n{vip}[[vip.backend]]\naddress = \"10.0.0.2\"\nzz_unknown = 1\n")
            }
            other => format!("interface = \"x\"\n{vip}[{other}]\nzz_unknown = 1\n"),
        };
        let err = lb_userspace::Config::parse(&text).unwrap_err().to_string();
        let expected = err
            .split("expected one of")
            .nth(1)
            .or_else(|| err.split("expected").nth(1))
            .unwrap_or_else(|| panic!("section {section:?}: unexpected refusal {err}"));
        expected
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .filter(|k| !["encap", "vip", "health", "learning", "backend"].contains(&k.as_str()))
            .collect()
    }

    #[test]
    fn key_file_and_parser_agree() {
        let keys = keys().unwrap();
        for (section, _) in SECTIONS {
            let listed: BTreeSet<String> = keys
                .iter()
                .filter(|k| k.section == section)
                .map(|k| k.name.clone())
                .collect();
            assert_eq!(
                listed,
                parser_keys(section),
                "section {section:?}: packaging/config-keys.toml and lb_userspace::Config differ"
            );
        }
    }

    #[test]
    fn man_pages_have_the_sections() {
        let page = lbd_toml_5(&keys().unwrap());
        for s in [
            ".TH LBD.TOML 5",
            ".SH \"FILES\"",
            ".SH EXAMPLES",
            "\\fBmax_drained_share\\fR",
        ] {
            assert!(page.contains(s), "lbd.toml.5 has no {s}");
        }
        for cmd in ["lbd", "lbctl"] {
            let extra = extra_man_sections(cmd).unwrap();
            for s in [".SH \"FILES\"", ".SH \"EXIT STATUS\"", ".SH EXAMPLES"] {
                assert!(extra.contains(s), "{cmd}: no {s}");
            }
        }
        assert!(extra_man_sections("lbd-decap").is_none());
    }
}
