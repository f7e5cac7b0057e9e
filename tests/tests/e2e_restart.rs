//! Hitless restart and upgrade: with maps and the XDP link pinned in bpffs, stopping lbd
//! leaves the datapath running, and a new lbd takes the pinned maps (connection tables
//! included) over and swaps its program into the pinned link atomically. Long-lived
//! connections must see zero resets throughout, and counters keep counting.
use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Duration,
};
use tests::{
    lab::{Lab, LabSpec, LB_V4, LB_V6, VIP_V4},
    procs::{
        bin_path, lbd_cleanup, signal, start_decaps, wait_for, wait_neighbours, xdp_attached, Lbd,
        LbdOptions,
    },
    require_root,
    tcp::{client_many, tally, LongLived, TcpServer},
};

const LONG_LIVED: usize = 120;

fn is_bpffs(p: &Path) -> bool {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: statfs on a valid path into a zeroed struct.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == 0xcafe_4a11
    }
}

/// Starts `bin` (lbd or a copy of it) inside the lab's balancer namespace with `nsenter --net`
/// (unlike `ip netns exec` it keeps the root mount namespace, so pins land in the host's
/// /sys/fs/bpf and outlive lbd) and waits until it serves with its program attached.
fn start_lbd(lab: &Lab, bin: &Path, config: &Path, start: usize) -> Lbd {
    let dir = config.parent().unwrap();
    let opts = LbdOptions {
        bin: Some(bin.to_path_buf()),
        nsenter: true,
        log: Some(dir.join(format!("lbd-{start}.log"))),
        ..LbdOptions::default()
    };
    let lbd = Lbd::spawn(lab.lb().ns(), config, dir.join("lbd.sock"), &opts);
    lbd.wait_ready();
    lbd
}

/// SIGTERM; lbd must exit 0.
fn stop(lbd: &mut Lbd) {
    let s = lbd.stop();
    assert!(s.success(), "lbd exited with {s}:\n{}", lbd.log());
}

/// Packets the datapath forwarded, from the pinned per-backend statistics (it counts a packet
/// once, on its backend).
fn forwarded_packets(pin_dir: &Path) -> u64 {
    use aya::maps::{Map, MapData, PerCpuArray};
    let data = MapData::from_pin(pin_dir.join(lb_common::maps::BACKEND_STATS))
        .expect("opening the pinned BACKEND_STATS");
    let stats: PerCpuArray<MapData, lb_common::BackendStats> =
        PerCpuArray::try_from(Map::PerCpuArray(data)).unwrap();
    (1..lb_common::MAX_BACKENDS)
        .map(|id| {
            stats
                .get(&id, 0)
                .map_or(0, |v| v.iter().map(|s| s.packets).sum::<u64>())
        })
        .sum()
}

/// Removes a pin directory (maps and link) when dropped, on success, failure or panic.
struct PinsOnDrop(std::path::PathBuf);

impl Drop for PinsOnDrop {
    fn drop(&mut self) {
        let _ = lb_userspace::datapath::remove_pins(&self.0);
    }
}

