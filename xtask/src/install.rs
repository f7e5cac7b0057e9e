//! `cargo xtask install` and `cargo xtask package`: put lbd on a host, or into a Debian package.
//!
//! What goes where (`$DESTDIR$PREFIX`, prefix `/usr/local` by default):
//!
//! | file | from |
//! |---|---|
//! | `sbin/lbd`, `sbin/lbctl`, ... | every binary of lb-userspace (`src/bin/*.rs`), built with `--profile` |
//! | `lib/systemd/system/*.service` | `packaging/*.service`, `ExecStart=` pointed at `$PREFIX/sbin` |
//! | `/etc/lb/lbd.toml` | `packaging/lbd.toml`, only if there is none (an operator's file is never replaced) |
//! | `share/lb/` | the default config and a decap environment file, for reference |
//! | `share/man/man8/` | man pages, generated with clap_mangen |
//! | `share/bash-completion`, `share/zsh`, `share/fish` | completions, generated with clap_complete |
//!
//! Man pages and completions come from the same clap definitions the binaries parse
//! (`lb_userspace::cli::shipped_commands`), so they cannot drift from the real flags. A binary
//! whose `Cli` is not there yet is installed without them, with a warning.
//!
//! Every file is written only if its content or mode differs, through a temporary file and a
//! rename, so running the install again changes nothing and says so.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use clap_complete::Shell;

use crate::{docs, util};

/// The path the unit files name lbd by; rewritten to `$PREFIX/sbin/lbd` on install.
pub const UNIT_LBD_PATH: &str = "/usr/sbin/lbd";
/// Where the default configuration goes (lbd's default `--config`), whatever the prefix.
pub const CONFIG_PATH: &str = "/etc/lb/lbd.toml";
/// Name of the Debian package.
pub const DEB_NAME: &str = "lb";

#[derive(Args, Debug, Clone)]
pub struct InstallArgs {
    /// Installation prefix: binaries go to PREFIX/sbin, units to PREFIX/lib/systemd/system,
    /// man pages and completions under PREFIX/share. The configuration is always /etc/lb.
    #[arg(long, default_value = "/usr/local")]
    pub prefix: PathBuf,
    /// Stage the installation under this directory instead of `/` (packaging, tests):
    /// files land in DESTDIR/PREFIX/... and DESTDIR/etc/lb, and the units still name PREFIX.
    #[arg(long)]
    pub destdir: Option<PathBuf>,
    /// Cargo profile to build and install: `release`, or `dev` to reuse the debug build.
    #[arg(long, default_value = "release")]
    pub profile: String,
    /// Don't build: install the binaries already in the profile's target directory.
    #[arg(long)]
    pub no_build: bool,
}

#[derive(Args, Debug, Clone)]
pub struct PackageArgs {
    /// Directory the .deb is written to (default: TARGET/debian).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Cargo profile to build and package: `release`, or `dev` (quicker, for tests).
    #[arg(long, default_value = "release")]
    pub profile: String,
    /// Don't build: package the binaries already in the profile's target directory.
    #[arg(long)]
    pub no_build: bool,
}

/// What happened to one file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Installed,
    Unchanged,
    /// An existing configuration file that we never overwrite.
    Kept,
}

/// Writes files under `$DESTDIR`, remembering what it did.
struct Installer {
    destdir: PathBuf,
    log: Vec<(Outcome, PathBuf)>,
}

impl Installer {
    /// `path` (absolute, as on the target system) inside `$DESTDIR`.
    fn staged(&self, path: &Path) -> PathBuf {
        self.destdir.join(path.strip_prefix("/").unwrap_or(path))
    }

