//! Flood-safe connection tracking: a flood of SYNs and of ACKs from random sources, many times
//! the size of the connection table, while a backend is added, must not move or reset
//! established flows, and legitimate new connections must succeed during and after it. A SYN
//! makes no entry (or, for 10 s after a table change, one in the small new-flow table); an
//! ACK without a SYN lands in the new-flow table; the established table is only written for a
//! flow's second packet (the handshake's ACK of a SYN in the SYN cache, or a promotion).
use lb_pkt as pkt;
use lb_userspace::{config::XdpMode, netif, Balancer, Config, Decap, LoadOptions};
use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};
use tests::{
    flood::{self as spoof, SpoofedSyns},
    lab::{Lab, LabSpec, LB_V4, LB_V6, VIP_V4, VIP_V6},
    procs::{backend_addrs, wait_neighbours},
    require_root,
    tcp::{client_many, LongLived, TcpServer},
};

/// Capacity of the established-flow table (C).
const CT_SIZE: u32 = 8192;
const CT_NEW_SIZE: u32 = 2048;
const ESTABLISHED: usize = 500;
const FLOOD_FACTOR: u64 = 10;

fn config(lab: &Lab, backends: usize) -> Config {
    let mut text = format!(
        "interface = \"eth0\"\nxdp_mode = \"native\"\npin_dir = \"\"\nconntrack_size = {CT_SIZE}\n\
         conntrack_new_size = {CT_NEW_SIZE}\n[encap]\nsource_v4 = \"{LB_V4}\"\nsource_v6 = \"{LB_V6}\"\n\
         [[vip]]\naddress = \"{VIP_V4}\"\nport = 80\nprotocol = \"tcp\"\n"
    );
    for i in 0..backends {
        text.push_str(&format!(
            "[[vip.backend]]\naddress = \"{}\"\nweight = 1\n",
            lab.backend(i).v4()
        ));
    }
    Config::parse(&text).unwrap()
}

