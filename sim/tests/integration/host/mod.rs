//! A minimal AN3155 host for the integration tests (the real client lives in flashgate-agent).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const ACK: u8 = 0x79;

pub struct Host<S> {
    pub io: S,
}

fn xor(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0, |a, b| a ^ b)
}

fn buffer(data: &[u8]) -> Vec<u8> {
    let mut v = (data.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(data);
    v.push(xor(&v));
    v
}

impl<S: AsyncRead + AsyncWrite + Unpin> Host<S> {
    pub fn new(io: S) -> Self {
        Host { io }
    }

    async fn byte(&mut self) -> u8 {
        let mut b = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(30), self.io.read_exact(&mut b))
            .await
            .expect("answer in time")
            .unwrap();
        b[0]
    }

    async fn ack(&mut self) {
        let b = self.byte().await;
        assert_eq!(b, ACK, "expected ACK");
    }

    async fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.byte().await, self.byte().await])
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.io.write_all(bytes).await.unwrap();
    }

    pub async fn sync(&mut self) {
        self.send(&[0x7F]).await;
        self.ack().await;
    }

    /// Special: returns (data, status).
    pub async fn special(&mut self, opcode: u16, data: &[u8]) -> (Vec<u8>, u16) {
        self.send(&[0x50, 0xAF]).await;
        self.ack().await;
        let op = opcode.to_be_bytes();
        self.send(&[op[0], op[1], op[0] ^ op[1]]).await;
        self.ack().await;
        self.send(&buffer(data)).await;
        self.ack().await;
        let n = self.u16().await as usize;
        let mut out = vec![0; n];
        self.io.read_exact(&mut out).await.unwrap();
        assert_eq!(self.u16().await, 2);
        let status = self.u16().await;
        self.ack().await;
        (out, status)
    }

    /// Extended Special: returns the status.
    pub async fn extended(&mut self, opcode: u16, buf1: &[u8], buf2: &[u8]) -> u16 {
        self.send(&[0x51, 0xAE]).await;
        self.ack().await;
        let op = opcode.to_be_bytes();
        self.send(&[op[0], op[1], op[0] ^ op[1]]).await;
        self.ack().await;
        self.send(&buffer(buf1)).await;
        self.ack().await;
        self.send(&buffer(buf2)).await;
        self.ack().await;
        assert_eq!(self.u16().await, 2);
        let status = self.u16().await;
        self.ack().await;
        status
    }

    pub async fn write_memory(&mut self, address: u32, data: &[u8]) {
        self.send(&[0x31, 0xCE]).await;
        self.ack().await;
        let a = address.to_be_bytes();
        self.send(&[a[0], a[1], a[2], a[3], xor(&a)]).await;
        self.ack().await;
        let mut f = vec![(data.len() - 1) as u8];
        f.extend_from_slice(data);
        f.push(xor(&f));
        self.send(&f).await;
        self.ack().await;
    }

    pub async fn read_memory(&mut self, address: u32, len: usize) -> Vec<u8> {
        self.send(&[0x11, 0xEE]).await;
        self.ack().await;
        let a = address.to_be_bytes();
        self.send(&[a[0], a[1], a[2], a[3], xor(&a)]).await;
        self.ack().await;
        let n = (len - 1) as u8;
        self.send(&[n, !n]).await;
        self.ack().await;
        let mut out = vec![0; len];
        self.io.read_exact(&mut out).await.unwrap();
        out
    }

    /// Readout Protect: ACK, (option bytes programmed), ACK; the chip then resets.
    pub async fn io_send_readout_protect(&mut self) {
        self.send(&[0x82, 0x7D]).await;
        self.ack().await;
        self.ack().await;
    }
}