    /// Installs `content` at `path` (absolute on the target system) with `mode`, unless the
    /// file is already exactly that.
    fn file(&mut self, path: &Path, content: &[u8], mode: u32) -> Result<()> {
        let dest = self.staged(path);
        let same = fs::read(&dest).is_ok_and(|old| old == content)
            && fs::metadata(&dest).is_ok_and(|m| m.permissions().mode() & 0o7777 == mode);
        if same {
            self.log.push((Outcome::Unchanged, path.to_path_buf()));
            return Ok(());
        }
        let dir = dest.parent().context("destination has a parent")?;
        mkdirs(dir)?;
        let tmp = dir.join(format!(
            ".{}.xtask-{}",
            dest.file_name().unwrap_or_default().to_string_lossy(),
            std::process::id()
        ));
        let write = || -> std::io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(content)?;
            f.set_permissions(fs::Permissions::from_mode(mode))?;
            f.sync_all()?;
            fs::rename(&tmp, &dest)
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(e).with_context(|| format!("installing {}", dest.display()));
        }
        self.log.push((Outcome::Installed, path.to_path_buf()));
        Ok(())
    }

    /// Installs a configuration file only if none exists.
    fn config(&mut self, path: &Path, content: &[u8]) -> Result<()> {
        if self.staged(path).exists() {
            self.log.push((Outcome::Kept, path.to_path_buf()));
            return Ok(());
        }
        self.file(path, content, 0o644)
    }

    fn print(&self) {
        for (outcome, path) in &self.log {
            let what = match outcome {
                Outcome::Installed => "installed",
                Outcome::Unchanged => "unchanged",
                Outcome::Kept => "kept (exists; not replaced)",
            };
            println!("  {what:<10} {}", self.staged(path).display());
        }
        let count = |o| self.log.iter().filter(|(x, _)| *x == o).count();
        println!(
            "{} installed, {} unchanged, {} kept",
            count(Outcome::Installed),
            count(Outcome::Unchanged),
            count(Outcome::Kept)
        );
    }
}

/// Creates `dir` and its missing parents with mode 0755 whatever the umask: lbd refuses a
/// config directory that others can write, and users must be able to read man pages.
fn mkdirs(dir: &Path) -> Result<()> {
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        mkdirs(parent)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("setting the mode of {}", dir.display())),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(e).with_context(|| format!("creating {}", dir.display())),
    }
}

/// The target subdirectory of a cargo profile.
fn profile_dir(profile: &str) -> &str {
    match profile {
        "dev" | "test" => "debug",
        "bench" => "release",
        other => other,
    }
}

/// Names of lb-userspace's binaries (`src/bin/NAME.rs` or `src/bin/NAME/main.rs`).
fn binary_names() -> Result<Vec<String>> {
    let dir = util::workspace_root().join("lb-userspace/src/bin");
    let mut names = BTreeSet::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        let name = if path.extension().is_some_and(|e| e == "rs") {
            path.file_stem()
        } else if path.join("main.rs").exists() {
            path.file_name()
        } else {
            None
        };
        if let Some(n) = name.and_then(|n| n.to_str()) {
            names.insert(n.to_string());
        }
    }
    ensure!(!names.is_empty(), "no binaries in {}", dir.display());
    Ok(names.into_iter().collect())
}

/// Man pages (section 8) of `cmd` and of each of its visible subcommands (`lbd-decap.8`), as
/// (file name, roff text).
fn man_pages(cmd: clap::Command) -> Result<Vec<(String, Vec<u8>)>> {
    fn walk(cmd: clap::Command, out: &mut Vec<(String, Vec<u8>)>) -> Result<()> {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned() {
            walk(sub, out)?;
        }
        let name = cmd.get_name().to_string();
        let man = clap_mangen::Man::new(cmd)
            .section("8")
            .manual("lb")
            .source(format!("lb {}", env!("CARGO_PKG_VERSION")));
        let mut text = Vec::new();
        man.render(&mut text)?;
        // clap knows the options; what operators also look for (files, exit status, examples)
        // comes from docs.rs, after clap's sections.
        if let Some(extra) = docs::extra_man_sections(&name) {
            text.extend_from_slice(extra.as_bytes());
        }
        out.push((man.get_filename(), text));
        Ok(())
    }
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let mut out = Vec::new();
    walk(cmd, &mut out)?;
    Ok(out)
}

/// Completion script of `cmd` for `shell`.
fn completion(cmd: &clap::Command, shell: Shell) -> Vec<u8> {
    let mut cmd = cmd.clone();
    let name = cmd.get_name().to_string();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, name, &mut out);
    out
}

/// Where `shell` looks for completions of `name`, under `share`.
fn completion_path(share: &Path, prefix: &Path, shell: Shell, name: &str) -> PathBuf {
    match shell {
        Shell::Bash => share.join("bash-completion/completions").join(name),
        // Debian's zsh reads packages' completions from vendor-completions, and local ones
        // from /usr/local/share/zsh/site-functions.
        Shell::Zsh if prefix == Path::new("/usr") => share
            .join("zsh/vendor-completions")
            .join(format!("_{name}")),
        Shell::Zsh => share.join("zsh/site-functions").join(format!("_{name}")),
        Shell::Fish => share
            .join("fish/vendor_completions.d")
            .join(format!("{name}.fish")),
        _ => share.join("completions").join(name),
    }
}

