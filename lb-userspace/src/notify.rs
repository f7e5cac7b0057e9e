//! A minimal `sd_notify(3)`: readiness, reload, stop and watchdog messages to the service
//! manager, so that `lbd.service` can be `Type=notify` with `WatchdogSec=`.
//!
//! Messages are datagrams of `KEY=VALUE` lines sent to the Unix socket named by
//! `$NOTIFY_SOCKET` (a path, or an abstract address when it starts with `@`). Without
//! `$NOTIFY_SOCKET` (not started by systemd) every call does nothing. A failure to send is
//! logged and otherwise ignored: the load balancer keeps working even if the service manager
//! cannot be told about it.
//!
//! The calls are one-liners meant for `lbd`'s main loop: [`ready`] once the datapath is
//! attached and after each reload, [`reloading`] when a reload starts, [`stopping`] before
//! detaching, and [`spawn_watchdog`] once at start.
use std::{
    ffi::OsStr,
    io,
    os::{
        linux::net::SocketAddrExt,
        unix::{
            ffi::OsStrExt,
            net::{SocketAddr, UnixDatagram},
        },
    },
    time::Duration,
};
use tracing::{debug, warn};

/// The environment variable systemd sets for `Type=notify` services.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Sends `state` (newline-separated `KEY=VALUE` assignments) to `$NOTIFY_SOCKET`.
/// Returns `Ok(false)` when the variable is unset or empty (nothing to notify).
pub fn notify(state: &str) -> io::Result<bool> {
    match std::env::var_os(NOTIFY_SOCKET) {
        Some(addr) if !addr.is_empty() => send_to(&addr, state).map(|()| true),
        _ => Ok(false),
    }
}

/// Sends `state` to the notification socket `addr` (`/path` or `@abstract`), as
/// `sd_notify(3)` does with the value of `$NOTIFY_SOCKET`.
pub fn send_to(addr: &OsStr, state: &str) -> io::Result<()> {
    let bytes = addr.as_bytes();
    let sockaddr = match bytes.first() {
        Some(b'@') => SocketAddr::from_abstract_name(&bytes[1..])?,
        Some(b'/') => SocketAddr::from_pathname(addr)?,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                "{NOTIFY_SOCKET}={} is neither an absolute path nor an abstract address (@name)",
                addr.to_string_lossy()
            ),
            ))
        }
    };
    let sock = UnixDatagram::unbound()?;
    let sent = sock.send_to_addr(state.as_bytes(), &sockaddr)?;
    if sent != state.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "short write to the notification socket",
        ));
    }
    Ok(())
}

/// [`notify`], logging instead of returning errors.
fn send(state: &str) {
    match notify(state) {
        Ok(true) => debug!(state = %state.replace('\n', " "), "notified the service manager"),
        Ok(false) => {}
        Err(e) => warn!("cannot notify the service manager ({state:?}): {e}"),
    }
}

/// `STATUS=` text on one line (a newline would start a new assignment).
fn one_line(status: &str) -> String {
    status.replace('\n', " ")
}

/// The service is up (or done reloading): `READY=1` with a `STATUS=` line for `systemctl status`.
pub fn ready(status: &str) {
    send(&format!("READY=1\nSTATUS={}", one_line(status)));
}

/// [`ready`] for the balancer running `cfg` (at start and after every reload, applied or not).
pub fn balancer_ready(cfg: &crate::Config) {
    ready(&format!(
        "balancing {} VIPs on {}",
        cfg.vips.len(),
        cfg.interface
    ));
}

/// [`ready`] for `lbd decap`.
pub fn decap_ready(interface: &str, vips: usize) {
    ready(&format!(
        "decapsulating IP-in-IP for {vips} VIPs on {interface}"
    ));
}

/// A reload has started; systemd shows the unit as reloading until the next [`ready`].
pub fn reloading() {
    // MONOTONIC_USEC lets systemd ≥ 253 match the reload to its request; older ones ignore it.
    send(&format!(
        "RELOADING=1\nSTATUS=reloading the configuration\nMONOTONIC_USEC={}",
        monotonic_usec()
    ));
}

/// The service is shutting down.
pub fn stopping() {
    send("STOPPING=1\nSTATUS=stopping");
}

/// Free-form `STATUS=` text.
pub fn status(status: &str) {
    send(&format!("STATUS={}", one_line(status)));
}

/// One watchdog keep-alive.
pub fn watchdog() {
    send("WATCHDOG=1");
}

/// How often systemd expects `WATCHDOG=1`: `$WATCHDOG_USEC`, if set for this process
/// (`$WATCHDOG_PID` absent or equal to our pid). `None` means no watchdog.
pub fn watchdog_timeout() -> Option<Duration> {
    parse_watchdog(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

fn parse_watchdog(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok() != Some(me) {
            return None;
        }
    }
    let usec: u64 = usec?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Starts a task on the current tokio runtime that sends `WATCHDOG=1` every half watchdog
/// timeout, as `sd_watchdog_enabled(3)` recommends. It shares the runtime with the main loop,
/// so a stuck loop on a single-threaded runtime also stops the pings and systemd restarts lbd.
/// Returns `None` (and starts nothing) when no watchdog is configured.
pub fn spawn_watchdog() -> Option<tokio::task::JoinHandle<()>> {
    let timeout = watchdog_timeout()?;
    let every = (timeout / 2).max(Duration::from_millis(1));
    debug!(?every, "watchdog enabled");
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            watchdog();
        }
    }))
}

fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    fn recv(sock: &UnixDatagram) -> String {
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn sends_to_a_path_socket() {
        let dir = std::env::temp_dir().join(format!("lb-notify-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let sock = UnixDatagram::bind(&path).unwrap();
        send_to(path.as_os_str(), "READY=1\nSTATUS=up").unwrap();
        assert_eq!(recv(&sock), "READY=1\nSTATUS=up");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        let name = format!("lb-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let sock = UnixDatagram::bind_addr(&addr).unwrap();
        send_to(&OsString::from(format!("@{name}")), "WATCHDOG=1").unwrap();
        assert_eq!(recv(&sock), "WATCHDOG=1");
    }

    #[test]
    fn rejects_relative_addresses() {
        let e = send_to(OsStr::new("relative.sock"), "READY=1").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn watchdog_settings() {
        assert_eq!(parse_watchdog(None, None, 7), None);
        assert_eq!(
            parse_watchdog(Some("30000000"), None, 7),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_watchdog(Some("200000"), Some("7"), 7),
            Some(Duration::from_millis(200))
        );
        // Meant for another process (e.g. inherited from a parent).
        assert_eq!(parse_watchdog(Some("200000"), Some("8"), 7), None);
        assert_eq!(parse_watchdog(Some("0"), None, 7), None);
        assert_eq!(parse_watchdog(Some("soon"), None, 7), None);
    }

    #[test]
    fn status_is_one_line() {
        assert_eq!(one_line("a\nb"), "a b");
    }
}
