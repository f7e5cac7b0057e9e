//! VIP announcement by BGP through a node-local BIRD 2 that lbd runs as its child.
//!
//! Why a child BIRD: the session must die with lbd. The child is started with
//! `PR_SET_PDEATHSIG = SIGKILL`, so when lbd dies (even SIGKILL) the kernel kills BIRD and
//! closes its TCP sessions; the router sees the connection closed and withdraws this node's
//! routes at once, instead of after a hold timer. BIRD's graceful restart is off on purpose: a
//! router keeping a dead node's routes "stale" would go on sending it traffic.
//!
//! lbd tells BIRD what to announce by rewriting its configuration (one static protocol per
//! address family, holding a `blackhole` route per VIP: BIRD only exports them to BGP, the
//! kernel's table is never touched) and asking it to `configure` on its control socket; only
//! the changed static protocols restart, the BGP sessions stay up.
//!
//! [`announce`] is the loop: every 250 ms (and at once on a drain or undrain) it asks the agent
//! what this node may announce ([`Agent::node_inputs`]), tells BIRD, reads the sessions, and
//! reports both back to the agent for `lbctl status` and the metrics. A BIRD that dies is
//! started again (at most every 2 s); its routes are gone meanwhile, which is the truth.
use crate::{
    agent::Agent,
    config::Bgp,
    control::{events::Kind, BgpSession, BgpStatus, Withheld},
};
use anyhow::{anyhow, bail, Context as _, Result};
use std::{
    collections::BTreeSet,
    fmt::Write as _,
    io::{BufReader, Write as _},
    net::IpAddr,
    os::unix::{net::UnixStream, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};
use tracing::{error, info, warn};

/// How often the announcer re-decides (lbd notices a datapath fault on the same period).
const TICK: Duration = Duration::from_millis(250);
/// Shortest time between two starts of BIRD.
const RESTART_EVERY: Duration = Duration::from_secs(2);

/// How long BIRD may take to answer on its control socket.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(2);
/// How long BIRD may take to open its control socket after start.
const START_TIMEOUT: Duration = Duration::from_secs(5);

/// A VIP's route: its address as a host prefix (`/32`, `/128`).
pub fn prefix(addr: IpAddr) -> String {
    match addr {
        IpAddr::V4(a) => format!("{a}/32"),
        IpAddr::V6(a) => format!("{a}/128"),
    }
}

/// Where the node-local BIRD keeps its configuration and control socket: beside lbd's control
/// socket, named after it, so that two lbds on one host (tests) never share them.
pub fn paths(control_socket: &Path) -> (PathBuf, PathBuf) {
    let dir = control_socket.parent().unwrap_or(Path::new("/run/lb"));
    let stem = control_socket
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "lbd".into());
    (
        dir.join(format!("{stem}.bird.conf")),
        dir.join(format!("{stem}.bird.ctl")),
    )
}

/// BIRD's name for the session with `bgp.peers[i]`.
fn protocol_name(i: usize) -> String {
    format!("lb_peer{i}")
}

/// The node-local BIRD's whole configuration, announcing `announce` (VIP addresses).
pub fn render(bgp: &Bgp, announce: &BTreeSet<IpAddr>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Written by lbd: its node-local BIRD, announcing the VIPs this node can serve.\n\
         # Rewritten on every change; edit lbd.toml's [bgp] instead.\n\
         router id {};\n\
         log stderr {{ info, remote, warning, error, auth, fatal, bug }};\n\
         protocol device {{ }}",
        bgp.router_id
    );
    for (name, family, v4) in [("lb_vips4", "ipv4", true), ("lb_vips6", "ipv6", false)] {
        let _ = writeln!(out, "protocol static {name} {{\n  {family};");
        for a in announce.iter().filter(|a| a.is_ipv4() == v4) {
            let _ = writeln!(out, "  route {} blackhole;", prefix(*a));
        }
        out.push_str("}\n");
    }
    for (i, peer) in bgp.peers.iter().enumerate() {
        let (family, source) = if peer.is_ipv4() {
            ("ipv4", "lb_vips4")
        } else {
            ("ipv6", "lb_vips6")
        };
        let keepalive = (bgp.hold_time / 3).max(1);
        let _ = writeln!(
            out,
            "protocol bgp {} {{\n  local as {};\n  neighbor {peer} as {};\n  hold time {};\n  keepalive time {keepalive};\n  connect retry time 1;\n  error wait time 1, 10;\n  graceful restart off;\n  long lived graceful restart off;\n  {family} {{ import none; export where proto = \"{source}\"; }};\n}}",
            protocol_name(i),
            bgp.local_as,
            bgp.peer_as,
            bgp.hold_time,
        );
    }
    out
}

