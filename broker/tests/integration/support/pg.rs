//! A throwaway PostgreSQL cluster for tests: `initdb` + `pg_ctl` in a temporary directory, listening on a free
//! loopback port with its unix socket inside that directory, trust authentication, stopped (immediate) and
//! deleted on drop. When running as root the cluster runs as `nobody` (initdb refuses root).
//!
//! [`PgCluster::start`] returns `None` with a printed reason when the PostgreSQL binaries are missing, unless
//! `FLASHGATE_REQUIRE_POSTGRES=1`, in which case it panics. Binaries are looked up in `FLASHGATE_PG_BIN`, then
//! the newest `/usr/lib/postgresql/*/bin`, then `PATH`.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct PgCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    as_nobody: bool,
    pub port: u16,
}

fn find_bin() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("FLASHGATE_PG_BIN") {
        return Some(PathBuf::from(p));
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    versions.sort_by_key(|p| {
        p.parent().and_then(|v| v.file_name()).and_then(|v| v.to_str()).and_then(|v| v.parse::<u32>().ok()).unwrap_or(0)
    });
    versions.pop()
}

fn find_bin_or_path() -> Option<PathBuf> {
    find_bin().or_else(|| {
        std::env::var_os("PATH")?
            .to_str()?
            .split(':')
            .map(PathBuf::from)
            .find(|d| d.join("initdb").exists() && d.join("pg_ctl").exists())
    })
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

impl PgCluster {
    /// Starts a cluster, or returns `None` (after printing why) when PostgreSQL is not installed.
    pub fn start() -> Option<Self> {
        let required = std::env::var("FLASHGATE_REQUIRE_POSTGRES").is_ok_and(|v| v == "1");
        let Some(bin) = find_bin_or_path() else {
            let why =
                "PostgreSQL binaries (initdb, pg_ctl) not found in FLASHGATE_PG_BIN, /usr/lib/postgresql/*/bin or PATH";
            assert!(!required, "FLASHGATE_REQUIRE_POSTGRES=1 but {why}");
            eprintln!("SKIPPED: {why} (install postgresql to run the multi-broker tests)");
            return None;
        };
        let as_root = std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false);
        let dir = tempfile::Builder::new().prefix("flashgate-pg-").tempdir().expect("temp dir");
        if as_root {
            let st = Command::new("chown").args(["-R", "nobody:nogroup"]).arg(dir.path()).status().expect("chown");
            assert!(st.success(), "chown {} to nobody failed", dir.path().display());
        }
        let c = PgCluster { dir, bin, as_nobody: as_root, port: free_port() };
        c.run(
            "initdb",
            &["-D", &c.data(), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync", "--no-instructions"],
        );
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100",
            c.port,
            c.dir.path().display()
        );
        let log = c.dir.path().join("postgres.log");
        c.run(
            "pg_ctl",
            &["-D", &c.data(), "-o", &opts, "-l", log.to_str().expect("utf-8 path"), "-w", "-t", "60", "start"],
        );
        Some(c)
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn command(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        if self.as_nobody {
            let mut c = Command::new("runuser");
            c.args(["-u", "nobody", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let out = self.command(tool).args(args).current_dir(self.dir.path()).output().expect(tool);
        if !out.status.success() {
            let log = std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default();
            panic!(
                "{tool} {args:?} failed: {}\n{}\n{}\nserver log:\n{log}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// URL of the default database.
    pub fn url(&self) -> String {
        self.url_for("postgres")
    }

    /// URL of database `db` (create it with [`PgCluster::create_db`]).
    pub fn url_for(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates a fresh database and returns its URL.
    pub fn create_db(&self, db: &str) -> String {
        self.run("createdb", &["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres", db]);
        self.url_for(db)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self.command("pg_ctl").args(["-D", &self.data(), "-m", "immediate", "-w", "stop"]).output();
    }
}
