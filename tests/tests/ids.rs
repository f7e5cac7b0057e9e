//! Backend and VIP ids across restarts (issue 19), at the level of `Balancer` with pinned
//! maps: no namespace, nothing attached. Pinned connection-table entries outlive the backends
//! they name, and the established path only checks that a tracked id is live, so an id must
//! not be handed out again soon after its backend left, restart or not; a restart must not
//! keep backend entries of a VIP that was never published; a new VIP's statistics start at 0,
//! and a VIP's totals keep the traffic of the backends it removed.
//!
//! Run as root: `cargo test -p tests --test ids`.
use aya::maps::{Array, Map, MapData, PerCpuArray};
use lb_common::{
    maps, AgentState, BackendInfo, BackendStats, CtValue, FlowKey, VipStats, AGENT_F_VIP_RETIRED,
    BACKEND_F_ACTIVE, FAMILY_V4, FAMILY_V6, PROTO_TCP,
};
use lb_userspace::{datapath::remove_pins, Balancer, Config, LoadOptions};
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
};
use tests::require_root;

const VIP1: &str = "10.240.100.1";
const VIP2: &str = "10.240.100.2";
const VIP3: &str = "10.240.100.3";

/// A pin directory of its own on /sys/fs/bpf, removed (maps and all) when dropped.
struct Pins(PathBuf);

