//! Refuses files that someone other than root could have written: the agent runs as root and
//! acts on its configuration and state, so a config file (or the directory it is rewritten in),
//! a control socket directory or a pin directory that an unprivileged user can change is a way
//! to root, or to steer traffic.
use anyhow::{bail, Context as _, Result};
use std::{os::unix::fs::MetadataExt as _, path::Path};

/// `path` must be owned by root (or by the user lbd runs as) and not writable by group or
/// others. `what` names it in the error ("config file", "config directory").
pub fn check_private(path: &Path, what: &str) -> Result<()> {
    let meta = std::fs::metadata(path).with_context(|| format!("{what} {}", path.display()))?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != 0 && meta.uid() != me {
        bail!(
            "{what} {} is owned by uid {}, not root: lbd acts on it as root; `chown root {}`",
            path.display(),
            meta.uid(),
            path.display()
        );
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        bail!(
            "{what} {} is writable by {} (mode {:04o}): lbd acts on it as root; `chmod go-w {}`",
            path.display(),
            if mode & 0o002 != 0 {
                "everyone"
            } else {
                "its group"
            },
            mode,
            path.display()
        );
    }
    Ok(())
}

/// The config file and the directory lbd rewrites it in.
pub fn check_config_path(config: &Path) -> Result<()> {
    check_private(config, "config file")?;
    let dir = match config.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    check_private(dir, "config directory")
}

/// The directories lbd keeps state in, when they already exist (lbd creates them private
/// otherwise): the control socket's (the socket and lbd's run-state file) and `pin_dir`.
/// Someone who can write the first can put their own socket or run state in lbd's place; one
/// who owns or can write the second can plant maps that lbd takes over at start (pinned maps
/// are reused as found) and so steer traffic.
pub fn check_state_dirs(cfg: &crate::Config) -> Result<()> {
    if let Some(dir) = cfg.control_socket.parent() {
        if !dir.as_os_str().is_empty() && dir.exists() {
            check_private(dir, "control_socket directory")?;
        }
    }
    if !cfg.pin_dir.is_empty() {
        let dir = Path::new(&cfg.pin_dir);
        if dir.exists() {
            check_private(dir, "pin_dir")?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn refuses_group_and_world_writable() {
        let dir = std::env::temp_dir().join(format!("lb-sec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let f = dir.join("lbd.toml");
        std::fs::write(&f, "interface = \"eth0\"\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        check_config_path(&f).expect("0644 file in a 0755 directory is fine");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o664)).unwrap();
        let e = check_config_path(&f).unwrap_err().to_string();
        assert!(
            e.contains("is writable by its group (mode 0664)") && e.contains("chmod go-w"),
            "{e}"
        );
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = check_config_path(&f).unwrap_err().to_string();
        assert!(
            e.contains("config directory") && e.contains("writable by everyone (mode 0777)"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_shared_state_directories() {
        let dir = std::env::temp_dir().join(format!("lb-sec-state-{}", std::process::id()));
        let run = dir.join("run");
        let pins = dir.join("pins");
        std::fs::create_dir_all(&run).unwrap();
        std::fs::create_dir_all(&pins).unwrap();
        for d in [&dir, &run, &pins] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let mut cfg = crate::Config::parse("interface = \"eth0\"\n").unwrap();
        cfg.control_socket = run.join("lbd.sock");
        cfg.pin_dir = pins.display().to_string();
        check_state_dirs(&cfg).expect("0755 root-owned directories are fine");

        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = check_state_dirs(&cfg).unwrap_err().to_string();
        assert!(
            e.contains(&format!(
                "control_socket directory {} is writable by everyone (mode 0777)",
                run.display()
            )) && e.contains("chmod go-w"),
            "{e}"
        );
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();

        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            std::os::unix::fs::chown(&pins, Some(65534), None).unwrap();
            let e = check_state_dirs(&cfg).unwrap_err().to_string();
            assert!(
                e.contains(&format!(
                    "pin_dir {} is owned by uid 65534, not root",
                    pins.display()
                )) && e.contains("chown root"),
                "{e}"
            );
            std::os::unix::fs::chown(&pins, Some(0), None).unwrap();
        }
        std::fs::set_permissions(&pins, std::fs::Permissions::from_mode(0o775)).unwrap();
        let e = check_state_dirs(&cfg).unwrap_err().to_string();
        assert!(
            e.contains("pin_dir") && e.contains("writable by its group (mode 0775)"),
            "{e}"
        );

        // Directories that do not exist yet are lbd's to create.
        cfg.control_socket = dir.join("absent/lbd.sock");
        cfg.pin_dir = dir.join("absent-pins").display().to_string();
        check_state_dirs(&cfg).expect("absent directories are created private by lbd");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
