//! Applying a control request's change to a configuration, and writing the configuration
//! file atomically. Pure functions of the config: the agent runs them inside its transaction.
use crate::{
    config::{self, Config},
    control::{parse_backend_address, Request, VipName},
};
use anyhow::{anyhow, bail, Result};
use std::{
    fs,
    io::Write as _,
    os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

pub(super) fn unknown_vip(v: &VipName) -> String {
    format!(
        "vip {v}: no such VIP; `lbctl vip list` shows the configured ones, `lbctl vip add` adds one"
    )
}

pub(super) fn find_vip<'a>(cfg: &'a mut Config, v: &VipName) -> Result<&'a mut config::Vip> {
    cfg.vips
        .iter_mut()
        .find(|x| VipName::of(x) == *v)
        .ok_or_else(|| anyhow!(unknown_vip(v)))
}

pub(super) fn find_backend<'a>(
    vip: &'a mut config::Vip,
    name: &VipName,
    addr: std::net::IpAddr,
) -> Result<&'a mut config::Backend> {
    vip.backends
        .iter_mut()
        .find(|b| b.address == addr)
        .ok_or_else(|| {
            anyhow!(
                "backend {addr} of vip {name}: no such backend; `lbctl backend list {name}` shows them, `lbctl backend add` adds one"
            )
        })
}

pub(super) fn parse_vip(s: &str) -> Result<VipName> {
    s.parse::<VipName>().map_err(|e| anyhow!(e))
}

pub(super) fn parse_addr(s: &str) -> Result<std::net::IpAddr> {
    parse_backend_address(s).map_err(|e| anyhow!(e))
}

/// Applies a mutating request to a configuration; returns what was done, for the log and the
/// caller. Validation of the result is the caller's (`Config::validate`).
pub(super) fn edit(cfg: &mut Config, req: &Request) -> Result<String> {
    match req {
        Request::VipAdd {
            vip,
            forwarding,
            table_size,
            force,
        } => {
            let name = parse_vip(vip)?;
            let forwarding = forwarding.unwrap_or_default();
            let table_size = table_size.unwrap_or(lb_common::DEFAULT_TABLE_SIZE);
            let added = format!(
                "added vip {name} (forwarding {}, table_size {table_size})",
                forwarding.config_value()
            );
            if let Some(x) = cfg.vips.iter().find(|x| VipName::of(x) == name) {
                // The same request again changes nothing and succeeds (`already so`).
                if x.forwarding == forwarding && x.table_size == table_size {
                    return Ok(added);
                }
                bail!("vip {name}: already configured with other settings; change its backends with `lbctl backend ...`, or `lbctl vip remove` it first to change its forwarding or table size");
            }
            cfg.vips.push(config::Vip {
                address: name.address,
                port: name.port,
                protocol: name.protocol,
                forwarding,
                table_size,
                health: None,
                learning: None,
                backends: Vec::new(),
                allow_host_address: *force,
            });
            Ok(added)
        }
        Request::VipRemove { vip } => {
            let name = parse_vip(vip)?;
            find_vip(cfg, &name)?;
            cfg.vips.retain(|x| VipName::of(x) != name);
            Ok(format!("removed vip {name}"))
        }
        Request::BackendAdd {
            vip,
            address,
            weight,
        } => {
            let name = parse_vip(vip)?;
            let addr = parse_addr(address)?;
            let v = find_vip(cfg, &name)?;
            let weight = weight.unwrap_or(1);
            if let Some(b) = v.backends.iter().find(|b| b.address == addr) {
                // The same request again changes nothing and succeeds (`already so`).
                if b.weight == weight {
                    return Ok(format!(
                        "added backend {addr} to vip {name} with weight {weight}"
                    ));
                }
                bail!("backend {addr} of vip {name}: already a backend of this VIP, with weight {}; use `lbctl backend set-weight` to change its weight", b.weight);
            }
            v.backends.push(config::Backend {
                address: addr,
                weight,
                drained: false,
                pinned: false,
            });
            Ok(format!(
                "added backend {addr} to vip {name} with weight {weight}"
            ))
        }
        Request::BackendRemove { vip, address, .. } => {
            let name = parse_vip(vip)?;
            let addr = parse_addr(address)?;
            let v = find_vip(cfg, &name)?;
            find_backend(v, &name, addr)?;
            v.backends.retain(|b| b.address != addr);
            Ok(format!("removed backend {addr} from vip {name}"))
        }
        Request::BackendSetWeight {
            vip,
            address,
            weight,
            ..
        } => {
            let name = parse_vip(vip)?;
            let addr = parse_addr(address)?;
            let v = find_vip(cfg, &name)?;
            let b = find_backend(v, &name, addr)?;
            let old = b.weight;
            b.weight = *weight;
            Ok(format!(
                "backend {addr} of vip {name}: weight {old} -> {weight}{}",
                if b.drained {
                    " (drained: takes effect on undrain)"
                } else {
                    ""
                }
            ))
        }
        Request::BackendDrain { vip, address, .. } | Request::BackendUndrain { vip, address } => {
            let drain = matches!(req, Request::BackendDrain { .. });
            let name = parse_vip(vip)?;
            let addr = parse_addr(address)?;
            let v = find_vip(cfg, &name)?;
            let learns = v.learning_enabled();
            let b = find_backend(v, &name, addr)?;
            b.drained = drain;
            Ok(if drain {
                format!("backend {addr} of vip {name}: drained (no new flows; established flows continue)")
            } else if learns && !b.pinned {
                // The learning model owns the weight: it brings the backend back gradually.
                format!(
                    "backend {addr} of vip {name}: undrained; the learning model ramps it back to weight {} over its next steps (`lbctl model show` follows it)",
                    b.weight
                )
            } else {
                format!(
                    "backend {addr} of vip {name}: undrained (weight {} again)",
                    b.weight
                )
            })
        }
        Request::VipList
        | Request::BackendList { .. }
        | Request::ModelShow { .. }
        | Request::Stats
        | Request::Status
        | Request::RunningConfig
        | Request::NodeDrain { .. }
        | Request::NodeUndrain
        | Request::ConnList { .. }
        | Request::Lookup { .. }
        | Request::DryRun { .. }
        | Request::ConfigDiff { .. } => {
            bail!("internal error: {req:?} is not a change")
        }
    }
}

