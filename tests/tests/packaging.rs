//! Packaging as an operator meets it: `cargo xtask install` lays out binaries, units, config,
//! man pages and completions; the units pass `systemd-analyze verify` against what was
//! installed; the default config is valid; `cargo xtask package` builds a .deb holding the
//! same; and lbd speaks sd_notify (READY, WATCHDOG, RELOADING, STOPPING) while running with
//! exactly the capabilities the units allow, and fails without any one of them.
//!
//! `cargo xtask install` runs once per test process (with the profile this test was built
//! with, so the binaries `cargo xtask test` already built are reused) and the tests share it.
use std::{
    collections::BTreeMap,
    ffi::OsStr,
    ffi::OsString,
    os::unix::{fs::PermissionsExt, net::UnixDatagram},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};
use tests::{
    procs::{Lbd, LbdOptions},
    require_root, NetNs,
};

/// Prefix of the shared test installation (the default of `cargo xtask install`).
const PREFIX: &str = "usr/local";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace")
        .to_path_buf()
}

/// `target/<profile>`, where this test binary and the workspace's binaries are.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    exe.parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>/deps/<test>")
        .to_path_buf()
}

/// The cargo profile matching [`profile_dir`].
fn cargo_profile() -> String {
    match profile_dir().file_name().and_then(OsStr::to_str) {
        Some("debug") | None => "dev".to_string(),
        Some(other) => other.to_string(),
    }
}

fn lbd_path() -> PathBuf {
    let lbd = profile_dir().join("lbd");
    assert!(
        lbd.exists(),
        "{} is missing: build it first (`cargo build -p lb-userspace`, which `cargo xtask test` does)",
        lbd.display()
    );
    lbd
}

/// A fresh directory for this test process under cargo's per-target temp dir; directories of
/// earlier runs whose process is gone are removed.
fn scratch(label: &str) -> PathBuf {
    let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
    if let Ok(entries) = std::fs::read_dir(base) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name
                .strip_prefix("packaging-")
                .and_then(|r| r.split('-').next())
                .and_then(|p| p.parse::<u32>().ok());
            if let Some(pid) = pid {
                if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }
    let dir = base.join(format!("packaging-{}-{label}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Fails (CI, where the tools are required) or skips (a developer's machine) when a tool is
/// missing. Returns whether the test can go on.
fn have_tool(tool: &str, package: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        let msg = format!("`{tool}` is missing: `apt-get install {package}`");
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{msg} (required when CI=true)");
        }
        eprintln!("SKIPPED: {msg}");
    }
    found
}

fn output_text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `cargo xtask ARGS...` from the workspace root, as a developer types it, with a umask that
/// lets group members write (as some sites have): the installed tree must not inherit it.
fn cargo_xtask(args: &[&str]) -> Output {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    Command::new("sh")
        .args(["-c", "umask 002 && exec \"$0\" \"$@\""])
        .arg(cargo)
        .arg("xtask")
        .args(args)
        .current_dir(workspace_root())
        .stdin(Stdio::null())
        .output()
        .expect("starting cargo xtask")
}

/// The shared installation: `cargo xtask install --destdir DIR --profile P` (prefix
/// /usr/local), run once. Returns DESTDIR and the install's stdout.
fn installed() -> &'static (PathBuf, String) {
    static INSTALL: OnceLock<(PathBuf, String)> = OnceLock::new();
    INSTALL.get_or_init(|| {
        let dest = scratch("install");
        let profile = cargo_profile();
        let out = cargo_xtask(&[
            "install",
            "--destdir",
            dest.to_str().unwrap(),
            "--profile",
            &profile,
        ]);
        assert!(
            out.status.success(),
            "cargo xtask install failed:\n{}",
            output_text(&out)
        );
        (dest, String::from_utf8_lossy(&out.stdout).into_owned())
    })
}

/// Values of `Key=` in a unit file, in order (comments and sections ignored).
fn unit_values(text: &str, key: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with(';'))
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim().to_string())
        .collect()
}