/// Asks BIRD one command on its control socket; returns the reply's lines without their
/// codes. A reply coded 8xxx or 9xxx (BIRD's errors) is an error carrying BIRD's words.
pub fn ask(ctl: &Path, command: &str) -> Result<Vec<(u16, String)>> {
    let stream = UnixStream::connect(ctl)
        .with_context(|| format!("connecting to BIRD's control socket {}", ctl.display()))?;
    stream.set_read_timeout(Some(CONTROL_TIMEOUT))?;
    stream.set_write_timeout(Some(CONTROL_TIMEOUT))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    read_reply(&mut reader).context("BIRD's greeting")?;
    (&stream).write_all(format!("{command}\n").as_bytes())?;
    let reply = read_reply(&mut reader).with_context(|| format!("BIRD's answer to {command}"))?;
    if let Some((code, text)) = reply.iter().find(|(c, _)| *c >= 8000) {
        bail!("BIRD refused `{command}` ({code}): {text}");
    }
    Ok(reply)
}

/// One reply: lines `CODE-text` (more follow), ` text` (the same code goes on) and a last
/// `CODE text`.
fn read_reply(r: &mut impl std::io::BufRead) -> Result<Vec<(u16, String)>> {
    let mut out = Vec::new();
    let mut code = 0u16;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            bail!("BIRD closed its control socket mid-reply");
        }
        let line = line.trim_end_matches('\n');
        let head = line.as_bytes();
        if head.len() >= 5 && head[..4].iter().all(u8::is_ascii_digit) {
            code = line[..4].parse().unwrap_or(0);
            out.push((code, line[5..].to_string()));
            if head[4] == b' ' {
                return Ok(out);
            }
        } else {
            out.push((code, line.strip_prefix(' ').unwrap_or(line).to_string()));
        }
    }
}

/// The sessions' states from `show protocols` (rows coded 1002: name, protocol, table, state,
/// since, info).
pub fn sessions(bgp: &Bgp, reply: &[(u16, String)]) -> Vec<BgpSession> {
    bgp.peers
        .iter()
        .enumerate()
        .map(|(i, peer)| {
            let name = protocol_name(i);
            let row = reply.iter().find_map(|(code, line)| {
                let mut words = line.split_whitespace();
                (*code == 1002 && words.next() == Some(name.as_str())).then(|| {
                    // name proto table state date time-or-date info...
                    let cols: Vec<&str> = line.split_whitespace().collect();
                    cols.get(5..).map(|c| c.join(" ")).unwrap_or_default()
                })
            });
            session(*peer, row)
        })
        .collect()
}

fn session(peer: IpAddr, info: Option<String>) -> BgpSession {
    let info = info.unwrap_or_default();
    let state = match info.split_whitespace().next() {
        Some(s) if !s.is_empty() && !s.ends_with(':') => s.to_lowercase(),
        _ => "idle".to_string(),
    };
    BgpSession {
        peer: peer.to_string(),
        established: state == "established",
        state,
        info,
    }
}

/// Sessions shown when BIRD cannot be asked.
pub fn unknown_sessions(bgp: &Bgp, why: &str) -> Vec<BgpSession> {
    bgp.peers
        .iter()
        .map(|p| BgpSession {
            peer: p.to_string(),
            state: "unknown".into(),
            established: false,
            info: why.to_string(),
        })
        .collect()
}

