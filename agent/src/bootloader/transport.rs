//! Byte transports to a bootloader: a raw TCP stream standing for a UART (as ser2net exposes
//! one), a serial port (8 data bits, even parity, 1 stop bit, raw), or anything in memory that is
//! `AsyncRead + AsyncWrite` (tests, the simulator's in-memory target). Owns [`TargetAddr`], the
//! parsed form of `tcp://host:port` and `serial:/dev/ttyUSB0?baud=115200`, and [`connect`].

use std::fmt;
use std::str::FromStr;

use tokio::io::{AsyncRead, AsyncWrite};

use super::error::{AddrError, BootloaderError};

/// A byte stream to a bootloader. Blanket-implemented for every suitable stream, so a
/// `tokio::net::TcpStream`, a `tokio_serial::SerialStream` or a `tokio::io::DuplexStream` all are.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + ?Sized> Transport for T {}

/// Parity of a serial line. AN3155 requires even parity; `None` exists for pseudo-terminals
/// (which cannot carry parity) and for bridges that strip it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SerialParity {
    /// Even parity, as the STM32 bootloader requires.
    #[default]
    Even,
    /// No parity bit.
    None,
}

/// Where a bootloader is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetAddr {
    /// A raw TCP byte stream, `host:port` (e.g. a ser2net port or the simulator).
    Tcp(String),
    /// A local serial port.
    Serial {
        /// Device path, e.g. `/dev/ttyUSB0`.
        path: String,
        /// Baud rate.
        baud: u32,
        /// Parity (even unless `parity=none` was given).
        parity: SerialParity,
    },
}

/// Default baud rate of a serial target: 115200, ST's highest tested rate.
pub const DEFAULT_BAUD: u32 = 115_200;

impl TargetAddr {
    /// The baud rate of the line, when this address names one.
    pub fn baud(&self) -> Option<u32> {
        match self {
            TargetAddr::Tcp(_) => None,
            TargetAddr::Serial { baud, .. } => Some(*baud),
        }
    }
}

impl fmt::Display for TargetAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetAddr::Tcp(hostport) => write!(f, "tcp://{hostport}"),
            TargetAddr::Serial { path, baud, parity } => {
                write!(f, "serial:{path}?baud={baud}")?;
                if *parity == SerialParity::None {
                    f.write_str("&parity=none")?;
                }
                Ok(())
            }
        }
    }
}

impl FromStr for TargetAddr {
    type Err = AddrError;

    /// Parse `tcp://HOST:PORT` (IPv6 hosts in brackets) or
    /// `serial:PATH[?baud=N][&parity=even|none]` (`serial://PATH` is accepted too).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let part = |part: &'static str, value: &str, reason: &'static str| AddrError::Part {
            addr: s.to_string(),
            part,
            value: value.to_string(),
            reason,
        };
        if let Some(rest) = s.strip_prefix("tcp://") {
            let rest = rest.strip_suffix('/').unwrap_or(rest);
            let Some((host, port)) = rest.rsplit_once(':') else {
                return Err(part("port", rest, "missing; write tcp://HOST:PORT"));
            };
            let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
            if bare.is_empty() {
                return Err(part("host", host, "is empty"));
            }
            if bare.contains(['/', '?', '@', ' ']) || (bare.contains(':') && bare == host) {
                return Err(part("host", host, "is not a host name or IP address (IPv6 needs brackets)"));
            }
            match port.parse::<u16>() {
                Ok(p) if p > 0 => {}
                _ => return Err(part("port", port, "is not a port number 1-65535")),
            }
            return Ok(TargetAddr::Tcp(rest.to_string()));
        }
        if let Some(rest) = s.strip_prefix("serial:") {
            let rest = rest.strip_prefix("//").unwrap_or(rest);
            let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
            if path.is_empty() {
                return Err(part("path", path, "is empty; write serial:/dev/ttyUSB0"));
            }
            let mut baud = DEFAULT_BAUD;
            let mut parity = SerialParity::Even;
            for kv in query.split('&').filter(|kv| !kv.is_empty()) {
                let (key, value) = kv.split_once('=').unwrap_or((kv, ""));
                match key {
                    "baud" => match value.parse::<u32>() {
                        Ok(b) if b > 0 => baud = b,
                        _ => return Err(part("baud", value, "is not a positive number")),
                    },
                    "parity" => {
                        parity = match value.to_ascii_lowercase().as_str() {
                            "even" => SerialParity::Even,
                            "none" => SerialParity::None,
                            _ => return Err(part("parity", value, "must be even or none")),
                        }
                    }
                    _ => return Err(part("option", kv, "unknown (expected baud= or parity=)")),
                }
            }
            return Ok(TargetAddr::Serial { path: path.to_string(), baud, parity });
        }
        Err(AddrError::Scheme { addr: s.to_string() })
    }
}

