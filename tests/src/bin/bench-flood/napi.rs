//! A veth's receive NAPI as a kernel thread pinned to one CPU.
//!
//! A veth's NAPI (where its XDP program runs) is scheduled on the CPU that sent the frame and
//! stays there for as long as it has packets: under a continuous flood the balancer's ran on
//! whichever CPU's packet came first, and a CPU shared with the sender and the clients gave it
//! only a fair share. Threaded NAPI (`/sys/class/net/DEV/threaded`) with the thread pinned is
//! the veth's equivalent of a NIC queue's interrupt affinity: the work runs on the chosen CPU,
//! in a thread whose CPU time is its own. The thread gets a real-time priority (SCHED_FIFO 50,
//! that of threaded interrupt handlers), as a NIC's NAPI in softirq comes before any task: on
//! a CPU shared with other work it would otherwise get a fair share and drop packets meanwhile.
use std::collections::BTreeSet;

use anyhow::{bail, Context, Result};
use tests::netns::NetNs;

/// Process ids of the kernel's NAPI threads (`napi/<dev>-<id>`).
fn napi_threads() -> BTreeSet<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return BTreeSet::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.starts_with("napi/"))
        })
        .collect()
}

/// Turns `dev`'s NAPI in `ns` into threads at SCHED_FIFO 50 pinned to `cpu`; their process ids.
pub fn pin_napi(ns: &NetNs, dev: &str, cpu: usize) -> Result<Vec<i32>> {
    let before = napi_threads();
    ns.exec_ok(
        "sh",
        ["-c", &format!("echo 1 > /sys/class/net/{dev}/threaded")],
    )
    .with_context(|| format!("threaded NAPI on {dev} in {}", ns.name()))?;
    let new: Vec<i32> = napi_threads().difference(&before).copied().collect();
    if new.is_empty() {
        bail!("no NAPI thread appeared for {dev} in {}", ns.name());
    }
    for &pid in &new {
        crate::cpu::pin(pid, cpu)
            .with_context(|| format!("pinning NAPI thread {pid} to CPU {cpu}"))?;
        let param = libc::sched_param { sched_priority: 50 };
        // SAFETY: a valid sched_param for the duration of the call.
        if unsafe { libc::sched_setscheduler(pid, libc::SCHED_FIFO, &param) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("SCHED_FIFO for NAPI thread {pid}"));
        }
    }
    Ok(new)
}