/// The node-local BIRD, lbd's child.
pub struct Speaker {
    bgp: Bgp,
    conf: PathBuf,
    ctl: PathBuf,
    child: Child,
    /// What BIRD was last configured to announce.
    announced: BTreeSet<IpAddr>,
}

impl Speaker {
    /// Writes a configuration announcing nothing and starts BIRD on it; returns once BIRD
    /// answers on its control socket.
    pub fn try_start(bgp: &Bgp, control_socket: &Path) -> Result<Speaker> {
        let (conf, ctl) = paths(control_socket);
        write_atomically(&conf, &render(bgp, &BTreeSet::new()))?;
        let _ = std::fs::remove_file(&ctl);
        let parent = std::process::id();
        let mut cmd = Command::new(&bgp.bird);
        cmd.arg("-f")
            .arg("-c")
            .arg(&conf)
            .arg("-s")
            .arg(&ctl)
            .stdin(Stdio::null());
        // SAFETY: only async-signal-safe calls (prctl, getppid, _exit) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // lbd died between fork and prctl: nobody would kill this BIRD.
                if libc::getppid() as u32 != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| {
            format!(
                "bgp.bird: cannot start {} ({}); install BIRD 2 (apt install bird2) or set bgp.bird to its path",
                bgp.bird.display(),
                conf.display()
            )
        })?;
        let mut speaker = Speaker {
            bgp: bgp.clone(),
            conf,
            ctl,
            child,
            announced: BTreeSet::new(),
        };
        let started = Instant::now();
        while ask(&speaker.ctl, "show status").is_err() {
            if let Some(status) = speaker.child.try_wait()? {
                bail!(
                    "BIRD ({}) exited at start with {status}: its configuration {} was refused (BIRD's log above says why)",
                    speaker.bgp.bird.display(),
                    speaker.conf.display()
                );
            }
            if started.elapsed() > START_TIMEOUT {
                bail!(
                    "BIRD did not open its control socket {} within {START_TIMEOUT:?}",
                    speaker.ctl.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(speaker)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// BIRD's exit status, once it has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// What BIRD announces now.
    pub fn announced(&self) -> &BTreeSet<IpAddr> {
        &self.announced
    }

    /// Makes BIRD announce exactly `want`. Returns whether anything changed.
    pub fn try_announce(&mut self, want: &BTreeSet<IpAddr>) -> Result<bool> {
        if *want == self.announced {
            return Ok(false);
        }
        write_atomically(&self.conf, &render(&self.bgp, want))?;
        ask(&self.ctl, "configure").map_err(|e| anyhow!("reconfiguring BIRD: {e:#}"))?;
        self.announced = want.clone();
        Ok(true)
    }

    /// The sessions' states, asked of BIRD.
    pub fn try_sessions(&self) -> Result<Vec<BgpSession>> {
        Ok(sessions(&self.bgp, &ask(&self.ctl, "show protocols")?))
    }

    /// Stops BIRD gracefully (it tells its peers, which withdraw at once), killing it if it
    /// does not exit within a second.
    pub fn stop(&mut self) {
        if self.exited().is_some() {
            return;
        }
        // SAFETY: signalling our own child by its pid; it has not been reaped yet.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let until = Instant::now() + Duration::from_secs(1);
        while Instant::now() < until {
            if self.exited().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Speaker {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(&self.ctl);
    }
}

/// Why each configured VIP address is not in `announce`, given the reason for the ones left
/// out as a whole (`node_draining`, ...) or per VIP (`no_serving_backend`).
pub fn withheld(all: &[(IpAddr, bool)], node_reason: Option<&str>) -> Vec<Withheld> {
    let mut out: Vec<Withheld> = Vec::new();
    let mut seen = BTreeSet::new();
    for (addr, serving) in all {
        let reason = match node_reason {
            Some(r) => r,
            None if !serving => "no_serving_backend",
            None => continue,
        };
        if seen.insert(*addr) {
            out.push(Withheld {
                prefix: prefix(*addr),
                reason: reason.to_string(),
            });
        }
    }
    out
}

/// The announcer: runs until its task is dropped, which stops BIRD (see [`Speaker`]'s drop).
/// Must run on the thread that started `speaker` and will start its replacements (lbd's
/// single-threaded runtime): `PR_SET_PDEATHSIG` fires when that thread exits.
pub async fn announce(agent: Arc<Agent>, bgp: Bgp, control_socket: PathBuf, speaker: Speaker) {
    let mut a = Announcer {
        agent,
        bgp,
        control_socket,
        speaker: Some(speaker),
        started: Instant::now(),
        fault: None,
        sessions: Vec::new(),
        changed_ms: None,
    };
    let mut tick = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = a.agent.node_changed().notified() => {}
        }
        a.step().await;
    }
}

struct Announcer {
    agent: Arc<Agent>,
    bgp: Bgp,
    control_socket: PathBuf,
    speaker: Option<Speaker>,
    /// When BIRD was last started.
    started: Instant,
    /// What went wrong with BIRD last, until it works again.
    fault: Option<String>,
    sessions: Vec<BgpSession>,
    changed_ms: Option<u64>,
}

impl Announcer {
    async fn step(&mut self) {
        let inputs = self.agent.node_inputs().await;
        self.keep_bird_running();
        let want: BTreeSet<IpAddr> = match inputs.withhold_all {
            Some(_) => BTreeSet::new(),
            None => inputs
                .vips
                .iter()
                .filter(|(_, s)| *s)
                .map(|(a, _)| *a)
                .collect(),
        };
        let sessions = match self.speaker.as_mut() {
            Some(speaker) => {
                let before = speaker.announced().clone();
                match speaker.try_announce(&want) {
                    Ok(true) => {
                        self.changed_ms = Some(now_ms());
                        self.fault = None;
                        let list = |s: &BTreeSet<IpAddr>| {
                            s.iter().map(|a| prefix(*a)).collect::<Vec<_>>().join(", ")
                        };
                        let msg = format!(
                            "BGP announcements changed ({}): now [{}], before [{}]",
                            inputs.withhold_all.unwrap_or("serving"),
                            list(&want),
                            list(&before)
                        );
                        info!("{msg}");
                        self.agent.events().record(Kind::RoutesChanged, msg);
                    }
                    Ok(false) => {}
                    Err(e) => {
                        warn!("telling BIRD what to announce: {e:#}");
                        self.fault = Some(format!("{e:#}"));
                    }
                }
                speaker
                    .try_sessions()
                    .unwrap_or_else(|e| unknown_sessions(&self.bgp, &format!("{e:#}")))
            }
            None => unknown_sessions(&self.bgp, "BIRD is not running"),
        };
        self.journal_sessions(&sessions);
        self.sessions = sessions;
        self.agent.set_bgp_report(BgpStatus {
            node: String::new(),
            drain_remaining_seconds: None,
            speaker: self.speaker_text(),
            sessions: self.sessions.clone(),
            announced: self
                .speaker
                .as_ref()
                .map(|s| s.announced().iter().map(|a| prefix(*a)).collect())
                .unwrap_or_default(),
            withheld: withheld(&inputs.vips, inputs.withhold_all),
            changed_ms: self.changed_ms,
        });
    }

    /// Notices a BIRD that exited and starts it again (at most every [`RESTART_EVERY`]).
    fn keep_bird_running(&mut self) {
        if let Some(status) = self.speaker.as_mut().and_then(Speaker::exited) {
            let msg = format!(
                "BGP speaker (BIRD) exited with {status}: this node's routes are withdrawn; starting it again"
            );
            error!("{msg}");
            self.agent
                .events()
                .record(Kind::BgpSpeakerFailed, msg.clone());
            self.speaker = None;
            self.fault = Some(msg);
        }
        if self.speaker.is_some() || self.started.elapsed() < RESTART_EVERY {
            return;
        }
        self.started = Instant::now();
        match Speaker::try_start(&self.bgp, &self.control_socket) {
            Ok(s) => {
                info!(pid = s.pid(), "BGP speaker (BIRD) started again");
                self.speaker = Some(s);
                self.fault = None;
            }
            Err(e) => {
                error!("starting BIRD again: {e:#}");
                self.fault = Some(format!("{e:#}"));
            }
        }
    }

    fn speaker_text(&self) -> String {
        match (&self.speaker, &self.fault) {
            (Some(s), None) => format!("running (pid {})", s.pid()),
            (Some(s), Some(f)) => format!("running (pid {}), last error: {f}", s.pid()),
            (None, Some(f)) => f.clone(),
            (None, None) => "not running".into(),
        }
    }

    /// Journals sessions coming up or going down.
    fn journal_sessions(&self, now: &[BgpSession]) {
        for s in now {
            let was = self
                .sessions
                .iter()
                .find(|p| p.peer == s.peer)
                .is_some_and(|p| p.established);
            if was == s.established {
                continue;
            }
            let (kind, msg) = if s.established {
                (
                    Kind::BgpSessionUp,
                    format!("BGP session with {} established", s.peer),
                )
            } else {
                (
                    Kind::BgpSessionDown,
                    format!("BGP session with {} down: {} ({})", s.peer, s.state, s.info),
                )
            };
            info!("{msg}");
            self.agent.events().record(kind, msg);
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("conf.tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bgp() -> Bgp {
        Bgp {
            local_as: 65001,
            peer_as: 65000,
            peers: vec!["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()],
            router_id: "10.0.0.11".parse().unwrap(),
            hold_time: 3,
            bird: "bird".into(),
            drain_timeout_seconds: 30,
        }
    }

    #[test]
    fn renders_one_static_route_per_vip_and_a_session_per_peer() {
        let want: BTreeSet<IpAddr> = ["198.51.100.1", "2001:db8::1"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let c = render(&bgp(), &want);
        assert!(c.contains("route 198.51.100.1/32 blackhole;"), "{c}");
        assert!(c.contains("route 2001:db8::1/128 blackhole;"), "{c}");
        assert!(c.contains("neighbor 10.0.0.1 as 65000;"));
        assert!(c.contains("ipv6 { import none; export where proto = \"lb_vips6\"; }"));
        assert!(c.contains("graceful restart off;"));
        assert!(!render(&bgp(), &BTreeSet::new()).contains("route "));
    }

    #[test]
    fn reads_replies_and_session_rows() {
        let text = "0001 BIRD 2.0.12 ready.\n2002-Name       Proto      Table      State  Since         Info\n1002-device1    Device     ---        up     03:56:32.882  \n lb_peer0   BGP        ---        up     03:56:37.165  Established   \n lb_peer1   BGP        ---        start  03:56:32.882  Active        Socket: Connection refused\n0000 \n";
        let mut r = std::io::Cursor::new(text.as_bytes());
        assert_eq!(
            read_reply(&mut r).unwrap(),
            [(1, "BIRD 2.0.12 ready.".into())]
        );
        let reply = read_reply(&mut r).unwrap();
        let s = sessions(&bgp(), &reply);
        assert_eq!(s[0].state, "established");
        assert!(s[0].established);
        assert_eq!(s[1].state, "active");
        assert_eq!(s[1].info, "Active Socket: Connection refused");
        let gone = sessions(&bgp(), &[]);
        assert_eq!(gone[0].state, "idle");
    }

    #[test]
    fn bird_files_are_named_after_the_control_socket() {
        let (conf, ctl) = paths(Path::new("/run/lb/node2.sock"));
        assert_eq!(conf, Path::new("/run/lb/node2.bird.conf"));
        assert_eq!(ctl, Path::new("/run/lb/node2.bird.ctl"));
    }
}