/// The shells completions are installed for.
pub const SHELLS: [Shell; 3] = [Shell::Bash, Shell::Zsh, Shell::Fish];

/// `cargo xtask install`.
pub fn install(args: &InstallArgs) -> Result<()> {
    let prefix = &args.prefix;
    ensure!(
        prefix.is_absolute(),
        "--prefix {} must be an absolute path",
        prefix.display()
    );
    let destdir = match &args.destdir {
        Some(d) => {
            mkdirs(d)?;
            d.canonicalize()
                .with_context(|| format!("resolving {}", d.display()))?
        }
        None => PathBuf::from("/"),
    };
    let root = util::workspace_root();
    let names = binary_names()?;
    if !args.no_build {
        let mut cmd = util::cargo();
        cmd.args(["build", "--profile", &args.profile, "-p", "lb-userspace"]);
        for n in &names {
            cmd.args(["--bin", n]);
        }
        util::run(&mut cmd).context(
            "building the binaries (`cargo xtask setup` installs the eBPF toolchain they need)",
        )?;
    }
    let bin_dir = util::target_dir().join(profile_dir(&args.profile));

    let mut inst = Installer {
        destdir: destdir.clone(),
        log: Vec::new(),
    };
    let sbin = prefix.join("sbin");
    let share = prefix.join("share");
    install_binaries(&mut inst, &bin_dir, &sbin, &names)?;
    install_units(
        &mut inst,
        &root.join("packaging"),
        prefix,
        &sbin.join("lbd"),
    )?;
    install_config(&mut inst, &root.join("packaging"), &share)?;
    let documented = install_docs(&mut inst, prefix, &share, &names)?;

    println!(
        "lb installed to {} (prefix {}, profile {}):",
        destdir.display(),
        prefix.display(),
        args.profile
    );
    inst.print();
    for n in names.iter().filter(|n| !documented.contains(*n)) {
        eprintln!(
            "warning: `{n}` has no man page or completions: its clap Cli is not in \
             lb_userspace::cli::shipped_commands() yet"
        );
    }
    if args.destdir.is_none() {
        if Path::new("/run/systemd/system").exists() {
            util::run(Command::new("systemctl").arg("daemon-reload"))?;
        }
        println!(
            "next: edit {CONFIG_PATH}, check it with `lbd --check`, then `systemctl enable --now lbd`"
        );
    }
    Ok(())
}

/// The built binaries, to PREFIX/sbin.
fn install_binaries(
    inst: &mut Installer,
    bin_dir: &Path,
    sbin: &Path,
    names: &[String],
) -> Result<()> {
    for n in names {
        let built = bin_dir.join(n);
        let content = fs::read(&built).with_context(|| {
            format!("reading {} (build it, or drop --no-build)", built.display())
        })?;
        inst.file(&sbin.join(n), &content, 0o755)?;
    }
    Ok(())
}

/// systemd units, pointing at this prefix's lbd.
fn install_units(
    inst: &mut Installer,
    packaging: &Path,
    prefix: &Path,
    lbd_path: &Path,
) -> Result<()> {
    let mut units: Vec<PathBuf> = fs::read_dir(packaging)
        .with_context(|| format!("listing {}", packaging.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "service"))
        .collect();
    units.sort();
    ensure!(!units.is_empty(), "no units in {}", packaging.display());
    for unit in &units {
        let text =
            fs::read_to_string(unit).with_context(|| format!("reading {}", unit.display()))?;
        let text = text.replace(UNIT_LBD_PATH, &lbd_path.to_string_lossy());
        let name = unit.file_name().expect("a unit file name");
        inst.file(
            &prefix.join("lib/systemd/system").join(name),
            text.as_bytes(),
            0o644,
        )?;
    }
    Ok(())
}

