//! Pseudo-terminals standing for a target's UART: `openpty`, raw mode on the slave
//! (`cfmakeraw`), the master non-blocking behind tokio's `AsyncFd`. The simulator keeps a slave
//! descriptor open for the pty's whole life so the master never reads EIO when a client (e.g.
//! `stm32flash`) closes its end; clients come and go on the slave's path.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A pseudo-terminal pair: the master as an async byte stream, the slave kept open.
#[derive(Debug)]
pub struct Pty {
    /// The master side, served by the bootloader.
    pub master: PtyMaster,
    /// A slave descriptor held open by the simulator.
    pub slave: OwnedFd,
    /// The slave's path, for clients (e.g. `/dev/pts/3`).
    pub path: PathBuf,
}

/// Open a pseudo-terminal in raw mode. Must run inside a tokio runtime.
pub fn open() -> io::Result<Pty> {
    let pair = nix::pty::openpty(None, None).map_err(io::Error::from)?;
    let mut termios = tcgetattr(&pair.slave).map_err(io::Error::from)?;
    cfmakeraw(&mut termios);
    tcsetattr(&pair.slave, SetArg::TCSANOW, &termios).map_err(io::Error::from)?;
    let path = nix::unistd::ttyname(&pair.slave).map_err(io::Error::from)?;
    let flags = fcntl(&pair.master, FcntlArg::F_GETFL).map_err(io::Error::from)?;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    fcntl(&pair.master, FcntlArg::F_SETFL(flags)).map_err(io::Error::from)?;
    let master = PtyMaster { fd: register(pair.master)? };
    Ok(Pty { master, slave: pair.slave, path })
}

/// Register an owned descriptor with tokio's reactor.
#[allow(unsafe_code)]
fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: `AsyncFd::register` requires that `as_raw_fd()` names a valid open descriptor that
    // stays open and unchanged until the `AsyncFd` is dropped. An `OwnedFd` owns its descriptor
    // (closed only when the `OwnedFd` itself drops, which is inside the `AsyncFd`) and always
    // returns the same number, so the requirement holds by construction.
    unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

/// The master side of a pseudo-terminal as `AsyncRead + AsyncWrite`.
#[derive(Debug)]
pub struct PtyMaster {
    fd: AsyncFd<OwnedFd>,
}

impl AsyncRead for PtyMaster {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|inner| nix::unistd::read(inner.get_ref().as_fd(), unfilled).map_err(io::Error::from)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for PtyMaster {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            match guard.try_io(|inner| nix::unistd::write(inner.get_ref(), data).map_err(io::Error::from)) {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