fn unit_value(text: &str, key: &str) -> String {
    let v = unit_values(text, key);
    assert_eq!(v.len(), 1, "{key}= should be set once, found {v:?}");
    v[0].clone()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn packaging(file: &str) -> PathBuf {
    workspace_root().join("packaging").join(file)
}

fn lbd_check(config: &Path) -> Output {
    Command::new(lbd_path())
        .args(["--config", config.to_str().unwrap(), "--check"])
        .output()
        .unwrap()
}

#[test]
fn default_config_is_valid_and_balances_nothing() {
    let path = packaging("lbd.toml");
    let out = lbd_check(&path);
    assert!(
        out.status.success(),
        "lbd --check rejects packaging/lbd.toml:\n{}",
        output_text(&out)
    );
    let cfg = lb_userspace::Config::load(&path).unwrap();
    assert!(
        cfg.vips.is_empty(),
        "the shipped config must not balance example VIPs"
    );

    // The commented examples ("#key = ..." and "#[table]" lines) are valid too once enabled,
    // so the documentation in the file cannot drift from the real format.
    let enabled: String = read(&path)
        .lines()
        .map(|l| match l.strip_prefix('#') {
            Some(rest) if rest.starts_with(|c: char| c.is_ascii_lowercase() || c == '[') => rest,
            _ => l,
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let dir = scratch("config");
    let all = dir.join("all-examples.toml");
    std::fs::write(&all, &enabled).unwrap();
    // The file's own validation, as `lbd --check` runs it; not the host's: `--check` also
    // wants the example's `control_group` to exist here.
    let cfg = lb_userspace::Config::load(&all).unwrap_or_else(|e| {
        panic!("packaging/lbd.toml with every example enabled is rejected:\n{e}\n{enabled}")
    });
    assert_eq!(cfg.vips.len(), 1);
    assert_eq!(cfg.vips[0].backends.len(), 2);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn units_have_the_required_settings() {
    let unit = read(&packaging("lbd.service"));
    for (key, want) in [
        ("Type", "notify"),
        ("WatchdogSec", "30"),
        ("Restart", "on-failure"),
        ("RestartSec", "2"),
        ("ExecStart", "/usr/sbin/lbd --config /etc/lb/lbd.toml"),
        ("User", "root"),
        ("RuntimeDirectory", "lb"),
        // The run-state file in /run/lb must survive an unclean stop (tests/e2e_systemd.rs).
        ("RuntimeDirectoryPreserve", "yes"),
        ("LimitMEMLOCK", "infinity"),
        ("ProtectSystem", "strict"),
        ("ProtectKernelTunables", "no"),
        ("SystemCallArchitectures", "native"),
        (
            "RestrictAddressFamilies",
            "AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        ),
    ] {
        assert_eq!(unit_value(&unit, key), want, "lbd.service {key}=");
    }
    assert!(
        unit_values(&unit, "ExecReload").contains(&"/bin/sh -c 'kill -HUP ${MAINPID}'".to_string())
    );
    let rw = unit_values(&unit, "ReadWritePaths");
    assert!(rw.contains(&"/etc/lb".to_string()) && rw.iter().any(|p| p.ends_with("/sys/fs/bpf")));
    for key in [
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "ProtectClock",
        "ProtectHostname",
        "RestrictNamespaces",
        "RestrictRealtime",
        "RestrictSUIDSGID",
        "LockPersonality",
        "MemoryDenyWriteExecute",
    ] {
        assert_eq!(unit_value(&unit, key), "yes", "lbd.service {key}=");
    }
    let caps = unit_value(&unit, "CapabilityBoundingSet");
    assert!(!caps.contains("CAP_SYS_ADMIN"), "{caps}");

    let decap = read(&packaging("lbd-decap@.service"));
    assert_eq!(unit_value(&decap, "Type"), "notify");
    assert_eq!(
        unit_value(&decap, "EnvironmentFile"),
        "/etc/lb/decap-%i.env"
    );
    assert_eq!(
        unit_value(&decap, "ExecStart"),
        "/usr/sbin/lbd decap --interface %i $LBD_DECAP_ARGS"
    );
    assert!(
        read(&packaging("decap.env")).contains("LBD_DECAP_ARGS=--vip "),
        "the example environment file sets LBD_DECAP_ARGS"
    );
}

#[test]
fn install_lays_out_everything_and_is_idempotent() {
    let (dest, stdout) = installed();
    let p = |rel: &str| dest.join(rel);
    let prefix = |rel: &str| dest.join(PREFIX).join(rel);
    let commands = ["lbd", "lbctl"];
    let mut expected: Vec<PathBuf> = vec![
        prefix("lib/systemd/system/lbd.service"),
        prefix("lib/systemd/system/lbd-decap@.service"),
        p("etc/lb/lbd.toml"),
        prefix("share/lb/lbd.toml"),
        prefix("share/lb/decap.env"),
        prefix("share/lb/grafana/lb.json"),
        prefix("share/lb/prometheus/lb-rules.yml"),
        prefix("share/doc/lb/copyright"),
        prefix("share/doc/lb/changelog"),
        prefix("share/doc/lb/README.md"),
        prefix("share/man/man8/lbd-decap.8"),
        prefix("share/man/man5/lbd.toml.5"),
    ];
    for c in commands {
        expected.push(prefix(&format!("sbin/{c}")));
        expected.push(prefix(&format!("share/man/man8/{c}.8")));
        expected.push(prefix(&format!("share/bash-completion/completions/{c}")));
        expected.push(prefix(&format!("share/zsh/site-functions/_{c}")));
        expected.push(prefix(&format!("share/fish/vendor_completions.d/{c}.fish")));
    }
    for f in &expected {
        assert!(f.is_file(), "{} was not installed:\n{stdout}", f.display());
    }

    // The pages operators look for beyond the options clap renders.
    for (page, sections) in [
        ("man8/lbd.8", &["FILES", "EXIT STATUS", "EXAMPLES"][..]),
        ("man8/lbctl.8", &["FILES", "EXIT STATUS", "EXAMPLES"][..]),
        ("man5/lbd.toml.5", &["FILES", "EXAMPLES"][..]),
    ] {
        let text = read(&prefix(&format!("share/man/{page}")));
        for s in sections {
            assert!(
                text.contains(&format!(".SH \"{s}\"")) || text.contains(&format!(".SH {s}\n")),
                "{page} has no {s} section"
            );
        }
    }

    // Binaries: the build's, executable.
    for c in commands {
        let installed = prefix(&format!("sbin/{c}"));
        let mode = std::fs::metadata(&installed).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755, "{c} mode");
        assert!(
            std::fs::read(&installed).unwrap() == std::fs::read(profile_dir().join(c)).unwrap(),
            "{c} differs from the build's"
        );
    }
    // Directories are 0755 whatever the umask (lbd refuses a config directory others can
    // write).
    for d in ["etc/lb", PREFIX, &format!("{PREFIX}/share/man/man8")] {
        let mode = std::fs::metadata(p(d)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755, "{d} mode {mode:o}");
    }
    assert_eq!(
        std::fs::metadata(p("etc/lb/lbd.toml"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o644
    );
    // Units name the installed binary.
    let unit = read(&prefix("lib/systemd/system/lbd.service"));
    assert_eq!(
        unit_value(&unit, "ExecStart"),
        "/usr/local/sbin/lbd --config /etc/lb/lbd.toml"
    );
    assert!(!unit.contains("/usr/sbin/lbd"), "{unit}");
    // The default config, as shipped.
    assert_eq!(read(&p("etc/lb/lbd.toml")), read(&packaging("lbd.toml")));
    // Man pages are roff with the right title and section; completions are valid scripts
    // for their shells (checked by the shells that are installed).
    for page in ["lbd.8", "lbctl.8", "lbd-decap.8"] {
        let text = read(&prefix(&format!("share/man/man8/{page}")));
        let name = page.trim_end_matches(".8");
        assert!(text.contains(&format!(".TH {name} 8")), "{page}:\n{text}");
    }
    assert!(read(&prefix("share/man/man8/lbd.8")).contains("decap"));
    for c in commands {
        let bash = prefix(&format!("share/bash-completion/completions/{c}"));
        let out = Command::new("bash").arg("-n").arg(&bash).output().unwrap();
        assert!(out.status.success(), "bash -n {c}:\n{}", output_text(&out));
        assert!(
            read(&bash).contains(&format!("complete -F _{c}")),
            "bash completion registers {c}"
        );
        assert!(read(&prefix(&format!("share/zsh/site-functions/_{c}")))
            .starts_with(&format!("#compdef {c}")));
        assert!(read(&prefix(&format!(
            "share/fish/vendor_completions.d/{c}.fish"
        )))
        .contains(&format!("complete -c {c}")));
    }
    if Command::new("sh")
        .args(["-c", "command -v man"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        let out = Command::new("man")
            .arg("-l")
            .arg(prefix("share/man/man8/lbd.8"))
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "80")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("--config"),
            "man -l lbd.8:\n{}",
            output_text(&out)
        );
    }

    // Again, with an operator's edit in the config: nothing changes, and the edit stays.
    let edited = format!(
        "{}\n# edited by the operator\n",
        read(&p("etc/lb/lbd.toml"))
    );
    std::fs::write(p("etc/lb/lbd.toml"), &edited).unwrap();
    let out = cargo_xtask(&[
        "install",
        "--destdir",
        dest.to_str().unwrap(),
        "--profile",
        &cargo_profile(),
        "--no-build",
    ]);
    assert!(
        out.status.success(),
        "second install:\n{}",
        output_text(&out)
    );
    let again = String::from_utf8_lossy(&out.stdout);
    assert!(
        again.contains(&format!(
            "0 installed, {} unchanged, 1 kept",
            expected_count(stdout) - 1
        )),
        "a second install should change nothing:\n{again}"
    );
    assert!(again.contains("kept"), "{again}");
    assert_eq!(
        read(&p("etc/lb/lbd.toml")),
        edited,
        "the operator's config was replaced"
    );
}

/// How many files the first install reported installed.
fn expected_count(stdout: &str) -> usize {
    let line = stdout
        .lines()
        .find(|l| l.contains(" installed, "))
        .unwrap_or_else(|| panic!("no summary line in:\n{stdout}"));
    line.split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn units_pass_systemd_analyze_verify() {
    if !have_tool("systemd-analyze", "systemd") {
        return;
    }
    let (dest, _) = installed();
    let units_dir = dest.join(PREFIX).join("lib/systemd/system");
    let dir = scratch("verify");
    // The installed units, re-rooted into DESTDIR: ExecStart= must name a real executable
    // (systemd-analyze checks), and it is the installed one. Documentation=man: references
    // are looked up among the installed man pages.
    let installed_lbd = dest.join(PREFIX).join("sbin/lbd");
    for unit in ["lbd.service", "lbd-decap@.service"] {
        let text = read(&units_dir.join(unit))
            .replace("/usr/local/sbin/lbd", installed_lbd.to_str().unwrap());
        std::fs::write(dir.join(unit), text).unwrap();
    }
    // Every Documentation=man:NAME(SECTION) is an installed page. systemd-analyze checks
    // that too, through man(1), when man-db is installed.
    let man_dir = dest.join(PREFIX).join("share/man");
    for unit in ["lbd.service", "lbd-decap@.service"] {
        for doc in unit_values(&read(&dir.join(unit)), "Documentation") {
            let page = doc.strip_prefix("man:").expect("man: documentation");
            let (name, section) = page.trim_end_matches(')').split_once('(').unwrap();
            let file = man_dir.join(format!("man{section}/{name}.{section}"));
            assert!(
                file.is_file(),
                "{unit}: {doc} is not installed ({})",
                file.display()
            );
        }
    }
    let with_man = have_tool("man", "man-db");
    let verify = |units: &[PathBuf]| {
        Command::new("systemd-analyze")
            .arg("verify")
            .arg(format!("--man={with_man}"))
            .args(units)
            .env("MANPATH", &man_dir)
            .env("SYSTEMD_LOG_COLOR", "0")
            .output()
            .unwrap()
    };
    let out = verify(&[dir.join("lbd.service"), dir.join("lbd-decap@eth0.service")]);
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "systemd-analyze verify complains about the units:\n{}",
        output_text(&out)
    );

    // The check has teeth: a misspelled setting and a missing binary are reported.
    let bad = read(&dir.join("lbd.service"))
        .replace("ProtectHome=yes", "ProtectHomes=yes")
        .replace(installed_lbd.to_str().unwrap(), "/nonexistent/lbd");
    std::fs::write(dir.join("bad.service"), bad).unwrap();
    let out = verify(&[dir.join("bad.service")]);
    let text = output_text(&out);
    assert!(
        !out.status.success() && text.contains("ProtectHomes") && text.contains("/nonexistent/lbd"),
        "systemd-analyze verify should reject a broken unit:\n{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn deb_package_holds_the_installation() {
    if !have_tool("dpkg-deb", "dpkg") || !have_tool("dpkg-shlibdeps", "dpkg-dev") {
        return;
    }
    let out_dir = scratch("deb");
    let out = cargo_xtask(&[
        "package",
        "--out",
        out_dir.to_str().unwrap(),
        "--profile",
        &cargo_profile(),
    ]);
    assert!(
        out.status.success(),
        "cargo xtask package failed:\n{}",
        output_text(&out)
    );
    let debs: Vec<PathBuf> = std::fs::read_dir(&out_dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect();
    assert_eq!(debs.len(), 1, "one .deb in {}: {debs:?}", out_dir.display());
    let deb = &debs[0];

    let dpkg = |args: &[&str]| {
        let out = Command::new("dpkg-deb")
            .args(args)
            .arg(deb)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "dpkg-deb {args:?}:\n{}",
            output_text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let info = dpkg(&["--info"]);
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.trim().strip_prefix(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("no {name} in dpkg-deb --info:\n{info}"))
            .to_string()
    };
    assert_eq!(field("Package"), "lb");
    let maintainer = field("Maintainer");
    assert!(
        maintainer.contains('<') && !maintainer.contains("localhost"),
        "Maintainer: {maintainer}"
    );
    let depends = field("Depends");
    assert!(
        depends.contains("libc6") && !depends.contains("iproute2"),
        "Depends: {depends}"
    );
    assert!(
        info.contains("conffiles") && info.contains("postinst"),
        "{info}"
    );

    // Files: path -> (mode, owner/group).
    let contents = dpkg(&["--contents"]);
    let files: BTreeMap<String, (String, String)> = contents
        .lines()
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            Some((
                cols.get(5)?.trim_start_matches('.').to_string(),
                (cols.first()?.to_string(), cols.get(1)?.to_string()),
            ))
        })
        .collect();
    for want in [
        "/usr/sbin/lbd",
        "/usr/sbin/lbctl",
        "/usr/lib/systemd/system/lbd.service",
        "/usr/lib/systemd/system/lbd-decap@.service",
        "/etc/lb/lbd.toml",
        "/usr/share/lb/decap.env",
        "/usr/share/lb/grafana/lb.json",
        "/usr/share/lb/prometheus/lb-rules.yml",
        "/usr/share/doc/lb/copyright",
        "/usr/share/doc/lb/changelog.gz",
        "/usr/share/doc/lb/README.md",
        "/usr/share/man/man5/lbd.toml.5.gz",
        "/usr/share/man/man8/lbd.8.gz",
        "/usr/share/man/man8/lbd-decap.8.gz",
        "/usr/share/man/man8/lbctl.8.gz",
        "/usr/share/bash-completion/completions/lbd",
        "/usr/share/bash-completion/completions/lbctl",
        "/usr/share/zsh/vendor-completions/_lbd",
        "/usr/share/zsh/vendor-completions/_lbctl",
        "/usr/share/fish/vendor_completions.d/lbd.fish",
        "/usr/share/fish/vendor_completions.d/lbctl.fish",
    ] {
        let (mode, owner) = files
            .get(want)
            .unwrap_or_else(|| panic!("{want} is not in the package:\n{contents}"));
        assert_eq!(owner, "root/root", "{want} owner");
        let want_mode = if want.contains("/sbin/") {
            "-rwxr-xr-x"
        } else {
            "-rw-r--r--"
        };
        assert_eq!(mode, want_mode, "{want} mode");
    }
    assert_eq!(
        files.get("/etc/lb/").map(|(m, _)| m.as_str()),
        Some("drwxr-xr-x"),
        "/etc/lb in the package"
    );

    // Control files and the unit as packaged.
    let x = out_dir.join("extracted");
    std::fs::create_dir_all(&x).unwrap();
    for (flag, dir) in [("--control", x.join("DEBIAN")), ("--extract", x.clone())] {
        let out = Command::new("dpkg-deb")
            .arg(flag)
            .arg(deb)
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "dpkg-deb {flag}:\n{}",
            output_text(&out)
        );
    }
    assert_eq!(read(&x.join("DEBIAN/conffiles")).trim(), "/etc/lb/lbd.toml");
    let postinst = read(&x.join("DEBIAN/postinst"));
    assert!(
        postinst.contains("[ -d /run/systemd/system ]")
            && postinst.contains("systemctl daemon-reload"),
        "postinst reloads systemd only if it runs:\n{postinst}"
    );
    for script in ["postinst", "prerm", "postrm"] {
        let out = Command::new("sh")
            .arg("-n")
            .arg(x.join("DEBIAN").join(script))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "sh -n {script}:\n{}",
            output_text(&out)
        );
    }
    let unit = read(&x.join("usr/lib/systemd/system/lbd.service"));
    assert_eq!(
        unit_value(&unit, "ExecStart"),
        "/usr/sbin/lbd --config /etc/lb/lbd.toml"
    );
    assert_eq!(
        read(&x.join("etc/lb/lbd.toml")),
        read(&packaging("lbd.toml"))
    );
    // The packaged (stripped) binaries run.
    let out = Command::new(x.join("usr/sbin/lbd"))
        .arg("--config")
        .arg(x.join("etc/lb/lbd.toml"))
        .arg("--check")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "packaged lbd --check:\n{}",
        output_text(&out)
    );
    let out = Command::new(x.join("usr/sbin/lbctl"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "packaged lbctl --version:\n{}",
        output_text(&out)
    );
    // lintian: no error. The warnings and notes accepted are listed in the README (Install).
    if have_tool("lintian", "lintian") {
        let out = Command::new("lintian")
            .args(["--info", "--pedantic"])
            .arg(deb)
            .output()
            .unwrap();
        let text = output_text(&out);
        let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("E: ")).collect();
        assert!(errors.is_empty(), "lintian reports errors:\n{text}");
        let accepted = [
            "W: lb: maintainer-script-calls-systemctl",
            "I: lb: hardening-no-fortify-functions",
            "I: lb: package-supports-alternative-init-but-no-init.d-script",
        ];
        let new: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("W: ") || l.starts_with("I: ") || l.starts_with("P: "))
            .filter(|l| !accepted.iter().any(|a| l.starts_with(a)))
            .collect();
        assert!(
            new.is_empty(),
            "lintian tags not accepted (fix, or list them with a reason in the README):\n{text}"
        );
    }
    let _ = std::fs::remove_dir_all(&out_dir);
}

// --- lbd under the units' capabilities, with sd_notify ---------------------------------------

/// The capabilities a unit allows, as `setpriv --bounding-set` names them (`bpf`, ...).
fn unit_caps(unit: &str) -> Vec<String> {
    unit_value(&read(&packaging(unit)), "CapabilityBoundingSet")
        .split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_ascii_lowercase())
        .collect()
}

