//! Refuses files that someone other than root could have written: the agent runs as root and
//! acts on its configuration, so a config file (or the directory it is rewritten in) that an
//! unprivileged user can change is a way to root.
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
}