/// Configuration: the operator's file is never replaced; the shipped one is kept for
/// reference.
fn install_config(inst: &mut Installer, packaging: &Path, share: &Path) -> Result<()> {
    let default_config =
        fs::read(packaging.join("lbd.toml")).context("reading packaging/lbd.toml")?;
    inst.config(Path::new(CONFIG_PATH), &default_config)?;
    inst.file(&share.join("lb/lbd.toml"), &default_config, 0o644)?;
    let decap_env = fs::read(packaging.join("decap.env")).context("reading packaging/decap.env")?;
    inst.file(&share.join("lb/decap.env"), &decap_env, 0o644)?;
    // For the monitoring side: import the dashboard into Grafana, load the rules in Prometheus.
    for (from, to) in [
        ("grafana/lb.json", "lb/grafana/lb.json"),
        ("prometheus/lb-rules.yml", "lb/prometheus/lb-rules.yml"),
    ] {
        let content =
            fs::read(packaging.join(from)).with_context(|| format!("reading packaging/{from}"))?;
        inst.file(&share.join(to), &content, 0o644)?;
    }
    // What Debian policy wants in the package's doc directory (the changelog is compressed
    // by `package`, like the man pages).
    let root = packaging
        .parent()
        .context("packaging/ is in the workspace")?;
    for (from, to) in [
        (packaging.join("copyright"), "doc/lb/copyright"),
        (packaging.join("changelog"), "doc/lb/changelog"),
        (root.join("README.md"), "doc/lb/README.md"),
    ] {
        let content = fs::read(&from).with_context(|| format!("reading {}", from.display()))?;
        inst.file(&share.join(to), &content, 0o644)?;
    }
    Ok(())
}

/// Man pages and completions, from the binaries' own clap definitions; returns the binaries
/// that have them.
fn install_docs(
    inst: &mut Installer,
    prefix: &Path,
    share: &Path,
    names: &[String],
) -> Result<BTreeSet<String>> {
    let commands = lb_userspace::cli::shipped_commands();
    let documented: BTreeSet<String> = commands.iter().map(|c| c.get_name().to_string()).collect();
    for cmd in commands {
        let name = cmd.get_name().to_string();
        ensure!(
            names.contains(&name),
            "lb_userspace::cli::shipped_commands() lists `{name}`, which is not a binary of lb-userspace"
        );
        for shell in SHELLS {
            inst.file(
                &completion_path(share, prefix, shell, &name),
                &completion(&cmd, shell),
                0o644,
            )?;
        }
        for (file, text) in man_pages(cmd)? {
            inst.file(&share.join("man/man8").join(file), &text, 0o644)?;
        }
    }
    let keys = docs::keys()?;
    inst.file(
        &share.join("man/man5/lbd.toml.5"),
        docs::lbd_toml_5(&keys).as_bytes(),
        0o644,
    )?;
    Ok(documented)
}

/// The version of lb-userspace (the package's version).
fn version() -> Result<String> {
    let manifest = util::workspace_root().join("lb-userspace/Cargo.toml");
    let text = fs::read_to_string(&manifest)?;
    text.lines()
        .find_map(|l| {
            let v = l.trim().strip_prefix("version")?.trim().strip_prefix('=')?;
            Some(v.trim().trim_matches('"').to_string())
        })
        .with_context(|| format!("no version in {}", manifest.display()))
}