/// Open the transport a [`TargetAddr`] names. TCP streams get `TCP_NODELAY` (every frame is
/// written whole, and the protocol waits for an ACK after each); serial ports are opened raw with
/// 8 data bits, the configured parity, 1 stop bit and no flow control.
pub async fn connect(target: &TargetAddr) -> Result<Box<dyn Transport>, BootloaderError> {
    let connect_err = |error: std::io::Error| BootloaderError::Connect { target: target.to_string(), error };
    match target {
        TargetAddr::Tcp(hostport) => {
            let stream = tokio::net::TcpStream::connect(hostport.as_str()).await.map_err(connect_err)?;
            stream.set_nodelay(true).map_err(connect_err)?;
            Ok(Box::new(stream))
        }
        TargetAddr::Serial { path, baud, parity } => {
            use tokio_serial::{DataBits, FlowControl, Parity, SerialPortBuilderExt, StopBits};
            let port = tokio_serial::new(path.as_str(), *baud)
                .data_bits(DataBits::Eight)
                .parity(match parity {
                    SerialParity::Even => Parity::Even,
                    SerialParity::None => Parity::None,
                })
                .stop_bits(StopBits::One)
                .flow_control(FlowControl::None)
                .open_native_async()
                .map_err(|e| connect_err(std::io::Error::from(e)))?;
            Ok(Box::new(port))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_tcp_and_serial() {
        assert_eq!("tcp://127.0.0.1:7000".parse::<TargetAddr>().unwrap(), TargetAddr::Tcp("127.0.0.1:7000".into()));
        assert_eq!("tcp://[::1]:7000".parse::<TargetAddr>().unwrap(), TargetAddr::Tcp("[::1]:7000".into()));
        assert_eq!("tcp://sim.local:7000/".parse::<TargetAddr>().unwrap(), TargetAddr::Tcp("sim.local:7000".into()));
        assert_eq!(
            "serial:/dev/ttyUSB0?baud=115200".parse::<TargetAddr>().unwrap(),
            TargetAddr::Serial { path: "/dev/ttyUSB0".into(), baud: 115_200, parity: SerialParity::Even }
        );
        let pty: TargetAddr = "serial:///dev/pts/3?baud=57600&parity=none".parse().unwrap();
        assert_eq!(pty, TargetAddr::Serial { path: "/dev/pts/3".into(), baud: 57_600, parity: SerialParity::None });
        assert_eq!(pty.to_string(), "serial:/dev/pts/3?baud=57600&parity=none");
        assert_eq!(pty.to_string().parse::<TargetAddr>().unwrap(), pty);
        assert_eq!("serial:COM3".parse::<TargetAddr>().unwrap().baud(), Some(DEFAULT_BAUD));
    }

    #[test]
    fn errors_name_the_bad_part() {
        let err = |s: &str| s.parse::<TargetAddr>().unwrap_err().to_string();
        assert_eq!(
            err("tcp://host:99999"),
            "target address \"tcp://host:99999\": port \"99999\": is not a port number 1-65535"
        );
        assert_eq!(err("tcp://:7000"), "target address \"tcp://:7000\": host \"\": is empty");
        assert!(err("tcp://host").contains("port \"host\": missing"));
        assert!(err("tcp://::1:70").contains("IPv6 needs brackets"));
        assert_eq!(
            err("serial:/dev/ttyS0?baud=fast"),
            "target address \"serial:/dev/ttyS0?baud=fast\": baud \"fast\": is not a positive number"
        );
        assert!(err("serial:/dev/ttyS0?parity=odd").contains("parity \"odd\": must be even or none"));
        assert!(err("serial:/dev/ttyS0?speed=1").contains("option \"speed=1\": unknown"));
        assert!(err("serial:?baud=9600").contains("path \"\": is empty"));
        assert!(err("usb:0483:df11").contains("unknown scheme"));
    }

    #[tokio::test]
    async fn connect_reports_the_target() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let target: TargetAddr = format!("tcp://127.0.0.1:{port}").parse().unwrap();
        let accept = tokio::spawn(async move { listener.accept().await.map(|_| ()) });
        assert!(connect(&target).await.is_ok());
        accept.await.unwrap().unwrap();
        let missing = TargetAddr::Serial {
            path: "/dev/flashgate-no-such-port".into(),
            baud: 115_200,
            parity: SerialParity::Even,
        };
        let e = connect(&missing).await.err().unwrap().to_string();
        assert!(e.starts_with("cannot connect to serial:/dev/flashgate-no-such-port"), "{e}");
    }
}
