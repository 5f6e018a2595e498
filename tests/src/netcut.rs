//! A TCP link that a test can cut and restore: a forwarder on an ephemeral loopback port in front of
//! one address. While cut, every open connection is dropped and new ones are closed at once, as a WAN
//! link whose far side stopped answering would end them (the connecting side sees UNAVAILABLE); on
//! restore, connections pass again. The TLS runs end to end through it, so certificates are checked
//! against the real server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The link.
pub struct NetCut {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    generation: watch::Sender<u64>,
    refused: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl NetCut {
    /// A link to `target`, up.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await.expect("bind netcut");
        let addr = listener.local_addr().expect("netcut address");
        let cut = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(AtomicU64::new(0));
        let (generation, _) = watch::channel(0u64);
        let task = {
            let (cut, refused, generation) = (cut.clone(), refused.clone(), generation.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((inbound, _)) = listener.accept().await else { continue };
                    if cut.load(Ordering::SeqCst) {
                        refused.fetch_add(1, Ordering::Relaxed);
                        drop(inbound);
                        continue;
                    }
                    let mut gone = generation.subscribe();
                    tokio::spawn(async move {
                        let Ok(mut outbound) = TcpStream::connect(target).await else { return };
                        let mut inbound = inbound;
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                            _ = gone.changed() => {}
                        }
                    });
                }
            })
        };
        Self { addr, cut, generation, refused, task }
    }

    /// `https://127.0.0.1:PORT` of the link's near end.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Cuts the link: open connections end, new ones are closed.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Restores the link.
    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }

    /// Connections closed while the link was cut.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

impl Drop for NetCut {
    fn drop(&mut self) {
        self.task.abort();
    }
}