impl Pins {
    fn new(label: &str) -> Pins {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = Path::new("/sys/fs/bpf").join(format!(
            "lb-ids-{label}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = remove_pins(&dir);
        Pins(dir)
    }

    fn load(&self) -> Balancer {
        Balancer::load(LoadOptions {
            pin_dir: Some(self.0.clone()),
            table_pool: 1 << 16,
            conntrack_size: 1024,
            conntrack_new_size: 1024,
        })
        .expect("loading the balancer with pins")
    }

    fn array<V: aya::Pod>(&self, name: &str) -> Array<MapData, V> {
        let data = MapData::from_pin(self.0.join(name)).expect("opening a pinned map");
        Array::try_from(Map::Array(data)).unwrap()
    }

    /// Writes `value` into every CPU's slot of entry `index` of the pinned per-CPU array
    /// `name`, as the datapath would have counted it.
    fn set_every_cpu<V: aya::Pod>(&self, name: &str, index: u32, value: V) {
        let data = MapData::from_pin(self.0.join(name)).expect("opening a pinned map");
        let mut map: PerCpuArray<MapData, V> =
            PerCpuArray::try_from(Map::PerCpuArray(data)).unwrap();
        let ncpu = aya::util::nr_cpus().unwrap();
        map.set(
            index,
            aya::maps::PerCpuValues::try_from(vec![value; ncpu]).unwrap(),
            0,
        )
        .unwrap();
    }

    fn backend(&self, id: u32) -> BackendInfo {
        self.array::<BackendInfo>(maps::BACKENDS)
            .get(&id, 0)
            .unwrap()
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = remove_pins(&self.0);
    }
}

/// `vips`: (VIP address, backend last octets) on port 80/tcp, ipip.
fn config(vips: &[(&str, &[u8])]) -> Config {
    let mut t = String::from(
        "interface = \"eth0\"\ntable_pool = 65536\n[encap]\nsource_v4 = \"10.240.0.2\"\n",
    );
    for (vip, backends) in vips {
        t.push_str(&format!(
            "[[vip]]\naddress = \"{vip}\"\nport = 80\nprotocol = \"tcp\"\ntable_size = 251\n"
        ));
        for b in *backends {
            t.push_str(&format!(
                "[[vip.backend]]\naddress = \"10.240.0.{b}\"\nweight = 1\n"
            ));
        }
    }
    Config::parse(&t).unwrap_or_else(|e| panic!("test config: {e}\n{t}"))
}

fn vip_id(lb: &Balancer, vip: &str) -> u32 {
    let a: IpAddr = vip.parse().unwrap();
    lb.vips()
        .find(|v| v.config.address == a)
        .unwrap_or_else(|| panic!("no VIP {vip}"))
        .vip_id
}

fn backend_id(lb: &Balancer, vip: &str, n: u8) -> u32 {
    let a: IpAddr = vip.parse().unwrap();
    let b: IpAddr = format!("10.240.0.{n}").parse().unwrap();
    lb.vips()
        .find(|v| v.config.address == a)
        .and_then(|v| v.backends.iter().find(|x| x.address == b))
        .unwrap_or_else(|| panic!("no backend {b} on {vip}"))
        .id
}

/// A backend removed just before a restart: its id must not be the next one handed out, to
/// this VIP or another (flows pinned to it would go to the newcomer).
#[test]
fn backend_ids_of_removed_backends_are_not_reused_after_a_restart() {
    require_root();
    let pins = Pins::new("reuse");
    let lb = pins.load();
    let mut lb = lb;
    lb.apply(&config(&[(VIP1, &[11, 12, 13])])).unwrap();
    let gone = backend_id(&lb, VIP1, 13);
    lb.apply(&config(&[(VIP1, &[11, 12])])).unwrap();
    drop(lb);

    let mut lb = pins.load();
    assert!(lb.resumed());
    lb.apply(&config(&[(VIP1, &[11, 12]), (VIP2, &[21])]))
        .unwrap();
    let new = backend_id(&lb, VIP2, 21);
    assert_ne!(
        new, gone,
        "the restarted agent handed out id {gone} (10.240.0.13 of {VIP1}, removed before the restart) to {VIP2}'s new backend"
    );
    assert!(
        new > gone,
        "allocation goes on round-robin ({new} after {gone})"
    );
}

/// VIP ids go round-robin too (from the persisted cursor), and a removed VIP's statistics are
/// zeroed: a later VIP never starts with another VIP's counters.
#[test]
fn vip_ids_go_round_robin_and_removed_vip_stats_are_zeroed() {
    require_root();
    let pins = Pins::new("vipstats");
    let mut lb = pins.load();
    lb.apply(&config(&[(VIP1, &[11]), (VIP2, &[21])])).unwrap();
    let old = vip_id(&lb, VIP2);
    // Traffic the VIP saw (written as the datapath would).
    let busy = VipStats {
        packets: 7,
        bytes: 700,
        new_flows: 1,
        no_backend: 0,
    };
    pins.set_every_cpu(maps::VIP_STATS, old, busy);
    lb.apply(&config(&[(VIP1, &[11])])).unwrap();
    assert_eq!(
        lb.vip_stats(old).unwrap(),
        VipStats::default(),
        "VIP_STATS[{old}] must be zeroed when {VIP2} is removed"
    );
    drop(lb);
    let mut lb = pins.load();
    lb.apply(&config(&[(VIP1, &[11]), (VIP3, &[31])])).unwrap();
    let new = vip_id(&lb, VIP3);
    assert_ne!(
        new, old,
        "{VIP3} got the id {VIP2} had just before the restart"
    );
    assert_eq!(lb.vip_stats(new).unwrap(), VipStats::default());
}

/// A crash between writing a new VIP's backend entries and publishing its table leaves active
/// backend entries that no published VIP owns: the next start retires them.
#[test]
fn restore_retires_backends_of_a_vip_never_published() {
    require_root();
    let pins = Pins::new("orphan");
    let mut lb = pins.load();
    lb.apply(&config(&[(VIP1, &[11])])).unwrap();
    lb.on_table_write(|w| {
        if let Some(w) = w {
            if w.vip.starts_with(VIP2) {
                panic!("simulated crash before {} is published", w.vip);
            }
        }
    });
    let crashed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = lb.apply(&config(&[(VIP1, &[11]), (VIP2, &[21, 22])]));
    }));
    assert!(
        crashed.is_err(),
        "the hook stops apply before VIP2 is published"
    );
    let orphans: Vec<u32> = (1..lb_common::MAX_BACKENDS)
        .filter(|&id| {
            let b = pins.backend(id);
            b.flags & BACKEND_F_ACTIVE != 0 && b.addr[..4] != [10, 240, 0, 11]
        })
        .collect();
    assert_eq!(
        orphans.len(),
        2,
        "VIP2's backends were written: {orphans:?}"
    );
    drop(lb);

    let lb = pins.load();
    assert_eq!(
        lb.pin_report().restored_backends,
        1,
        "{:?}",
        lb.pin_report()
    );
    for id in &orphans {
        let b = pins.backend(*id);
        assert_eq!(
            b.flags & BACKEND_F_ACTIVE,
            0,
            "backend id {id} of the never-published VIP is still active after restore: {b:?}"
        );
    }
}

