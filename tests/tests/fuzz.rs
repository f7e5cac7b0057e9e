//! Differential fuzzing of the XDP balancer against the reference model: at least a million
//! random and mutated packets through `BPF_PROG_TEST_RUN` and through `tests::model`, with
//! zero mismatches (verdict, output bytes, counters, statistics, connection and fragment
//! tables). See `tests/src/fuzz.rs` for what is generated and checked, and `tests/src/model.rs`
//! for the model.
//!
//! Reproduce a failure with the seed it prints: `LB_FUZZ_SEED=0x... cargo test -p tests --test
//! fuzz -- --nocapture`. `LB_FUZZ_PACKETS` overrides the number of packets (the million is the
//! CI floor; fewer only for a quick look), `LB_FUZZ_COUNTER_EVERY` how often the counters are
//! compared (default every 16 packets; 1 pins a counter difference to its packet). `cargo xtask fuzz --minutes N` runs the same loop
//! for longer.

use tests::fuzz::{self, FuzzOptions};
use tests::model::Verdict;
use tests::require_root;

const CI_PACKETS: u64 = 1_000_000;

#[test]
fn differential_fuzz() {
    require_root();
    let seed = fuzz::seed_from_env();
    println!("fuzz seed {seed:#x} (reproduce with LB_FUZZ_SEED={seed:#x})");
    let packets = std::env::var("LB_FUZZ_PACKETS")
        .ok()
        .map(|s| s.parse().expect("LB_FUZZ_PACKETS must be a number"))
        .unwrap_or(CI_PACKETS);
    let mut opts = FuzzOptions::new(seed);
    opts.packets = Some(packets);
    if let Ok(n) = std::env::var("LB_FUZZ_COUNTER_EVERY") {
        opts.counter_every = n.parse().expect("LB_FUZZ_COUNTER_EVERY must be a number");
    }
    let report = fuzz::run(&opts).expect("running the fuzzer");
    println!("{}", report.summary());
    for m in &report.mismatches {
        println!("MISMATCH {m}\n");
    }
    assert!(
        report.mismatches.is_empty(),
        "{} mismatches between the XDP program and the model (seed {seed:#x}); first:\n{}",
        report.mismatches.len(),
        report.mismatches[0]
    );
    assert_eq!(report.packets, packets, "the run stopped early");
    assert!(
        report.filter_rebuilds >= packets / opts.check_every,
        "the tracked-flow filter was rebuilt {} times in {packets} packets",
        report.filter_rebuilds
    );
    if packets >= CI_PACKETS {
        let missing = report.uncovered();
        assert!(
            missing.is_empty(),
            "the generator did not reach: {missing:?}"
        );
    }
}

/// The generator and the model alone (no root): the model never panics, a packet it does not
/// send is unchanged, and the headers it builds are well-formed as etherparse reads them: the
/// outer IPv4 header checksum and lengths of encapsulated packets, the ICMP/ICMPv6 checksums
/// of "too big" answers; an L2-forwarded packet differs from the input in its MACs only.
#[test]
fn model_outputs_are_well_formed() {
    use etherparse::{
        EtherType, Ethernet2HeaderSlice, Icmpv4Slice, Icmpv6Slice, Ipv4HeaderSlice, Ipv6HeaderSlice,
    };
    let seed = fuzz::seed_from_env();
    println!("seed {seed:#x}");
    let mut state = fuzz::offline_state();
    let mut gen = fuzz::Generator::new(seed);
    let (mut encapsulated, mut answered, mut rewritten) = (0, 0, 0);
    for _ in 0..100_000 {
        let (class, frame) = gen.next();
        let o = state.run(&frame);
        state.apply(&o);
        let hex = || format!("{class} {:02x?} -> {:02x?}", frame, o.output);
        if !matches!(o.verdict, Verdict::Tx | Verdict::Redirect) {
            if o.verdict != Verdict::Refused {
                assert_eq!(
                    o.output,
                    frame,
                    "a packet not sent must be unchanged: {}",
                    hex()
                );
            }
            continue;
        }
        let eth = Ethernet2HeaderSlice::from_slice(&o.output).unwrap();
        let (l3, et) = if eth.ether_type() == EtherType::VLAN_TAGGED_FRAME {
            (
                18,
                EtherType(u16::from_be_bytes([o.output[16], o.output[17]])),
            )
        } else {
            (14, eth.ether_type())
        };
        let ip = &o.output[l3..];
        // The input's link header: tagged or not, the tag is kept only on XDP_TX.
        let in_l3 = if frame[12..14] == [0x81, 0x00] {
            18
        } else {
            14
        };
        if o.verdict == Verdict::Tx {
            assert_eq!(l3, in_l3, "XDP_TX keeps the link header's tag: {}", hex());
        } else {
            assert_eq!(l3, 14, "a redirected frame leaves untagged: {}", hex());
        }
        if o.output[l3 - 2..] == frame[in_l3 - 2..] {
            rewritten += 1;
            continue;
        }
        match et {
            EtherType::IPV4 => {
                let h =
                    Ipv4HeaderSlice::from_slice(ip).unwrap_or_else(|e| panic!("{e}: {}", hex()));
                assert_eq!(
                    h.header_checksum(),
                    h.to_header().calc_header_checksum(),
                    "{}",
                    hex()
                );
                let body = &ip[20..h.total_len() as usize];
                match h.protocol().0 {
                    4 => {
                        encapsulated += 1;
                        assert_eq!(
                            &o.output[l3 + 20..],
                            &frame[in_l3..],
                            "inner packet: {}",
                            hex()
                        );
                    }
                    1 => {
                        answered += 1;
                        let i = Icmpv4Slice::from_slice(body).unwrap();
                        assert_eq!(
                            i.checksum(),
                            i.header().icmp_type.calc_checksum(i.payload()),
                            "{}",
                            hex()
                        );
                    }
                    p => panic!("model sent IPv4 protocol {p}: {}", hex()),
                }
            }
            EtherType::IPV6 => {
                let h = Ipv6HeaderSlice::from_slice(ip).unwrap();
                let body = &ip[40..40 + h.payload_length() as usize];
                match h.next_header().0 {
                    41 => {
                        encapsulated += 1;
                        assert_eq!(
                            &o.output[l3 + 40..],
                            &frame[in_l3..],
                            "inner packet: {}",
                            hex()
                        );
                    }
                    58 => {
                        answered += 1;
                        let i = Icmpv6Slice::from_slice(body).unwrap();
                        assert!(
                            i.is_checksum_valid(h.source(), h.destination()),
                            "{}",
                            hex()
                        );
                    }
                    p => panic!("model sent IPv6 next header {p}: {}", hex()),
                }
            }
            e => panic!("model sent ethertype {e:?}: {}", hex()),
        }
    }
    println!("{encapsulated} encapsulated, {answered} answered too big, {rewritten} MAC-rewritten");
    assert!(encapsulated > 1000 && answered > 100 && rewritten > 100);
}