#[test]
fn restart_and_upgrade_keep_established_flows() {
    require_root();
    let bpffs = Path::new("/sys/fs/bpf");
    assert!(
        is_bpffs(bpffs),
        "/sys/fs/bpf is not a bpffs mount: run `cargo xtask setup` (it mounts it)"
    );
    let lbd = bin_path("lbd");
    let lab = Lab::new(LabSpec { backends: 3 }).expect("building the lab");
    let pin_dir = bpffs.join(format!("{}-pins", lab.prefix()));
    // Removed whatever happens: a failed assertion must not leave the pinned maps behind.
    let _pins = PinsOnDrop(pin_dir.clone());
    let vip = SocketAddr::new(IpAddr::from(VIP_V4), 80);
    let _servers: Vec<TcpServer> = (0..3)
        .map(|i| TcpServer::start(lab.backend(i).ns(), &[vip], &format!("backend{i}")).unwrap())
        .collect();
    let decaps = start_decaps(&lab, 3);
    let dir = std::env::temp_dir().join(format!("{}-restart", lab.prefix()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("lbd.toml");
    let mut text = format!(
        "interface = \"eth0\"\nxdp_mode = \"native\"\npin_dir = \"{}\"\ncontrol_socket = \"{}\"\n[encap]\nsource_v4 = \"{LB_V4}\"\nsource_v6 = \"{LB_V6}\"\n\
         [[vip]]\naddress = \"{VIP_V4}\"\nport = 80\nprotocol = \"tcp\"\n",
        pin_dir.display(),
        dir.join("lbd.sock").display()
    );
    for i in 0..3 {
        text.push_str(&format!(
            "[[vip.backend]]\naddress = \"{}\"\nweight = 1\n",
            lab.backend(i).v4()
        ));
    }
    std::fs::write(&config, text).unwrap();

    let mut agent = start_lbd(&lab, &lbd, &config, 1);
    assert!(xdp_attached(lab.lb().ns()) && pin_dir.join("link").exists());
    let backends: Vec<IpAddr> = (0..3).map(|i| lab.backend(i).v4().into()).collect();
    wait_neighbours(lab.lb().ns(), &backends);
    let mut long = LongLived::open(lab.client().ns(), vip, LONG_LIVED, Duration::from_secs(3))
        .expect("opening connections");
    long.check_all().expect("long-lived connections work");
    println!("long-lived per backend: {:?}", long.backend_counts());

    // 1. Stop: the datapath keeps running without lbd.
    stop(&mut agent);
    assert!(
        xdp_attached(lab.lb().ns()),
        "stopping lbd detached the pinned program"
    );
    long.check_all()
        .expect("established flows while lbd is stopped");
    let down = client_many(lab.client().ns(), vip, 200, Duration::from_secs(3));
    assert!(
        down.iter().all(|r| r.is_ok()),
        "new connections failed while lbd was stopped"
    );
    let before = forwarded_packets(&pin_dir);

    // 2. Start again: the pinned maps and link are taken over; nothing moves.
    let mut agent = start_lbd(&lab, &lbd, &config, 2);
    assert!(agent.try_wait().is_none(), "lbd exited on restart");
    long.check_all().expect("zero resets across the restart");
    let after = forwarded_packets(&pin_dir);
    assert!(
        after > before,
        "counters must keep counting across the restart ({before} -> {after})"
    );

    // 3. Upgrade: a freshly built lbd (a copy of the binary, as a package upgrade would install)
    //    loads its program and swaps it into the pinned link while traffic flows.
    let upgraded = dir.join("lbd-upgraded");
    std::fs::copy(&lbd, &upgraded).unwrap();
    let prog_before = lab
        .lb()
        .ns()
        .ip(["-d", "link", "show", "dev", "eth0"])
        .unwrap();
    stop(&mut agent);
    let mut agent = start_lbd(&lab, &upgraded, &config, 3);
    let prog_after = lab
        .lb()
        .ns()
        .ip(["-d", "link", "show", "dev", "eth0"])
        .unwrap();
    let id = |s: &str| {
        s.split("prog/xdp id ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .map(str::to_string)
    };
    assert_ne!(
        id(&prog_before),
        id(&prog_after),
        "the upgrade must swap in a new program ({prog_after})"
    );
    let statuses = long.check();
    let broken: Vec<_> = statuses.iter().filter(|s| !s.is_ok()).collect();
    assert!(
        broken.is_empty(),
        "{} of {LONG_LIVED} connections broke across the upgrade: {:?}",
        broken.len(),
        broken.first()
    );
    let results = client_many(lab.client().ns(), vip, 300, Duration::from_secs(3));
    assert!(
        results.iter().all(|r| r.is_ok()),
        "new connections after the upgrade failed"
    );
    println!(
        "after the upgrade: {:?}; {LONG_LIVED} long-lived connections, zero resets",
        tally(&results)
    );

    // 4. The explicit command takes everything down.
    stop(&mut agent);
    lbd_cleanup(lab.lb().ns(), &config);
    wait_for(
        "the program to be detached",
        Duration::from_secs(20),
        || !xdp_attached(lab.lb().ns()),
    );
    assert!(
        !pin_dir.exists(),
        "pins left behind in {}",
        pin_dir.display()
    );
    for d in &decaps {
        signal(d, libc::SIGTERM);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