/// Sends `count` spoofed packets, SYNs and ACKs at random (the generator's tuples, an ACK when
/// the sequence number is odd), through a raw socket from the calling thread's namespace.
/// Returns (sent, of which ACKs).
fn flood(count: u64, syns: &mut SpoofedSyns) -> std::io::Result<(u64, u64)> {
    // SAFETY: plain socket(2); the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let dst = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(VIP_V4).to_be(),
        },
        sin_zero: [0; 8],
    };
    let (mut sent, mut acks) = (0, 0);
    for _ in 0..count {
        let (src, sport, seq) = syns.next_tuple();
        let ack = seq & 1 == 1;
        let p = if ack {
            spoof::segment(src, sport, seq, pkt::TCP_ACK)
        } else {
            spoof::syn(src, sport, seq)
        };
        // SAFETY: valid buffer and address for the duration of the call.
        let n = unsafe {
            libc::sendto(
                fd,
                p.as_ptr().cast(),
                p.len(),
                0,
                (&dst as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        };
        if n == p.len() as isize {
            sent += 1;
            acks += ack as u64;
        }
    }
    // SAFETY: closing the socket opened above.
    unsafe { libc::close(fd) };
    Ok((sent, acks))
}

#[test]
fn syn_flood_does_not_evict_established_flows() {
    require_root();
    let lab = Lab::new(LabSpec { backends: 4 }).expect("building the lab");
    let vip = SocketAddr::new(IpAddr::from(VIP_V4), 80);
    let _servers: Vec<TcpServer> = (0..4)
        .map(|i| TcpServer::start(lab.backend(i).ns(), &[vip], &format!("backend{i}")).unwrap())
        .collect();
    let _decaps: Vec<Decap> = (0..4)
        .map(|i| {
            lab.backend(i).ns().run_in(|| {
                let mut d = Decap::load().unwrap();
                d.add_vip(VIP_V4.into()).unwrap();
                d.add_vip(VIP_V6.into()).unwrap();
                for a in netif::interface_addrs("eth0").unwrap() {
                    d.add_local(a).unwrap();
                }
                d.attach("eth0", XdpMode::Native).unwrap();
                d
            })
        })
        .collect();
    let cfg = config(&lab, 3);
    let mut lb = lab.lb().ns().run_in(|| {
        let mut lb = Balancer::load(LoadOptions::from(&cfg)).unwrap();
        lb.apply(&cfg).unwrap();
        lb.attach("eth0", XdpMode::Native).unwrap();
        lb.apply(&cfg).unwrap();
        lb
    });
    wait_neighbours(lab.lb().ns(), &backend_addrs(&cfg));

    let mut long = LongLived::open(lab.client().ns(), vip, ESTABLISHED, Duration::from_secs(5))
        .expect("opening established connections");
    long.check_all().expect("established connections echo");
    let before: Vec<String> = long.backends();
    let counter = |lb: &Balancer, name: &str| {
        lb.counters()
            .unwrap()
            .into_iter()
            .find(|(c, _)| c.name() == name)
            .unwrap()
            .1
    };
    let ct_new_before = counter(&lb, "ct_new");
    let promoted_before = counter(&lb, "ct_promoted");
    // Connection-table pressure counters (lb-common `Counter`), as lbctl stats shows them.
    let pressure = |lb: &Balancer| {
        [
            "ct_lost",
            "ct_insert_failed",
            "ct_new_insert_failed",
            "frag_insert_failed",
        ]
        .map(|n| (n, counter(lb, n)))
    };
    let pressure_before = pressure(&lb);

    // The flood: at least 10 x C first packets reach the balancer, while backend3 is added.
    let target = FLOOD_FACTOR * CT_SIZE as u64;
    let start = Instant::now();
    let mut syns = SpoofedSyns::new(0x9e37_79b9_7f4a_7c15);
    let (mut sent, mut acks) = (0, 0);
    let mut added = false;
    while counter(&lb, "ct_new") - ct_new_before < target {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "flood too slow: {} first packets seen",
            counter(&lb, "ct_new") - ct_new_before
        );
        let (n, a) = lab
            .client()
            .ns()
            .run_in(|| flood(8192, &mut syns))
            .expect("raw socket");
        sent += n;
        acks += a;
        if !added && sent >= target / 2 {
            let cfg4 = config(&lab, 4);
            lab.lb()
                .ns()
                .run_in(|| lb.apply(&cfg4).expect("adding backend3 during the flood"));
            added = true;
        }
    }
    let elapsed = start.elapsed();
    let first_packets = counter(&lb, "ct_new") - ct_new_before;
    let promoted = counter(&lb, "ct_promoted") - promoted_before;
    assert!(added, "backend3 must be added during the flood");
    let pressure_flood = pressure(&lb);

    let statuses = long.check();
    let broken: Vec<_> = statuses.iter().filter(|s| !s.is_ok()).collect();
    let moved = long
        .backends()
        .iter()
        .zip(&before)
        .filter(|(a, b)| a != b)
        .count();
    let (ct, ct_new) = lb.conntrack_len();
    println!(
        "flood: C = {CT_SIZE} (new-flow table {CT_NEW_SIZE}), {sent} spoofed packets sent, {first_packets} first packets seen by XDP ({:.1} x C) in {:.1} s, {promoted} promotions; \
         CT holds {ct} entries, CT_NEW {ct_new}; {ESTABLISHED} established connections: {} broken, {moved} moved",
        first_packets as f64 / CT_SIZE as f64,
        elapsed.as_secs_f64(),
        broken.len()
    );
    let pressure_after = pressure(&lb);
    let delta_of = |a: &[(&'static str, u64); 4], b: &[(&'static str, u64); 4]| {
        a.iter()
            .zip(b)
            .map(|((n, a), (_, b))| (*n, a - b))
            .collect::<Vec<(&str, u64)>>()
    };
    let delta = delta_of(&pressure_flood, &pressure_before);
    let echo = delta_of(&pressure_after, &pressure_flood);
    let show = |d: &[(&str, u64)]| {
        d.iter()
            .map(|(n, d)| format!("{n} +{d}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "connection-table counters over the flood ({acks} of the {sent} spoofed packets ACKs): ct_new +{first_packets}, ct_promoted +{promoted}, {}; over the echo check after it: {}",
        show(&delta),
        show(&echo)
    );
    assert!(
        broken.is_empty(),
        "{} established connections broke during the flood, first: {:?}",
        broken.len(),
        broken.first()
    );
    // At least 10 x C first packets (SYNs, and ACKs recorded in the new-flow table;
    // ct_new_insert_failed, printed above, counts any the LRU could not take).
    assert!(first_packets >= target, "{first_packets} < {target}");
    // Every flow without state during the flood was a spoofed ACK's (the established
    // connections were quiet), and the spoofed SYNs never became established flows.
    assert!(
        delta[0].1 <= acks,
        "ct_lost +{} > {acks} spoofed ACKs",
        delta[0].1
    );
    assert!(acks > target / 4, "the flood sent only {acks} ACKs");
    // Not one packet of the established connections' echoes after the flood found its flow's
    // state gone: the flood evicted nothing from CT.
    assert_eq!(echo[0], ("ct_lost", 0), "{echo:?}");
    assert_eq!(delta[1], ("ct_insert_failed", 0), "{delta:?}");
    assert_eq!(echo[1], ("ct_insert_failed", 0), "{echo:?}");
    assert_eq!(moved, 0);
    assert!(
        ct <= CT_SIZE as usize && ct >= ESTABLISHED,
        "the established table must still hold the {ESTABLISHED} flows ({ct})"
    );

    // Legitimate clients get through during a flood (a second one, from another thread, while
    // they connect) and after it, to every backend including the new one.
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
    let stop = AtomicBool::new(false);
    let flooded = AtomicU64::new(0);
    let (during, flooded) = std::thread::scope(|s| {
        let flooder = s.spawn(|| {
            let mut syns = SpoofedSyns::new(0x2545_f491_4f6c_dd1d);
            while !stop.load(Relaxed) && flooded.load(Relaxed) < 50 * target {
                let (n, _) = lab
                    .client()
                    .ns()
                    .run_in(|| flood(1024, &mut syns))
                    .expect("raw socket");
                flooded.fetch_add(n, Relaxed);
            }
        });
        // The flood is under way before the first connection.
        let started = Instant::now();
        while flooded.load(Relaxed) < 4096 {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the second flood did not start"
            );
            std::thread::yield_now();
        }
        let results = client_many(lab.client().ns(), vip, 200, Duration::from_secs(3));
        let during = flooded.load(Relaxed);
        stop.store(true, Relaxed);
        flooder.join().expect("flood thread");
        (results, during)
    });
    let ok = during.iter().filter(|r| r.is_ok()).count();
    println!(
        "during a second flood ({flooded} spoofed packets sent until the last connection): {ok}/200 new connections succeeded"
    );
    assert_eq!(
        ok, 200,
        "legitimate new connections failed during the flood"
    );
    assert!(flooded > 0, "the second flood sent nothing");
    let results = client_many(lab.client().ns(), vip, 400, Duration::from_secs(3));
    let ok = results.iter().filter(|r| r.is_ok()).count();
    println!("after the flood: {ok}/400 new connections succeeded");
    assert_eq!(ok, 400, "legitimate new connections failed after the flood");
    assert!(
        tests::tcp::tally(&results).contains_key("backend3"),
        "the added backend gets new connections"
    );
}
