//! Headless Chromium through WebDriver for browser tests: finds Debian's `chromium` and
//! `chromedriver` (skipping with a note when they are missing, unless `FLASHGATE_REQUIRE_CHROMIUM=1`,
//! then failing), starts chromedriver on a free loopback port and speaks the W3C WebDriver protocol
//! to it as plain HTTP/1.1 JSON requests (one connection per command): sessions, navigation, CSS
//! lookups, clicks, scripts and screenshots.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// The W3C element reference key.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";
/// How long one WebDriver command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

fn find(names: &[&str]) -> Option<PathBuf> {
    names.iter().map(PathBuf::from).find(|p| p.exists())
}

/// `chromium` and `chromedriver`, or `None` (skip, with a note) when either is missing and
/// `FLASHGATE_REQUIRE_CHROMIUM=1` is not set (then it panics).
pub fn tools() -> Option<(PathBuf, PathBuf)> {
    let required = std::env::var("FLASHGATE_REQUIRE_CHROMIUM").is_ok_and(|v| v == "1");
    let browser = find(&["/usr/bin/chromium", "/usr/bin/chromium-browser"]);
    let driver = find(&["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]);
    match (browser, driver) {
        (Some(b), Some(d)) => Some((b, d)),
        _ => {
            let reason = "chromium or chromedriver is not installed (apt-get install chromium chromium-driver)";
            assert!(!required, "FLASHGATE_REQUIRE_CHROMIUM=1 but {reason}");
            eprintln!("SKIPPED: {reason}");
            None
        }
    }
}

/// A running chromedriver with one headless Chromium session.
pub struct Browser {
    port: u16,
    session: String,
    driver: Child,
    _profile: tempfile::TempDir,
}

/// One HTTP/1.1 request to chromedriver on 127.0.0.1:`port`; the JSON answer's `value`, or an
/// error with WebDriver's message.
async fn request(port: u16, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
    let mut sock =
        TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| format!("connecting to chromedriver: {e}"))?;
    let body = body.map(Value::to_string).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).await.map_err(|e| e.to_string())?;
    sock.write_all(body.as_bytes()).await.map_err(|e| e.to_string())?;
    // chromedriver says `Connection: close` but keeps the socket open: read by Content-Length.
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let payload = loop {
        let n = sock.read(&mut buf).await.map_err(|e| e.to_string())?;
        raw.extend_from_slice(&buf[..n]);
        if let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let headers = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
            let length = headers
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            let body = &raw[split + 4..];
            match length {
                Some(len) if body.len() >= len => break body[..len].to_vec(),
                None if headers.contains("transfer-encoding: chunked") && body.ends_with(b"0\r\n\r\n") => {
                    break dechunk(body)?;
                }
                None if n == 0 => break body.to_vec(),
                _ => {}
            }
        }
        if n == 0 {
            return Err(format!("{method} {path}: chromedriver closed the connection mid-answer"));
        }
    };
    let v: Value = serde_json::from_slice(&payload).map_err(|e| format!("chromedriver answered no JSON ({e})"))?;
    let value = v.get("value").cloned().unwrap_or(Value::Null);
    if let Some(err) = value.get("error").and_then(Value::as_str) {
        let msg = value.get("message").and_then(Value::as_str).unwrap_or("");
        return Err(format!("{method} {path}: {err}: {msg}"));
    }
    Ok(value)
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n").ok_or("bad chunk")?;
        let size = usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).map_err(|e| e.to_string())?;
        if size == 0 {
            return Ok(out);
        }
        let start = eol + 2;
        out.extend_from_slice(b.get(start..start + size).ok_or("short chunk")?);
        b = b.get(start + size + 2..).ok_or("short chunk")?;
    }
}

