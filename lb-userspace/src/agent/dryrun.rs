//! `lbctl ... --dry-run` and `lbd --check --diff`: what a change would do to the Maglev tables
//! (slots each backend gains or loses, the share of new flows that would move), computed on a
//! copy of the configuration with the same edit, refusals and weights (health, learning) as the
//! real change. Nothing is applied, written or journaled.
use super::edit::edit;
use super::{
    effective, refuse_leaving_no_serving_backend, refuse_new_host_problems, sync_health,
    sync_learning, Agent, Newcomers, State,
};
use crate::config::Config;
use crate::control::{BackendSlots, DryRun, Request, Response, VipDiff, VipName};
use crate::datapath::{addr_bytes, tables};
use anyhow::{anyhow, bail, Result};
use lb_common::maglev;
use std::collections::BTreeMap;
use std::net::IpAddr;

impl Agent {
    /// `--dry-run`: the change's checks and table effect, nothing changed.
    pub(super) async fn dry_run(&self, req: Request) -> Result<Response> {
        if !req.is_mutation() || matches!(req, Request::DryRun { .. }) {
            bail!(
                "--dry-run: `{}` changes nothing; --dry-run goes with vip add/remove and backend add/remove/set-weight/drain/undrain",
                req.as_lbctl()
            );
        }
        let st = self.state.lock().await;
        let prev = st.config.clone();
        let mut next = prev.clone();
        let message = edit(&mut next, &req)?;
        if next == prev {
            return Ok(Response::ok(DryRun {
                message: format!("{message} (already so: nothing would change)"),
                changed: false,
                vips: Vec::new(),
            }));
        }
        next.validate()?;
        refuse_new_host_problems(&prev, &next)?;
        if !req.forced() {
            refuse_leaving_no_serving_backend(&prev, &next, &st.health, &st.learned)?;
        }
        Ok(Response::ok(DryRun {
            message: format!("dry run, nothing changed: {message}"),
            changed: true,
            vips: diff_tables(&st, &next)?,
        }))
    }

    /// `lbd --check --diff`: what a reload with `text` would do to the tables.
    pub(super) async fn config_diff(&self, text: &str) -> Result<Response> {
        let next = Config::parse(text).map_err(|e| anyhow!("{e}"))?;
        let st = self.state.lock().await;
        let changed = next != st.config;
        Ok(Response::ok(DryRun {
            message: if changed {
                "the file differs from the running configuration; nothing changed".into()
            } else {
                "the file is the running configuration".into()
            },
            changed,
            vips: diff_tables(&st, &next)?,
        }))
    }
}

/// Slots per backend address in a table of backend ids.
fn slots_by_address(table: &[u32], ids: &BTreeMap<u32, IpAddr>) -> BTreeMap<IpAddr, u64> {
    let mut out = BTreeMap::new();
    for id in table {
        if let Some(a) = ids.get(id) {
            *out.entry(*a).or_default() += 1;
        }
    }
    out
}

/// Every VIP whose table `next` would change, with the weights the real change would use.
fn diff_tables(st: &State, next: &Config) -> Result<Vec<VipDiff>> {
    let health = sync_health(&st.health, next, Newcomers::Added);
    let (_, learned) = sync_learning(&st.learning, &st.learned, next);
    let eff = effective(next, &health, &learned);
    let mut out = Vec::new();
    // Ids for backends the datapath does not have yet: from the top, never a real one.
    let mut placeholder = u32::MAX;
    for v in &eff.vips {
        let name = VipName::of(v);
        let cur = st.lb.vips().find(|s| VipName::of(&s.config) == name);
        let mut ids: BTreeMap<u32, IpAddr> = BTreeMap::new();
        let mut mg = Vec::with_capacity(v.backends.len());
        for b in &v.backends {
            let id = cur
                .and_then(|c| c.backends.iter().find(|x| x.address == b.address))
                .map(|x| x.id)
                .unwrap_or_else(|| {
                    placeholder -= 1;
                    placeholder
                });
            ids.insert(id, b.address);
            let (addr, family) = addr_bytes(b.address);
            mg.push(maglev::Backend {
                addr,
                family,
                id,
                weight: b.effective_weight(),
            });
        }
        let table = tables::build(&mg, v.table_size)
            .map_err(|e| anyhow!("vip {name}: building the Maglev table: {e}"))?;
        let (old, change): (&[u32], &str) = match cur {
            Some(c) => (&c.table, "changed"),
            None => (&[], "added"),
        };
        if let Some(c) = cur {
            for b in &c.backends {
                ids.entry(b.id).or_insert(b.address);
            }
        }
        let moved = if old.len() == table.len() {
            maglev::slots_changed(old, &table) as u64
        } else {
            table.len() as u64
        };
        if moved == 0 {
            continue;
        }
        out.push(vip_diff(
            &name,
            change,
            v.table_size,
            moved,
            old,
            &table,
            &ids,
        ));
    }
    for c in st.lb.vips() {
        let name = VipName::of(&c.config);
        if eff.vips.iter().any(|v| VipName::of(v) == name) {
            continue;
        }
        let ids = c.backends.iter().map(|b| (b.id, b.address)).collect();
        let size = c.table.len() as u64;
        out.push(vip_diff(
            &name,
            "removed",
            c.config.table_size,
            size,
            &c.table,
            &[],
            &ids,
        ));
    }
    Ok(out)
}

fn vip_diff(
    name: &VipName,
    change: &str,
    table_size: u32,
    moved: u64,
    old: &[u32],
    new: &[u32],
    ids: &BTreeMap<u32, IpAddr>,
) -> VipDiff {
    let before = slots_by_address(old, ids);
    let after = slots_by_address(new, ids);
    let mut addrs: Vec<IpAddr> = before.keys().chain(after.keys()).copied().collect();
    addrs.sort();
    addrs.dedup();
    VipDiff {
        vip: name.to_string(),
        change: change.into(),
        table_size,
        slots_moved: moved,
        share_moved: moved as f64 / f64::from(table_size.max(1)),
        backends: addrs
            .into_iter()
            .map(|a| {
                let (b, n) = (
                    before.get(&a).copied().unwrap_or(0),
                    after.get(&a).copied().unwrap_or(0),
                );
                BackendSlots {
                    address: a,
                    slots_before: b,
                    slots_after: n,
                    slots_gained: n as i64 - b as i64,
                }
            })
            .collect(),
    }
}
