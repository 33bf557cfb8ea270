//! A UDP socket wrapper for tests that loses, delays and throttles the
//! packets it sends, under QUIC, since this machine has no netem.
//!
//! Faults apply to packets this socket *sends*; give both endpoints a faulty
//! socket for faults in both directions.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use quinn::udp::{EcnCodepoint, RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// What a [`FaultySocket`] does to the packets it sends.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultConfig {
    /// Probability (0 to 1) that a packet is dropped.
    pub loss: f64,
    /// Extra one-way delay for every packet.
    pub delay: Duration,
    /// Link rate in bytes per second: packets queue behind each other, and
    /// a packet that would wait more than [`MAX_QUEUE_DELAY`] is dropped.
    pub rate: Option<u64>,
    /// Seed of the loss decisions, for repeatable runs.
    pub seed: u64,
}

impl Default for FaultConfig {
    fn default() -> Self {
        FaultConfig {
            loss: 0.0,
            delay: Duration::ZERO,
            rate: None,
            seed: 0,
        }
    }
}

/// The longest a packet waits in a throttled socket's queue before it is
/// dropped (the "router buffer").
pub const MAX_QUEUE_DELAY: Duration = Duration::from_millis(50);

/// A packet held back until its departure time.
struct Delayed {
    at: Instant,
    destination: SocketAddr,
    ecn: Option<EcnCodepoint>,
    src_ip: Option<IpAddr>,
    contents: Vec<u8>,
}

struct State {
    rng: StdRng,
    /// When the simulated link is free to start sending the next packet.
    link_free: Instant,
}

/// A [`quinn::AsyncUdpSocket`] that wraps the real one (tokio's, with
/// quinn-udp's batching) and applies a [`FaultConfig`] to outgoing packets.
///
/// Build an endpoint on it with [`quinn::Endpoint::new_with_abstract_socket`],
/// or let [`crate::Endpoint::bind`] do it when
/// [`crate::EndpointConfig::fault`] is set.
pub struct FaultySocket {
    inner: Arc<dyn AsyncUdpSocket>,
    config: FaultConfig,
    state: Mutex<State>,
    queue: Option<mpsc::UnboundedSender<Delayed>>,
}

impl fmt::Debug for FaultySocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultySocket")
            .field("inner", &self.inner)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl FaultySocket {
    /// Wrap a bound UDP socket. Must be called inside a tokio runtime.
    pub fn new(socket: std::net::UdpSocket, config: FaultConfig) -> io::Result<Arc<Self>> {
        let runtime = quinn::TokioRuntime;
        let inner = quinn::Runtime::wrap_udp_socket(&runtime, socket)?;
        Ok(Self::wrap(inner, config))
    }

    /// Wrap a socket that quinn already wraps.
    pub fn wrap(inner: Arc<dyn AsyncUdpSocket>, config: FaultConfig) -> Arc<Self> {
        let queue = if config.delay > Duration::ZERO || config.rate.is_some() {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(send_later(inner.clone(), rx));
            Some(tx)
        } else {
            None
        };
        Arc::new(FaultySocket {
            state: Mutex::new(State {
                rng: StdRng::seed_from_u64(config.seed),
                link_free: Instant::now(),
            }),
            inner,
            config,
            queue,
        })
    }

    /// Decide one packet's fate: `None` to drop it, or its departure time
    /// (`Some(None)` for "now, without queueing").
    fn schedule(&self, len: usize) -> Option<Option<Instant>> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if self.config.loss > 0.0 && state.rng.gen_bool(self.config.loss.clamp(0.0, 1.0)) {
            return None;
        }
        if self.queue.is_none() {
            return Some(None);
        }
        let now = Instant::now();
        let mut depart = now;
        if let Some(rate) = self.config.rate {
            let start = state.link_free.max(now);
            if start.duration_since(now) > MAX_QUEUE_DELAY {
                return None;
            }
            let serialize = Duration::from_secs_f64(len as f64 / rate.max(1) as f64);
            state.link_free = start + serialize;
            depart = state.link_free;
        }
        Some(Some(depart + self.config.delay))
    }
}

async fn send_later(socket: Arc<dyn AsyncUdpSocket>, mut rx: mpsc::UnboundedReceiver<Delayed>) {
    let mut poller = socket.clone().create_io_poller();
    while let Some(packet) = rx.recv().await {
        tokio::time::sleep_until(packet.at).await;
        let transmit = Transmit {
            destination: packet.destination,
            ecn: packet.ecn,
            contents: &packet.contents,
            segment_size: None,
            src_ip: packet.src_ip,
        };
        // a few tries if the socket buffer is full; then the packet is lost
        for _ in 0..3 {
            match socket.try_send(&transmit) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let writable = std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx));
                    if writable.await.is_err() {
                        break;
                    }
                }
                _ => break,
            }
        }
    }
}

impl AsyncUdpSocket for FaultySocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        // max_transmit_segments is 1, so a transmit is one datagram
        match self.schedule(transmit.contents.len()) {
            None => Ok(()),
            Some(None) => self.inner.try_send(transmit),
            Some(Some(at)) => {
                if let Some(queue) = &self.queue {
                    let _ = queue.send(Delayed {
                        at,
                        destination: transmit.destination,
                        ecn: transmit.ecn,
                        src_ip: transmit.src_ip,
                        contents: transmit.contents.to_vec(),
                    });
                }
                Ok(())
            }
        }
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        1
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}