/// Pins of a build without `AGENT_STATE` are taken over whole (connection tables kept): the
/// map is created, and the cursors derived from the ids in use.
#[test]
fn pins_without_agent_state_are_taken_over() {
    require_root();
    let pins = Pins::new("old");
    let mut lb = pins.load();
    lb.apply(&config(&[(VIP1, &[11, 12])])).unwrap();
    drop(lb);
    std::fs::remove_file(pins.0.join(maps::AGENT_STATE)).unwrap();
    let mut lb = pins.load();
    let r = lb.pin_report().clone();
    assert!(r.resumed && r.agent_state_created, "{r:?}");
    assert!(r.missing.is_empty() && r.dropped.is_empty(), "{r:?}");
    assert_eq!(r.restored_backends, 2);
    assert!(
        pins.0.join(maps::AGENT_STATE).exists(),
        "created and pinned"
    );
    let b11 = backend_id(&lb, VIP1, 11);
    lb.apply(&config(&[(VIP1, &[11, 12, 13])])).unwrap();
    assert_eq!(backend_id(&lb, VIP1, 11), b11, "nothing moved");
    drop(lb);
    let lb = pins.load();
    assert!(!lb.pin_report().agent_state_created);
}

/// Writes every CPU's slot of backend `id`'s statistics, as the datapath would count them.
fn set_backend_stats(pins: &Pins, id: u32, packets: u64, bytes: u64) {
    let s = BackendStats {
        packets,
        bytes,
        ..Default::default()
    };
    pins.set_every_cpu(maps::BACKEND_STATS, id, s);
}

/// The datapath counts a packet once, on its backend; a VIP's packets and bytes are its
/// backends' plus its retired backends' (`VIP_RETIRED`). Removing a backend (whose id's
/// statistics are zeroed for the next owner) or restarting must not take anything off them.
#[test]
fn vip_totals_keep_a_removed_backends_traffic() {
    require_root();
    let pins = Pins::new("totals");
    let mut lb = pins.load();
    lb.apply(&config(&[(VIP1, &[11, 12]), (VIP2, &[21])]))
        .unwrap();
    let (vip, b11, b12) = (
        vip_id(&lb, VIP1),
        backend_id(&lb, VIP1, 11),
        backend_id(&lb, VIP1, 12),
    );
    let n = aya::util::nr_cpus().unwrap() as u64;
    set_backend_stats(&pins, b11, 5, 500);
    set_backend_stats(&pins, b12, 3, 300);
    set_backend_stats(&pins, backend_id(&lb, VIP2, 21), 100, 10_000);
    let totals = |lb: &Balancer| {
        let s = lb.vip_stats(vip).unwrap();
        (s.packets, s.bytes)
    };
    assert_eq!(
        totals(&lb),
        (8 * n, 800 * n),
        "the sum of the VIP's backends"
    );
    lb.apply(&config(&[(VIP1, &[11]), (VIP2, &[21])])).unwrap();
    assert_eq!(
        lb.backend_stats(b12).unwrap().packets,
        0,
        "the id's slot is zeroed"
    );
    assert_eq!(
        totals(&lb),
        (8 * n, 800 * n),
        "the removed backend's traffic stays"
    );
    set_backend_stats(&pins, b11, 6, 600);
    assert_eq!(totals(&lb), (9 * n, 900 * n));
    drop(lb);
    let lb = pins.load();
    assert!(lb.resumed());
    assert_eq!(totals(&lb), (9 * n, 900 * n), "after a restart");
    let mut lb = lb;
    lb.apply(&config(&[(VIP2, &[21])])).unwrap();
    lb.apply(&config(&[(VIP2, &[21]), (VIP3, &[31])])).unwrap();
    let v3 = vip_id(&lb, VIP3);
    assert_eq!(
        lb.vip_stats(vip).unwrap(),
        VipStats::default(),
        "removed VIP zeroed"
    );
    assert_eq!(
        lb.vip_stats(v3).unwrap(),
        VipStats::default(),
        "a new VIP starts at 0"
    );
}