fn command_output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("starting `{}`", util::show(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            util::show(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Shared-library dependencies of the ELF files, as dpkg-shlibdeps computes them
/// (e.g. `libc6 (>= 2.34), libgcc-s1 (>= 4.2)`).
fn shlib_depends(files: &[PathBuf]) -> Result<String> {
    // dpkg-shlibdeps wants to run in a source package; give it the minimum it reads.
    let tmp = util::TempDir::new("shlibdeps")?;
    fs::create_dir_all(tmp.path().join("debian"))?;
    fs::write(
        tmp.path().join("debian/control"),
        format!("Source: {DEB_NAME}\n\nPackage: {DEB_NAME}\nArchitecture: any\n"),
    )?;
    let mut cmd = Command::new("dpkg-shlibdeps");
    cmd.current_dir(tmp.path()).args(["-O", "-e"]).args(files);
    let out = command_output(&mut cmd)
        .context("computing library dependencies (dpkg-shlibdeps, in Debian's dpkg-dev)")?;
    let deps = out
        .lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .with_context(|| format!("unexpected dpkg-shlibdeps output: {out}"))?;
    Ok(deps.to_string())
}

/// Maintainer scripts: systemd learns about (or forgets) the units, if it is running. The
/// service is never enabled or started by the package: it attaches XDP to an interface named
/// in a file the operator has to edit first.
const POSTINST: &str = "#!/bin/sh
set -e
if [ \"$1\" = configure ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
";

const PRERM: &str = "#!/bin/sh
set -e
# On removal (not upgrade), stop the services whose binary is about to go. A pinned
# balancer datapath keeps running; `lbd cleanup` before removal detaches it.
if [ \"$1\" = remove ] && [ -d /run/systemd/system ]; then
    systemctl stop lbd.service 'lbd-decap@*.service' || true
fi
";

const POSTRM: &str = "#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
";

/// `cargo xtask package`: a Debian package of the installed tree.
pub fn package(args: &PackageArgs) -> Result<()> {
    for tool in ["dpkg-deb", "dpkg", "dpkg-shlibdeps", "gzip", "strip"] {
        ensure!(
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|o| o.status.success()),
            "`{tool}` is missing: `apt-get install dpkg-dev gzip binutils`"
        );
    }
    let version = version()?;
    let arch = command_output(Command::new("dpkg").arg("--print-architecture"))?;
    let out_dir = args
        .out
        .clone()
        .unwrap_or_else(|| util::target_dir().join("debian"));
    // The package's tree is staged next to the .deb and removed once the .deb is built.
    let stage = out_dir.join(format!("{DEB_NAME}_{version}_{arch}"));
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("removing {}", stage.display()))?;
    }
    install(&InstallArgs {
        prefix: PathBuf::from("/usr"),
        destdir: Some(stage.clone()),
        profile: args.profile.clone(),
        no_build: args.no_build,
    })?;

    // Debian policy: man pages and the changelog compressed.
    let mut pages: Vec<PathBuf> = Vec::new();
    for section in ["man5", "man8"] {
        let dir = stage.join("usr/share/man").join(section);
        pages.extend(fs::read_dir(&dir)?.filter_map(|e| e.ok().map(|e| e.path())));
    }
    pages.sort();
    pages.push(stage.join("usr/share/doc/lb/changelog"));
    util::run(Command::new("gzip").arg("-9nf").args(&pages))?;

    // Binaries stripped as dh_strip does (Debian policy; lintian's unstripped-binary-or-object
    // is an error): no DWARF, no symbol table, no .comment/.note. Backtraces of the packaged
    // binaries name no functions; `cargo xtask install` keeps the build's symbols. The XDP
    // object embedded in lbd is data, and keeps its BTF.
    let sbin = stage.join("usr/sbin");
    let mut bins: Vec<PathBuf> = fs::read_dir(&sbin)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    bins.sort();
    util::run(
        Command::new("strip")
            .args([
                "--remove-section=.comment",
                "--remove-section=.note",
                "--strip-unneeded",
            ])
            .args(&bins),
    )?;
    // lbd talks netlink itself (no `ip` forks): the C libraries its binaries link are all.
    let depends = shlib_depends(&bins)?;
    let installed_kib = du_kib(&stage)?;

    let debian = stage.join("DEBIAN");
    mkdirs(&debian)?;
    let maintainer = maintainer()?;
    let control = format!(
        "Package: {DEB_NAME}\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: {maintainer}\n\
         Installed-Size: {installed_kib}\n\
         Depends: {depends}\n\
         Section: net\n\
         Priority: optional\n\
         Description: XDP Maglev layer-4 load balancer\n \
         lbd steers every packet for a virtual service to a backend chosen by weighted\n \
         Maglev consistent hashing in an XDP program, keeps each connection on its\n \
         backend, and forwards by IP-in-IP or MAC rewrite (direct server return).\n \
         lbd decap runs on backends to accept the encapsulated packets. Includes the\n \
         systemd units lbd.service and lbd-decap@.service (not enabled).\n"
    );
    let write = |name: &str, text: &str, mode: u32| -> Result<()> {
        let p = debian.join(name);
        fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(mode))?;
        Ok(())
    };
    write("control", &control, 0o644)?;
    write("md5sums", &md5sums(&stage)?, 0o644)?;
    write("conffiles", &format!("{CONFIG_PATH}\n"), 0o644)?;
    write("postinst", POSTINST, 0o755)?;
    write("prerm", PRERM, 0o755)?;
    write("postrm", POSTRM, 0o755)?;

    let deb = out_dir.join(format!("{DEB_NAME}_{version}_{arch}.deb"));
    util::run(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "--build"])
            .arg(&stage)
            .arg(&deb),
    )?;
    fs::remove_dir_all(&stage).with_context(|| format!("removing {}", stage.display()))?;
    println!("package: {}", deb.display());
    Ok(())
}

