//! Where the CPU went during the flood: each CPU's time by kind (`/proc/stat`, which counts
//! everything the machine ran there), lbd's process time, and, when asked for, the XDP
//! balancer's own run time from the kernel's BPF statistics.
use std::{os::fd::OwnedFd, time::Duration};

use anyhow::{bail, Context, Result};

/// One CPU's times from `/proc/stat`, in clock ticks.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuTimes {
    pub user: u64,
    pub system: u64,
    pub softirq: u64,
    pub idle: u64,
    /// Everything else: nice, iowait, irq, steal.
    pub other: u64,
}

impl CpuTimes {
    fn total(&self) -> u64 {
        self.user + self.system + self.softirq + self.idle + self.other
    }

    /// Each kind's share of the time between `before` and `self`, in percent:
    /// (user, system, softirq, busy).
    pub fn shares_since(&self, before: &CpuTimes) -> (f64, f64, f64, f64) {
        let total = self.total().saturating_sub(before.total()).max(1) as f64;
        let pct = |a: u64, b: u64| a.saturating_sub(b) as f64 * 100.0 / total;
        let idle = pct(self.idle, before.idle);
        (
            pct(self.user, before.user),
            pct(self.system, before.system),
            pct(self.softirq, before.softirq),
            100.0 - idle,
        )
    }
}

/// Every CPU's times (`cpuN` lines of `/proc/stat`), by CPU number.
pub fn cpu_times() -> Result<Vec<CpuTimes>> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let mut out = Vec::new();
    for line in stat.lines() {
        let Some(rest) = line.strip_prefix("cpu") else {
            continue;
        };
        if !rest.starts_with(|c: char| c.is_ascii_digit()) {
            continue; // the "cpu" total line
        }
        let f: Vec<u64> = rest
            .split_whitespace()
            .skip(1)
            .map(|v| v.parse().unwrap_or(0))
            .collect();
        if f.len() < 8 {
            bail!("unexpected /proc/stat line {line:?}");
        }
        // user nice system idle iowait irq softirq steal ...
        out.push(CpuTimes {
            user: f[0],
            system: f[2],
            softirq: f[6],
            idle: f[3],
            other: f[1] + f[4] + f[5] + f[7],
        });
    }
    Ok(out)
}

/// Run time and run count of the BPF program `id` (counted only while statistics are on).
pub fn prog_run_stats(id: u32) -> Result<(Duration, u64)> {
    for info in aya::programs::loaded_programs() {
        let info = info.context("listing BPF programs")?;
        if info.id() == id {
            return Ok((info.run_time(), info.run_count()));
        }
    }
    bail!("no BPF program {id}")
}

/// Turns the kernel's BPF run-time statistics on until the returned fd is dropped. They are
/// machine-wide: every BPF program pays two clock reads per run meanwhile.
pub fn enable_bpf_stats() -> Result<OwnedFd> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime).context("BPF_ENABLE_STATS")
}

/// Pins thread `pid` (0: the calling thread) to `cpu` (sched_setaffinity).
pub fn pin(pid: i32, cpu: usize) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET and sched_setaffinity get a valid
    // set of the size passed.
    let r = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