/// A namespace with a veth pair (veth0 10.99.0.1 <-> veth1 10.99.0.2) and loopback up.
fn veth_ns(role: &str) -> NetNs {
    let ns = NetNs::new(role).expect("creating a namespace");
    for args in [
        &["link", "set", "lo", "up"][..],
        &[
            "link", "add", "veth0", "type", "veth", "peer", "name", "veth1",
        ],
        &["addr", "add", "10.99.0.1/24", "dev", "veth0"],
        &["addr", "add", "10.99.0.2/24", "dev", "veth1"],
        &["link", "set", "veth0", "up"],
        &["link", "set", "veth1", "up"],
    ] {
        ns.ip(args).unwrap();
    }
    ns
}

/// Receives sd_notify datagrams like systemd does.
struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
    seen: Vec<String>,
}

impl NotifySocket {
    fn bind(path: PathBuf) -> Self {
        let _ = std::fs::remove_file(&path);
        let sock = UnixDatagram::bind(&path).unwrap();
        NotifySocket {
            sock,
            path,
            seen: Vec::new(),
        }
    }

    /// Waits for a message containing `what` (every message is recorded). `lbd` is checked
    /// so that a crashed lbd fails fast with its status.
    fn wait_message(&mut self, what: &str, timeout: Duration, lbd: &mut Lbd) -> String {
        let end = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        loop {
            let left = end.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no {what:?} from lbd within {timeout:?}; got {:?}",
                self.seen
            );
            self.sock
                .set_read_timeout(Some(left.min(Duration::from_millis(200))))
                .unwrap();
            match self.sock.recv(&mut buf) {
                Ok(n) => {
                    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                    self.seen.push(msg.clone());
                    if msg.lines().any(|l| l == what) {
                        return msg;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    if let Some(status) = lbd.try_wait() {
                        panic!(
                            "lbd exited ({status}) before sending {what:?}; got {:?}",
                            self.seen
                        );
                    }
                }
                Err(e) => panic!("receiving notifications: {e}"),
            }
        }
    }
}