/// Writes the configuration to `path` atomically: a temporary file in the same directory
/// (same owner and mode as the file it replaces), fsync, rename over the file, fsync of the
/// directory. A symlink is followed, so the file it points to is the one replaced. Returns the
/// text written.
pub fn persist(path: &Path, cfg: &Config) -> Result<String> {
    let text = cfg.to_toml()?;
    let target = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = target
        .file_name()
        .ok_or_else(|| anyhow!("config file {}: not a file path", path.display()))?
        .to_string_lossy()
        .into_owned();
    let tmp = dir.join(format!(".{file_name}.lbd-{}.tmp", std::process::id()));
    let old = fs::metadata(&target).ok();
    let mode = old
        .as_ref()
        .map_or(0o644, |m| m.permissions().mode() & 0o7777);
    let write = || -> std::io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        if let Some(m) = &old {
            std::os::unix::fs::fchown(&f, Some(m.uid()), Some(m.gid()))?;
        }
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, &target)?;
        fs::File::open(&dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        anyhow!(
            "config file {}: cannot write it ({e}); check that lbd may write to {}",
            target.display(),
            dir.display()
        )
    })?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn undrain(text: &str, address: &str) -> String {
        let mut cfg = Config::parse(text).unwrap();
        let vip = "10.0.0.100:8080/tcp".to_string();
        for req in [
            Request::BackendDrain {
                vip: vip.clone(),
                address: address.into(),
                force: false,
            },
            Request::BackendUndrain {
                vip,
                address: address.into(),
            },
        ] {
            let msg = edit(&mut cfg, &req).unwrap();
            if matches!(req, Request::BackendUndrain { .. }) {
                return msg;
            }
        }
        unreachable!()
    }

    /// With learning on, undrain says the model ramps the weight back; without it (or for a
    /// pinned backend) the weight is back at once.
    #[test]
    fn undrain_says_what_will_happen() {
        let vip = |learning: &str| {
            format!(
                "interface = \"eth0\"\n[encap]\nsource_v4 = \"10.0.0.2\"\n[[vip]]\naddress = \"10.0.0.100\"\nport = 8080\nprotocol = \"tcp\"\n[vip.health]\nkind = \"http\"\n{learning}[[vip.backend]]\naddress = \"10.0.0.11\"\nweight = 2\npinned = true\n[[vip.backend]]\naddress = \"10.0.0.12\"\nweight = 2\n[[vip.backend]]\naddress = \"10.0.0.13\"\n"
            )
        };
        let learning = vip("[vip.learning]\nenabled = true\n");
        let msg = undrain(&learning, "10.0.0.12");
        assert!(
            msg.contains("undrained; the learning model ramps it back to weight 2"),
            "{msg}"
        );
        assert!(!msg.contains("again"), "{msg}");
        let msg = undrain(&learning, "10.0.0.11");
        assert!(msg.ends_with("undrained (weight 2 again)"), "pinned: {msg}");
        let msg = undrain(&vip(""), "10.0.0.12");
        assert!(
            msg.ends_with("undrained (weight 2 again)"),
            "no learning: {msg}"
        );
    }
}