/// Standard base64 (screenshots), without the crate.
pub fn base64_decode(s: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes().filter(|c| !c.is_ascii_whitespace() && *c != b'=') {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return Err(format!("not base64: {:?}", c as char)),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Ok(out)
}

impl Browser {
    /// Starts chromedriver (`driver`) and a headless `browser` session with a 1280×1000 window.
    pub async fn start(browser: &Path, driver: &Path) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("starting chromedriver");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(v) = request(port, "GET", "/status", None).await
                && v["ready"].as_bool() == Some(true)
            {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "chromedriver did not become ready within 30 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile = tempfile::tempdir().unwrap();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": browser.display().to_string(),
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1280,1000", "--no-first-run", format!("--user-data-dir={}", profile.path().display())],
            },
        }}});
        let v = tokio::time::timeout(COMMAND_TIMEOUT, request(port, "POST", "/session", Some(&caps)))
            .await
            .expect("new session in time")
            .expect("a WebDriver session");
        let session = v["sessionId"].as_str().expect("sessionId").to_owned();
        Self { port, session, driver: child, _profile: profile }
    }

    async fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let path = format!("/session/{}{path}", self.session);
        tokio::time::timeout(COMMAND_TIMEOUT, request(self.port, method, &path, body.as_ref()))
            .await
            .map_err(|_| format!("{method} {path}: no answer in {COMMAND_TIMEOUT:?}"))?
    }

    /// Opens `url`.
    pub async fn goto(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({"url": url}))).await.expect("navigate");
    }

    /// The first element matching `css`, if any.
    pub async fn find(&self, css: &str) -> Option<String> {
        let v = self.cmd("POST", "/element", Some(json!({"using": "css selector", "value": css}))).await.ok()?;
        v.get(ELEMENT_KEY).and_then(Value::as_str).map(str::to_owned)
    }

    /// Waits (up to `limit`) for an element matching `css`.
    pub async fn wait_for(&self, css: &str, limit: Duration) -> String {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(e) = self.find(css).await {
                return e;
            }
            if tokio::time::Instant::now() >= deadline {
                let page = self.cmd("POST", "/execute/sync", Some(json!({"script": "return document.body.innerText + \"\\n\" + (document.querySelector(\"article\") || document.body).outerHTML.slice(0, 3000);", "args": []}))).await;
                panic!("no element {css:?} within {limit:?}; the page says: {page:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Clicks the element matching `css` (waiting up to 10 s for it).
    pub async fn click(&self, css: &str) {
        let e = self.wait_for(css, Duration::from_secs(10)).await;
        self.cmd("POST", &format!("/element/{e}/click"), Some(json!({})))
            .await
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    /// Runs `script` (a function body) in the page; its return value.
    pub async fn script(&self, script: &str) -> Value {
        self.cmd("POST", "/execute/sync", Some(json!({"script": script, "args": []}))).await.expect("script")
    }

    /// The text of the element matching `css`, if there is one.
    pub async fn text(&self, css: &str) -> Option<String> {
        let e = self.find(css).await?;
        self.cmd("GET", &format!("/element/{e}/text"), None).await.ok()?.as_str().map(str::to_owned)
    }

    /// Saves a PNG screenshot of the window to `path`.
    pub async fn screenshot(&self, path: &Path) {
        let v = self.cmd("GET", "/screenshot", None).await.expect("screenshot");
        let png = base64_decode(v.as_str().expect("base64 screenshot")).expect("screenshot base64");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(path, png).unwrap();
    }

    /// Ends the session and chromedriver.
    pub async fn quit(mut self) {
        let _ = self.cmd("DELETE", "", None).await;
        let _ = self.driver.kill().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_and_chunks() {
        assert_eq!(base64_decode("aGVsbG8gd29ybGQ=").unwrap(), b"hello world");
        assert_eq!(base64_decode("iVBORw0KGgo=").unwrap(), b"\x89PNG\r\n\x1a\n");
        assert!(base64_decode("a*b").is_err());
        assert_eq!(dechunk(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n").unwrap(), b"hello world");
    }
}
