//! Terminal output shared by the subcommands: tracing setup, byte formatting, progress bars,
//! aligned text tables ([`Table`]) and timestamps in milliseconds since the epoch ([`ms_time`]).

use std::time::{Duration, UNIX_EPOCH};

use indicatif::{ProgressBar, ProgressStyle};

/// Install a tracing subscriber writing to stderr with the given filter, as text or JSON lines.
pub fn init_tracing(filter: &str, json: bool) {
    let filter =
        tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // Colours only on a terminal: `docker logs`, journald and files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let _ = if json { builder.json().try_init() } else { builder.try_init() };
}

/// An error and its causes on one line, `outer: cause: root cause`, each cause once: the libraries'
/// errors often say their source in their own message as well (`{path}: {source}`), so a cause whose
/// text the line already holds is left out (anyhow's `{:#}` would print `… (os error 2): … (os error 2)`).
pub fn error_text(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.is_empty() {
            out = text;
        } else if !text.is_empty() && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

/// A byte progress bar (hidden when stderr is not a terminal).
pub fn byte_bar(total: u64, prefix: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    let style = ProgressStyle::with_template(
        "{prefix:>12} [{bar:32}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta} {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(prefix.to_string());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// `12.3 KiB`-style size.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[unit]) }
}

/// How a [`Table`] column is aligned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    /// Padded on the right (text).
    Left,
    /// Padded on the left (numbers).
    Right,
}

/// A plain text table: a header row and data rows, columns separated by two spaces and padded to
/// the widest cell (counted in characters). Rows shorter than the header are padded with empty
/// cells; trailing spaces are trimmed.
#[derive(Debug, Clone)]
pub struct Table {
    headers: Vec<String>,
    align: Vec<Align>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers, every column left-aligned.
    pub fn new<I, S>(headers: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let headers: Vec<String> = headers.into_iter().map(Into::into).collect();
        let align = vec![Align::Left; headers.len()];
        Table { headers, align, rows: Vec::new() }
    }

    /// Right-align these columns (0-based; out-of-range indices are ignored).
    pub fn right(mut self, columns: &[usize]) -> Self {
        for &c in columns {
            if let Some(a) = self.align.get_mut(c) {
                *a = Align::Right;
            }
        }
        self
    }

    /// Append a row; cells beyond the header's width are kept and shown left-aligned.
    pub fn row<I, S>(&mut self, cells: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.rows.push(cells.into_iter().map(Into::into).collect());
    }

    /// The table as text, one line per row (header first), each ending in a newline.
    pub fn render(&self) -> String {
        let columns = self.rows.iter().map(Vec::len).chain([self.headers.len()]).max().unwrap_or(0);
        let mut widths = vec![0usize; columns];
        for line in std::iter::once(&self.headers).chain(&self.rows) {
            for (i, cell) in line.iter().enumerate() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for line in std::iter::once(&self.headers).chain(&self.rows) {
            let mut text = String::new();
            for (i, width) in widths.iter().enumerate() {
                let cell = line.get(i).map(String::as_str).unwrap_or("");
                let pad = width - cell.chars().count();
                if i > 0 {
                    text.push_str("  ");
                }
                match self.align.get(i).copied().unwrap_or(Align::Left) {
                    Align::Left => {
                        text.push_str(cell);
                        text.extend(std::iter::repeat_n(' ', pad));
                    }
                    Align::Right => {
                        text.extend(std::iter::repeat_n(' ', pad));
                        text.push_str(cell);
                    }
                }
            }
            out.push_str(text.trim_end());
            out.push('\n');
        }
        out
    }
}

impl std::fmt::Display for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.render())
    }
}

/// Milliseconds since the Unix epoch as RFC 3339 UTC seconds (`2027-05-01T12:00:00Z`); `-` for 0
/// (unset) and the raw number for times before the epoch.
pub fn ms_time(ms: i64) -> String {
    match u64::try_from(ms) {
        Ok(0) => "-".to_string(),
        Ok(ms) => humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string(),
        Err(_) => ms.to_string(),
    }
}