/// Pins of a build whose program counted every packet on its VIP as well as on its backend
/// (no `VIP_RETIRED`, `AGENT_STATE` without `AGENT_F_VIP_RETIRED`): the map is created and
/// each VIP's retired share derived, so its totals go on from where that build left them.
#[test]
fn pins_that_counted_per_vip_are_taken_over_without_a_jump() {
    require_root();
    let pins = Pins::new("pervip");
    let mut lb = pins.load();
    lb.apply(&config(&[(VIP1, &[11, 12])])).unwrap();
    let vip = vip_id(&lb, VIP1);
    let n = aya::util::nr_cpus().unwrap() as u64;
    drop(lb);
    // The older program: 9 packets on the VIP, of which 5 and 1 on its current backends (the
    // rest on backends it retired before).
    let lb = pins.load();
    set_backend_stats(&pins, backend_id(&lb, VIP1, 11), 5, 500);
    set_backend_stats(&pins, backend_id(&lb, VIP1, 12), 1, 100);
    drop(lb);
    let counted = VipStats {
        packets: 9,
        bytes: 900,
        new_flows: 2,
        no_backend: 1,
    };
    pins.set_every_cpu(maps::VIP_STATS, vip, counted);
    let mut state = pins.array::<AgentState>(maps::AGENT_STATE);
    let s = state.get(&0, 0).unwrap();
    state.set(0, AgentState { flags: 0, ..s }, 0).unwrap();
    std::fs::remove_file(pins.0.join(maps::VIP_RETIRED)).unwrap();

    let lb = pins.load();
    let r = lb.pin_report().clone();
    assert!(
        r.resumed && r.missing.is_empty() && r.dropped.is_empty(),
        "{r:?}"
    );
    assert!(
        pins.0.join(maps::VIP_RETIRED).exists(),
        "created and pinned"
    );
    let want = VipStats {
        packets: 9 * n,
        bytes: 900 * n,
        new_flows: 2 * n,
        no_backend: n,
    };
    assert_eq!(
        lb.vip_stats(vip).unwrap(),
        want,
        "the totals the older build had"
    );
    let flags = pins
        .array::<AgentState>(maps::AGENT_STATE)
        .get(&0, 0)
        .unwrap()
        .flags;
    assert_ne!(flags & AGENT_F_VIP_RETIRED, 0, "derived once");
    drop(lb);
    // Derived once: the next start takes the pinned share as it is.
    let lb = pins.load();
    assert_eq!(lb.vip_stats(vip).unwrap(), want);
}

/// Pins of a build before `CT4` hold the established IPv4 flows in `CT`: taken over whole, the
/// new table is created and the IPv4 flows moved into it (the IPv6 ones stay), once.
#[test]
fn pins_before_ct4_have_their_ipv4_flows_moved() {
    require_root();
    let pins = Pins::new("ct4");
    let mut lb = pins.load();
    lb.apply(&config(&[(VIP1, &[11, 12])])).unwrap();
    let b11 = backend_id(&lb, VIP1, 11);
    drop(lb);
    let flow = |family: u8, n: u8| {
        let mut k = FlowKey {
            sport: 40_000u16.to_be(),
            dport: 80u16.to_be(),
            proto: PROTO_TCP,
            family,
            ..Default::default()
        };
        if family == FAMILY_V4 {
            k.src[..4].copy_from_slice(&[10, 9, 0, n]);
            k.dst[..4].copy_from_slice(&[10, 240, 100, 1]);
        } else {
            k.src = std::net::Ipv6Addr::new(0xfd09, 0, 0, 0, 0, 0, 0, n as u16).octets();
            k.dst = std::net::Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1).octets();
        }
        k
    };
    let value = CtValue {
        backend: b11,
        hash: 7,
        ..Default::default()
    };
    // What the older program left: both families in CT, and no CT4.
    let mut ct: aya::maps::HashMap<MapData, FlowKey, CtValue> = aya::maps::HashMap::try_from(
        Map::LruHashMap(MapData::from_pin(pins.0.join(maps::CT)).unwrap()),
    )
    .unwrap();
    let (v4a, v4b, v6) = (flow(FAMILY_V4, 1), flow(FAMILY_V4, 2), flow(FAMILY_V6, 3));
    for k in [v4a, v4b, v6] {
        ct.insert(k, value, 0).unwrap();
    }
    std::fs::remove_file(pins.0.join(maps::CT4)).unwrap();

    let lb = pins.load();
    let r = lb.pin_report().clone();
    assert!(r.resumed && r.ct4_created && r.missing.is_empty(), "{r:?}");
    assert_eq!(r.v4_flows_moved, 2, "{r:?}");
    for k in [v4a, v4b, v6] {
        assert_eq!(
            lb.conntrack_entries(&k).0,
            Some(value),
            "{k:?} is tracked where the program looks"
        );
    }
    let left: Vec<FlowKey> = ct.keys().collect::<Result<_, _>>().unwrap();
    assert_eq!(left, vec![v6], "CT keeps the IPv6 flow only");
    drop(lb);
    let lb = pins.load();
    let r = lb.pin_report();
    assert!(!r.ct4_created && r.v4_flows_moved == 0, "once: {r:?}");
    assert_eq!(lb.conntrack_entries(&v4a).0, Some(value));
}