/// Starts `lbd ARGS` in `ns` with only `caps` in its bounding set (as systemd's
/// CapabilityBoundingSet= leaves root), notifying `notify`; its output goes to `log` (a file,
/// so that a long verifier log cannot fill a pipe nobody reads).
fn spawn_lbd(
    ns: &NetNs,
    caps: &[String],
    args: &[&str],
    notify: &Path,
    watchdog: bool,
    log: &Path,
) -> Lbd {
    let bounding: String = std::iter::once("-all".to_string())
        .chain(caps.iter().map(|c| format!("+{c}")))
        .collect::<Vec<_>>()
        .join(",");
    let mut opts = LbdOptions {
        bin: Some(lbd_path()),
        wrapper: vec!["setpriv".into(), format!("--bounding-set={bounding}")],
        env: vec![("NOTIFY_SOCKET".into(), notify.display().to_string())],
        env_remove: vec!["WATCHDOG_PID".into()],
        log: Some(log.to_path_buf()),
        ..LbdOptions::default()
    };
    if watchdog {
        opts.env.push(("WATCHDOG_USEC".into(), "200000".into()));
    } else {
        opts.env_remove.push("WATCHDOG_USEC".into());
    }
    let args: Vec<OsString> = args.iter().map(OsString::from).collect();
    let dir = log.parent().expect("log in a directory");
    Lbd::spawn_args(ns, &args, dir, dir.join("lbd.sock"), &opts)
}