/// A file a command produces: a path, written whole or not at all ([`flashgate_common::atomic_file`]:
/// a device or FIFO is written in place, never replaced), or `-` for standard output.
pub struct OutFile {
    name: String,
    sink: Sink,
}

enum Sink {
    File(std::io::BufWriter<flashgate_common::atomic_file::AtomicFile>),
    Stdout(std::io::BufWriter<std::io::Stdout>),
}

impl OutFile {
    /// Start writing `path` (`-`: standard output); a new regular file gets `mode`.
    pub fn create(path: &std::path::Path, mode: u32) -> anyhow::Result<Self> {
        if path.as_os_str() == "-" {
            return Ok(Self {
                name: "standard output".into(),
                sink: Sink::Stdout(std::io::BufWriter::new(std::io::stdout())),
            });
        }
        let file = flashgate_common::atomic_file::AtomicFile::create(path, mode)?;
        Ok(Self { name: path.display().to_string(), sink: Sink::File(std::io::BufWriter::new(file)) })
    }

    /// Standard output, when no path is given.
    pub fn stdout() -> Self {
        Self { name: "standard output".into(), sink: Sink::Stdout(std::io::BufWriter::new(std::io::stdout())) }
    }

    /// Whether this writes to standard output (messages then go to standard error).
    pub fn is_stdout(&self) -> bool {
        matches!(self.sink, Sink::Stdout(_))
    }

    /// The path, or "standard output".
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Flush, sync and put the file in place.
    pub fn commit(self) -> anyhow::Result<()> {
        use anyhow::Context;
        match self.sink {
            Sink::File(w) => {
                let file =
                    w.into_inner().map_err(|e| e.into_error()).with_context(|| format!("writing {}", self.name))?;
                file.commit()?;
            }
            Sink::Stdout(mut w) => std::io::Write::flush(&mut w).context("writing to standard output")?,
        }
        Ok(())
    }
}

impl std::io::Write for OutFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &mut self.sink {
            Sink::File(w) => w.write(buf),
            Sink::Stdout(w) => w.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.sink {
            Sink::File(w) => w.flush(),
            Sink::Stdout(w) => w.flush(),
        }
    }
}

/// Write a whole file a command produces (`-`: standard output); see [`OutFile`].
pub fn write_out(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut out = OutFile::create(path, flashgate_common::atomic_file::PUBLIC_MODE)?;
    std::io::Write::write_all(&mut out, bytes).map_err(|e| anyhow::anyhow!("writing {}: {e}", out.name()))?;
    out.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let mut t = Table::new(["name", "count", "note"]).right(&[1, 7]);
        t.row(["alpha", "1", "first"]);
        t.row(["b", "12345", ""]);
        t.row(["ünï", "7"]);
        assert_eq!(
            t.render(),
            "name   count  note\n\
             alpha      1  first\n\
             b      12345\n\
             ünï        7\n"
        );
        assert_eq!(Table::new(["a", "b"]).render(), "a  b\n");
    }

    #[test]
    fn extra_cells_get_their_own_column() {
        let mut t = Table::new(["a"]);
        t.row(["x", "extra"]);
        assert_eq!(t.render(), "a\nx  extra\n");
    }

    #[test]
    fn each_cause_once() {
        use anyhow::Context;
        let missing = std::fs::read("/no/such/key.bin").unwrap_err();
        let lib = flashgate_common::keyfile::read_key_file(std::path::Path::new("/no/such/key.bin")).err().unwrap();
        let e = anyhow::Error::new(lib).context("reading firmware key");
        let text = error_text(&e);
        assert_eq!(text.matches(&missing.to_string()).count(), 1, "{text}");
        assert!(text.starts_with("reading firmware key: /no/such/key.bin"), "{text}");
        // Causes that say something new are all kept.
        let e = Err::<(), _>(std::io::Error::other("disk full")).context("writing b").context("saving a").unwrap_err();
        assert_eq!(error_text(&e), "saving a: writing b: disk full");
    }

    #[test]
    fn times() {
        assert_eq!(ms_time(0), "-");
        assert_eq!(ms_time(-5), "-5");
        assert_eq!(ms_time(1_800_000_000_999), "2027-01-15T08:00:00Z");
    }
}