/// The maintainer: the signature of the newest entry of `packaging/changelog` (Debian's
/// changelog format), so that the package's Maintainer field and its changelog agree.
fn maintainer() -> Result<String> {
    let path = util::workspace_root().join("packaging/changelog");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let version = version()?;
    ensure!(
        text.starts_with(&format!("{DEB_NAME} ({version})")),
        "{}: the newest entry must be for {DEB_NAME} {version} (the package's version); add one",
        path.display()
    );
    text.lines()
        .find_map(|l| l.strip_prefix(" -- "))
        .and_then(|l| l.split_once("  ").map(|(who, _date)| who.to_string()))
        .with_context(|| format!("{}: no ` -- NAME <EMAIL>  DATE` line", path.display()))
}

/// `DEBIAN/md5sums`: `md5sum` of every file of the tree outside `DEBIAN/` and `etc/` (dpkg
/// checks conffiles by their own record), paths relative to the root, sorted.
fn md5sums(stage: &Path) -> Result<String> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        for e in fs::read_dir(dir)? {
            let p = e?.path();
            if fs::symlink_metadata(&p)?.is_dir() {
                walk(&p, out)?;
            } else {
                out.push(p);
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    walk(&stage.join("usr"), &mut files)?;
    files.sort();
    let rel: Vec<&Path> = files
        .iter()
        .map(|f| f.strip_prefix(stage).expect("under the stage"))
        .collect();
    let mut cmd = Command::new("md5sum");
    cmd.current_dir(stage).args(&rel);
    Ok(command_output(&mut cmd)? + "\n")
}

/// Disk usage of a tree in KiB, as Installed-Size wants it.
fn du_kib(dir: &Path) -> Result<u64> {
    fn walk(p: &Path, total: &mut u64) -> Result<()> {
        let meta = fs::symlink_metadata(p)?;
        if meta.is_dir() {
            for e in fs::read_dir(p)? {
                walk(&e?.path(), total)?;
            }
        } else {
            *total += meta.len().div_ceil(1024);
        }
        Ok(())
    }
    let mut total = 0;
    walk(dir, &mut total)?;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_command_has_pages_and_completions() {
        for cmd in lb_userspace::cli::shipped_commands() {
            let pages = man_pages(cmd.clone()).unwrap();
            let name = cmd.get_name().to_string();
            assert!(pages.iter().any(|(f, _)| *f == format!("{name}.8")));
            for (file, text) in &pages {
                let text = String::from_utf8_lossy(text);
                assert!(text.starts_with(".ie"), "{file} is roff");
                assert!(text.contains(".TH"), "{file} has a title");
            }
            for shell in SHELLS {
                let script = String::from_utf8(completion(&cmd, shell)).unwrap();
                assert!(script.contains(&name), "{shell} completion names {name}");
            }
        }
    }

    #[test]
    fn lbd_subcommands_get_their_own_pages() {
        let files: Vec<String> = man_pages(lb_userspace::cli::lbd_command())
            .unwrap()
            .into_iter()
            .map(|(f, _)| f)
            .collect();
        assert!(files.contains(&"lbd-decap.8".to_string()), "{files:?}");
    }

    #[test]
    fn completion_locations() {
        let share = Path::new("/usr/share");
        assert_eq!(
            completion_path(share, Path::new("/usr"), Shell::Zsh, "lbd"),
            Path::new("/usr/share/zsh/vendor-completions/_lbd")
        );
        let local = Path::new("/usr/local/share");
        assert_eq!(
            completion_path(local, Path::new("/usr/local"), Shell::Zsh, "lbd"),
            Path::new("/usr/local/share/zsh/site-functions/_lbd")
        );
        assert_eq!(
            completion_path(local, Path::new("/usr/local"), Shell::Fish, "lbd"),
            Path::new("/usr/local/share/fish/vendor_completions.d/lbd.fish")
        );
    }

    #[test]
    fn profiles_map_to_target_dirs() {
        assert_eq!(profile_dir("dev"), "debug");
        assert_eq!(profile_dir("release"), "release");
    }
}