/// Runs lbd with one capability of the unit's set left out, and asserts that it fails before
/// it is ready: a unit that grants a capability lbd can do without is not least privilege.
fn assert_fails_without(
    ns: &NetNs,
    caps: &[String],
    missing: &str,
    args: &[&str],
    dir: &Path,
) -> String {
    let fewer: Vec<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
    let notify = NotifySocket::bind(dir.join(format!("notify-without-{missing}.sock")));
    notify.sock.set_nonblocking(true).unwrap();
    let log = dir.join(format!("without-{missing}.log"));
    let mut lbd = spawn_lbd(ns, &fewer, args, &notify.path, false, &log);
    let cap = format!("CAP_{}", missing.to_uppercase());
    let end = Instant::now() + Duration::from_secs(30);
    let mut buf = [0u8; 4096];
    let status = loop {
        if let Ok(n) = notify.sock.recv(&mut buf) {
            if String::from_utf8_lossy(&buf[..n])
                .lines()
                .any(|l| l == "READY=1")
            {
                drop(lbd);
                panic!(
                    "`lbd {}` got ready with only {fewer:?}: the unit's CapabilityBoundingSet= is not minimal ({cap} can go, or one of the others implies it)",
                    args.join(" ")
                );
            }
        }
        if let Some(s) = lbd.try_wait() {
            break s;
        }
        if Instant::now() > end {
            drop(lbd);
            panic!(
                "`lbd {}` without {cap} neither failed nor got ready in 30 s: {}",
                args.join(" "),
                tail(&log)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        !status.success(),
        "`lbd {}` succeeded without {cap}",
        args.join(" ")
    );
    format!("without {cap}: {}", tail(&log).lines().last().unwrap_or(""))
}

/// The last lines of a log, for failure messages.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}

/// A balancer config for the veth namespace: one VIP, control socket group-owned (so that
/// CAP_CHOWN is exercised), metrics on the namespace's loopback, nothing pinned
/// (`ip netns exec` hides the host's bpffs).
fn balancer_config(dir: &Path) -> PathBuf {
    let path = dir.join("lbd.toml");
    std::fs::write(
        &path,
        format!(
            "interface = \"veth0\"\nxdp_mode = \"native\"\npin_dir = \"\"\n\
             control_socket = \"{}\"\ncontrol_group = \"daemon\"\n\
             metrics_listen = \"127.0.0.1:9469\"\n\
             [encap]\nsource_v4 = \"10.99.0.1\"\n\
             [[vip]]\naddress = \"10.99.1.1\"\nport = 80\nprotocol = \"tcp\"\n\
             [[vip.backend]]\naddress = \"10.99.0.2\"\n",
            dir.join("lbd.sock").display()
        ),
    )
    .unwrap();
    path
}

#[test]
fn lbd_notifies_systemd_under_the_units_capabilities() {
    require_root();
    let ns = veth_ns("notify");
    let dir = scratch("notify");
    let config = balancer_config(&dir);
    let caps = unit_caps("lbd.service");
    let mut notify = NotifySocket::bind(dir.join("notify.sock"));
    let log = dir.join("lbd.log");
    let mut lbd = spawn_lbd(
        &ns,
        &caps,
        &["--config", config.to_str().unwrap()],
        &notify.path,
        true,
        &log,
    );
    let ready = notify.wait_message("READY=1", Duration::from_secs(30), &mut lbd);
    assert!(
        ready.contains("STATUS=balancing 1 VIPs on veth0"),
        "{ready:?}"
    );
    // WATCHDOG_USEC=200ms: a ping every 100ms.
    let start = Instant::now();
    for _ in 0..3 {
        notify.wait_message("WATCHDOG=1", Duration::from_secs(2), &mut lbd);
    }
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "watchdog pings too slow"
    );
    lbd.signal(libc::SIGHUP);
    notify.wait_message("RELOADING=1", Duration::from_secs(10), &mut lbd);
    let ready = notify.wait_message("READY=1", Duration::from_secs(10), &mut lbd);
    assert!(ready.contains("STATUS="), "{ready:?}");
    lbd.signal(libc::SIGTERM);
    notify.wait_message("STOPPING=1", Duration::from_secs(10), &mut lbd);
    let status = lbd.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "lbd exit {status}: {}", tail(&log));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn lbd_needs_every_capability_the_unit_grants() {
    require_root();
    let ns = veth_ns("caps");
    let dir = scratch("caps");
    let config = balancer_config(&dir);
    let caps = unit_caps("lbd.service");
    assert!(caps.len() >= 3, "{caps:?}");
    for missing in &caps {
        let args = ["--config", config.to_str().unwrap()];
        println!("{}", assert_fails_without(&ns, &caps, missing, &args, &dir));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn decap_notifies_and_needs_every_capability_of_its_unit() {
    require_root();
    let ns = veth_ns("decap");
    let dir = scratch("decap");
    let caps = unit_caps("lbd-decap@.service");
    let args = [
        "decap",
        "--interface",
        "veth1",
        "--vip",
        "10.99.1.1",
        "--xdp-mode",
        "native",
    ];
    for missing in &caps {
        println!("{}", assert_fails_without(&ns, &caps, missing, &args, &dir));
    }
    let mut notify = NotifySocket::bind(dir.join("notify.sock"));
    let log = dir.join("decap.log");
    let mut lbd = spawn_lbd(&ns, &caps, &args, &notify.path, true, &log);
    let ready = notify.wait_message("READY=1", Duration::from_secs(30), &mut lbd);
    assert!(ready.contains("STATUS=decapsulating"), "{ready:?}");
    notify.wait_message("WATCHDOG=1", Duration::from_secs(2), &mut lbd);
    lbd.signal(libc::SIGTERM);
    notify.wait_message("STOPPING=1", Duration::from_secs(10), &mut lbd);
    let status = lbd.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "lbd decap exit {status}: {}", tail(&log));
    let _ = std::fs::remove_dir_all(&dir);
}
