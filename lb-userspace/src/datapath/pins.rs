//! The pin directory on bpffs: which maps are kept across restarts, whether what is pinned
//! fits this build, and removing it all.
use super::LoadOptions;
use anyhow::{bail, Context as _, Result};
use aya::{maps::MapInfo, programs::links::PinnedLink};
use lb_common::{
    maps::{self, Capacity, MapSpec, Pin, Setting},
    COUNTER_SLOTS,
};
use std::path::{Path, PathBuf};

/// Name of the pinned XDP link inside the pin directory.
pub(super) const LINK_PIN: &str = "link";

/// The capacity this lbd gives a map of the registry: fixed by the build, or the setting.
pub(super) fn entries(spec: &MapSpec, o: &LoadOptions) -> u32 {
    match spec.capacity {
        Capacity::Fixed(n) => n,
        Capacity::Configured { setting, .. } => match setting {
            Setting::TablePool => o.table_pool,
            Setting::ConntrackSize => o.conntrack_size,
            Setting::ConntrackNewSize => o.conntrack_new_size,
        },
    }
}

/// The maps kept across restarts (every map of the registry), with the (key size, value size,
/// capacity) this build expects.
pub(super) fn pinned_maps(
    o: &LoadOptions,
) -> impl Iterator<Item = (&'static str, usize, usize, u32)> + '_ {
    maps::pinned().map(move |s| {
        (
            s.name,
            s.key_size as usize,
            s.value_size as usize,
            entries(s, o),
        )
    })
}

/// A pinned map an older build did not have (`Pin::Optional` in the registry): a pin set
/// without it is still complete, the map is created and pinned. `AGENT_STATE` (the agent's id
/// cursors: derived from the maps as that build did) and `VIP_RETIRED` (the retired backends'
/// share of each VIP's totals: derived from the older program's per-VIP counters).
pub(super) fn optional_pin(name: &str) -> bool {
    maps::spec(name).is_some_and(|s| s.pin == Pin::Optional)
}

pub(super) const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

pub(super) fn is_bpffs(p: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs fills the zeroed struct; `c` is a valid path string.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

/// What [`ensure_pin_dir`] would refuse, without creating or mounting anything (`lbd
/// --check`): a pin_dir whose parent is not on bpffs, unless it is /sys/fs/bpf, which lbd
/// mounts itself.
pub fn check_pin_dir(dir: &Path) -> Result<()> {
    let parent = dir.parent().unwrap_or(Path::new("/"));
    if !is_bpffs(parent) && parent != Path::new("/sys/fs/bpf") {
        bail!(
            "pin_dir: {} is not on a bpffs mount; mount one (`mount -t bpf bpf {}`) or use the default {}",
            dir.display(),
            parent.display(),
            crate::config::DEFAULT_PIN_DIR
        );
    }
    Ok(())
}

/// Makes sure `dir` exists on a bpffs mount; mounts bpffs on /sys/fs/bpf if that is where it
/// should be and nothing is mounted there yet (fresh machines, private mount namespaces).
pub(super) fn ensure_pin_dir(dir: &Path) -> Result<()> {
    let parent = dir.parent().unwrap_or(Path::new("/"));
    if !is_bpffs(parent) {
        let sysfs_bpf = Path::new("/sys/fs/bpf");
        if parent == sysfs_bpf {
            let src = std::ffi::CString::new("bpf").unwrap();
            let target = std::ffi::CString::new("/sys/fs/bpf").unwrap();
            // SAFETY: plain mount(2) call with valid NUL-terminated strings.
            let rc = unsafe {
                libc::mount(
                    src.as_ptr(),
                    target.as_ptr(),
                    src.as_ptr(),
                    0,
                    std::ptr::null(),
                )
            };
            if rc != 0 {
                bail!(
                    "pin_dir: /sys/fs/bpf is not a bpffs mount and mounting one failed ({}); run `mount -t bpf bpf /sys/fs/bpf`",
                    std::io::Error::last_os_error()
                );
            }
        } else {
            check_pin_dir(dir)?;
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating pin_dir {}", dir.display()))
}

/// Refuses pinned maps this build cannot use (another layout or other sizes). One exception:
/// a `COUNTERS` map of another capacity (an older build had one slot per counter) is only
/// statistics, so it is not a reason to drop the connection tables: its capacity is returned
/// and the caller replaces that map alone.
pub(super) fn check_pins(dir: &Path, o: &LoadOptions) -> Result<Option<u32>> {
    let mut counters = None;
    for (name, k, v, n) in pinned_maps(o) {
        let path = dir.join(name);
        if optional_pin(name) && !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path).with_context(|| {
            format!(
                "reading pinned map {}; remove stale pins with `lbd cleanup`",
                path.display()
            )
        })?;
        let (pk, pv, pn) = (
            info.key_size() as usize,
            info.value_size() as usize,
            info.max_entries(),
        );
        if name == maps::COUNTERS && (pk, pv) == (k, v) && pn != n {
            counters = Some(pn);
            continue;
        }
        if (pk, pv, pn) != (k, v, n) {
            bail!("{}", pin_mismatch(&path, (pk, pv, pn), (k, v, n)));
        }
    }
    Ok(counters)
}

/// Why a pinned map cannot be taken over, and what to do: `pinned` and `needed` are (key size,
/// value size, entries). Other key or value sizes mean another build's map layout (an upgrade
/// that changed a map's value, e.g. the connection tables' values), which no setting brings
/// back; other entries alone may also be other settings. Either way `lbd cleanup` is the way
/// out.
pub(super) fn pin_mismatch(
    path: &Path,
    (pk, pv, pn): (usize, usize, u32),
    (k, v, n): (usize, usize, u32),
) -> String {
    let what = format!(
        "pinned map {} has key/value size {pk}/{pv} and {pn} entries, this lbd needs {k}/{v} and {n}",
        path.display()
    );
    if (pk, pv) != (k, v) {
        format!(
            "{what}: the pins come from another build with another map layout. \
             Run `lbd cleanup` (drops established flows) and start again"
        )
    } else {
        format!(
            "{what}: the pins come from another build or other map sizes (conntrack_size, conntrack_new_size, table_pool). \
             Restart with the old settings, or run `lbd cleanup` (drops established flows) and start again"
        )
    }
}

/// What [`Balancer::load`] found in the pin directory and what it did about it, for lbd's
/// journal (`lbctl status`): an operator should learn from lbd, not from a packet capture, that
/// the connection tables were lost or that the counters restarted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PinReport {
    /// The pin directory (`None`: pinning is off).
    pub dir: Option<PathBuf>,
    /// Map pins that were there.
    pub found: Vec<String>,
    /// Map pins this build uses that were not there.
    pub missing: Vec<String>,
    /// Map pins removed because they could not be taken over: the rest of an incomplete set.
    pub dropped: Vec<String>,
    /// A pinned XDP link was there: the new program is swapped into it (no detach).
    pub link: bool,
    /// The maps were taken over (every one was there and fits).
    pub resumed: bool,
    /// With `resumed`: VIPs and backends rebuilt from the maps.
    pub restored_vips: usize,
    pub restored_backends: usize,
    /// The pinned `COUNTERS` had this many slots (an older build) and was replaced by a
    /// fresh one: the datapath counters restart from zero, nothing else is lost.
    pub counters_replaced: Option<u32>,
    /// The pins came from a build without `AGENT_STATE` (the id cursors): it was created, and
    /// the cursors derived from the ids in use (ids of backends removed just before this start
    /// may be handed out again first, as that build did).
    pub agent_state_created: bool,
    /// The pins came from a build without `CT4`: it was created, and the IPv4 flows that build
    /// kept in `CT` are moved into it (at load, and again once the new program is attached).
    pub ct4_created: bool,
    /// IPv4 flows moved from `CT` to `CT4` so far.
    pub v4_flows_moved: u64,
}

/// Looks at the pin directory before loading: which pins are there, whether they can be taken
/// over, and removes those that cannot. A pin set is taken over whole or not at all: a partial
/// set (some map pins removed by hand, or a crash of `lbd cleanup`) cannot be restored
/// consistently (a VIP entry without its table, tables without the port filter), and aya would
/// reuse whatever is pinned without checking it, so the rest is unpinned and every map starts
/// fresh. The pinned link is never removed here: the old program keeps forwarding until the new
/// one is swapped in.
pub(super) fn survey_pins(dir: &Path, o: &LoadOptions) -> Result<PinReport> {
    let mut r = PinReport {
        dir: Some(dir.to_path_buf()),
        link: dir.join(LINK_PIN).exists(),
        ..PinReport::default()
    };
    let mut optional_missing: Vec<&str> = Vec::new();
    for (name, ..) in pinned_maps(o) {
        if dir.join(name).exists() {
            r.found.push(name.to_string());
        } else if optional_pin(name) {
            optional_missing.push(name);
        } else {
            r.missing.push(name.to_string());
        }
    }
    if r.found.is_empty() {
        r.missing
            .extend(optional_missing.iter().map(|n| n.to_string()));
        return Ok(r);
    }
    if !r.missing.is_empty() {
        for name in &r.found {
            let path = dir.join(name);
            std::fs::remove_file(&path).with_context(|| {
                format!(
                    "removing {} (pins {} are missing, so the rest cannot be taken over)",
                    path.display(),
                    r.missing.join(", ")
                )
            })?;
        }
        r.dropped = r.found.clone();
        tracing::warn!(
            dir = %dir.display(),
            missing = %r.missing.join(","),
            dropped = %r.dropped.join(","),
            "incomplete pin set: removed the rest and creating fresh maps (tracked connections are forgotten)"
        );
        return Ok(r);
    }
    if let Some(slots) = check_pins(dir, o)? {
        let path = dir.join(maps::COUNTERS);
        std::fs::remove_file(&path)
            .with_context(|| format!("replacing {} (another build's layout)", path.display()))?;
        tracing::warn!(
            pinned_slots = slots,
            slots = COUNTER_SLOTS,
            "the pinned COUNTERS map comes from another build: replaced, datapath counters restart from zero (connection tables kept)"
        );
        r.counters_replaced = Some(slots);
    }
    if !optional_missing.is_empty() {
        tracing::info!(
            "the pins come from a build without {}: creating them (derived from the other maps)",
            optional_missing.join(", ")
        );
        r.agent_state_created = optional_missing.contains(&maps::AGENT_STATE);
        r.ct4_created = optional_missing.contains(&maps::CT4);
    }
    r.resumed = true;
    Ok(r)
}

/// Removes everything lbd pinned in `dir`: detaches the program (the link goes with its last
/// reference) and drops every map, established flows included.
pub fn remove_pins(dir: &Path) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let link = dir.join(LINK_PIN);
    if link.exists() {
        let pinned = PinnedLink::from_pin(&link).context("opening the pinned link")?;
        drop(pinned.unpin().context("unpinning the link")?);
        removed.push(LINK_PIN.to_string());
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            std::fs::remove_file(e.path())
                .with_context(|| format!("removing {}", e.path().display()))?;
            removed.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    if dir.exists() {
        std::fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::{CtValue, FlowKey};
    use std::mem::size_of;

    #[test]
    fn pin_mismatch_names_cleanup() {
        let ct = Path::new("/sys/fs/bpf/lb/CT");
        let kv = (size_of::<FlowKey>(), size_of::<CtValue>());
        // The connection tables' values before they carried the SYN's sequence number.
        let old = pin_mismatch(ct, (kv.0, 8, 262_144), (kv.0, kv.1, 262_144));
        assert_eq!(
            old,
            format!(
                "pinned map /sys/fs/bpf/lb/CT has key/value size {}/8 and 262144 entries, this lbd needs {}/{} and 262144: \
                 the pins come from another build with another map layout. \
                 Run `lbd cleanup` (drops established flows) and start again",
                kv.0, kv.0, kv.1
            )
        );
        let sizes = pin_mismatch(ct, (kv.0, kv.1, 4096), (kv.0, kv.1, 8192));
        assert!(sizes.contains("other map sizes (conntrack_size"), "{sizes}");
        assert!(sizes.contains("Restart with the old settings"), "{sizes}");
        for m in [old, sizes] {
            assert!(m.contains("run `lbd cleanup`") || m.contains("Run `lbd cleanup`"));
        }
    }
}
