//! Every `unsafe` block of xlb lives here (Firecracker's rule: each with a SAFETY note).
//!
//! The main tenant is [`WorkerIo`]: one worker's UMEM shared by its AF_XDP sockets (one
//! per served interface, all on the worker's queue, `XDP_SHARED_UMEM` across devices), so
//! a frame received on one interface can be transmitted on another without a copy.
//!
//! # Frame ownership (the invariant every SAFETY note below relies on)
//! Each UMEM frame descriptor is, at any time, in exactly one of: `free` (userspace, idle),
//! `batch` (userspace, being processed), `pending` of a port (userspace, waiting for room
//! in a TX ring), a fill ring, an RX ring, a TX ring or a completion ring (kernel). The
//! descriptors are moved between these places only by the methods below, which never
//! duplicate or leak one: fill ring ← free, RX → batch, batch → pending | free, pending →
//! TX ring, completion ring → free. Only descriptors in `batch` are ever dereferenced,
//! so userspace never touches memory the kernel may be writing.

use std::io;
use std::num::NonZeroU32;
use std::os::fd::{AsRawFd, RawFd};
use xsk_rs::config::{
    BindFlags, FrameSize, LibxdpFlags, QueueSize, SocketConfig, UmemConfig, XdpFlags,
};
use xsk_rs::{CompQueue, FillQueue, FrameDesc, RxQueue, Socket, TxQueue, Umem};

// SAFETY: `Endpoint` and `SnatRange` are `#[repr(C)]`, contain only integer fields with
// no padding (sizes asserted in abi.rs), so every bit pattern is valid and they can be
// copied to and from BPF maps byte for byte.
unsafe impl aya::Pod for crate::abi::Endpoint {}
// SAFETY: as above.
unsafe impl aya::Pod for crate::abi::SnatRange {}
// SAFETY: as above (`Iface` spells its padding out as a zeroed field).
unsafe impl aya::Pod for crate::abi::Iface {}
// SAFETY: as above: two `repr(C)` plain-data fields, 20 bytes, no padding.
unsafe impl aya::Pod for crate::abi::IfaceCached {}

/// A fast-path map key (`struct xlb_fkey`) as aya's maps take it.
#[repr(transparent)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FpKey(pub flowrec::FlowKey);
/// A fast-path map value (`struct xlb_fp_value`).
#[repr(transparent)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FpValue(pub flowrec::FlowEntry);
// SAFETY: `flowrec::FlowKey` and `flowrec::FlowEntry` are `#[repr(C)]` structs of integers
// and byte arrays whose padding is spelt out as fields (sizes and offsets asserted in
// flowrec and in xdp/bpf/flowrec.h), so every bit pattern is valid and they copy to and
// from BPF maps byte for byte; the newtypes are `repr(transparent)`.
unsafe impl aya::Pod for FpKey {}
// SAFETY: as above.
unsafe impl aya::Pod for FpValue {}

/// CLOCK_MONOTONIC in ns (`bpf_ktime_get_ns`'s clock): lbd stamps the fast path's clock
/// with it (`fp_clock`, what entries' `last_seen` is), and workers compare with it.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Lift RLIMIT_MEMLOCK so UMEMs and BPF maps can be locked (kernels before 5.11 charge
/// BPF maps to it; UMEMs count against it unless the process has CAP_IPC_LOCK). Callers
/// treat failure as a warning: with CAP_IPC_LOCK on a 5.11+ kernel the limit is moot.
pub fn raise_memlock_limit() -> io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads a valid, initialised rlimit struct we own for the call.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Raise the soft limit on open files to the hard limit (control connections, sockets,
/// netlink and BPF maps all take descriptors; a default soft limit of 1024 would let
/// idle clients lock operators out). Returns the new soft limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the rlimit struct we own for the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: setrlimit reads a valid, initialised rlimit struct we own for the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(lim.rlim_cur)
}

/// Counters in one socket's `XDP_STATISTICS` (see [`WorkerIo::kernel_stats`]).
pub const XSK_STATS: usize = 6;
/// Their names, in order.
pub const XSK_STAT_NAMES: [&str; XSK_STATS] = [
    "rx_dropped",
    "rx_invalid_descs",
    "tx_invalid_descs",
    "rx_ring_full",
    "rx_fill_ring_empty_descs",
    "tx_ring_empty_descs",
];

/// `SOL_XDP` and `XDP_MAX_TX_SKB_BUDGET` (linux/if_xdp.h, Linux 6.17+).
const SOL_XDP: libc::c_int = 283;
const XDP_MAX_TX_SKB_BUDGET: libc::c_int = 9;

/// Let one `sendto()` on a copy-mode socket transmit up to `budget` frames instead of the
/// kernel's default 32 (Documentation/networking/af_xdp.rst, range 32..=TX ring size).
/// Older kernels answer ENOPROTOOPT: they keep 32.
fn set_tx_budget(fd: RawFd, budget: u32) -> io::Result<()> {
    // SAFETY: setsockopt reads `size_of::<u32>()` bytes from a live local u32; `fd` is
    // an open AF_XDP socket owned by the caller for the duration of the call.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            SOL_XDP,
            XDP_MAX_TX_SKB_BUDGET,
            (&budget as *const u32).cast(),
            std::mem::size_of::<u32>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sizes of one worker's UMEM and rings.
#[derive(Debug, Clone, Copy)]
pub struct IoConfig {
    pub frame_size: u32,
    pub ring_size: u32,
    /// Most frames taken from one RX ring per batch.
    pub batch: usize,
}

impl Default for IoConfig {
    fn default() -> Self {
        IoConfig {
            frame_size: 2048,
            ring_size: 2048,
            batch: 64,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("bad AF_XDP configuration: {0}")]
    Config(String),
    #[error("creating the UMEM for queue {queue}: {source}")]
    Umem {
        queue: u32,
        source: xsk_rs::umem::UmemCreateError,
    },
    #[error("creating the AF_XDP socket on {iface} queue {queue}: {source}")]
    Socket {
        iface: String,
        queue: u32,
        source: xsk_rs::socket::SocketCreateError,
    },
    #[error("interface name {0:?} is invalid")]
    Iface(String),
    #[error("the kernel returned no fill/completion rings for {iface} queue {queue}")]
    NoRings { iface: String, queue: u32 },
}

struct Port {
    tx: TxQueue,
    rx: RxQueue,
    fq: FillQueue,
    cq: CompQueue,
    /// Frames waiting for room in the TX ring (bounded by the ring size).
    pending: Vec<FrameDesc>,
    /// Frames handed to the fill ring and not yet back through RX.
    in_fill: u32,
    /// Frames handed to the TX ring and not yet back through completion.
    in_tx: u32,
}

/// One processed frame of the current batch and where it came from.
#[derive(Clone, Copy)]
struct Slot {
    desc: FrameDesc,
    done: bool,
    /// For a frame that was held before: when it must be given up (kept across holds,
    /// so re-holding never extends a frame's wait).
    deadline: Option<u64>,
    /// Workers that looked for this frame's flow before it came here (hand-off probes).
    hops: u8,
}

impl Slot {
    fn new(desc: FrameDesc) -> Slot {
        Slot {
            desc,
            done: false,
            deadline: None,
            hops: 0,
        }
    }
}

/// One worker's AF_XDP I/O: a UMEM and one socket per served interface.
pub struct WorkerIo {
    umem: Umem,
    ports: Vec<Port>,
    free: Vec<FrameDesc>,
    batch: Vec<Slot>,
    /// Frames awaiting a neighbour, with the time (ns) after which they are dropped.
    held: Vec<(FrameDesc, u64, u8)>,
    scratch: Vec<FrameDesc>,
    cfg: IoConfig,
}

/// Most frames held for neighbour resolution per worker.
pub const MAX_HELD: usize = 256;

impl std::fmt::Debug for WorkerIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerIo")
            .field("ports", &self.ports.len())
            .field("free", &self.free.len())
            .finish()
    }
}

/// TX-ring and fill-ring activity of one flush, for the caller's counters.
#[derive(Debug, Default, Clone, Copy)]
pub struct FlushResult {
    pub sent: u32,
}

impl WorkerIo {
    /// Bind one socket per interface on `queue`, sharing one UMEM. The XDP program must
    /// already be attached (we inhibit libxdp's own program load).
    pub fn new(ifaces: &[String], queue: u32, cfg: IoConfig) -> Result<WorkerIo, IoError> {
        let bad = |e: &dyn std::fmt::Display| IoError::Config(e.to_string());
        let ring = QueueSize::new(cfg.ring_size).map_err(|e| bad(&e))?;
        let umem_cfg = UmemConfig::builder()
            .frame_size(FrameSize::new(cfg.frame_size).map_err(|e| bad(&e))?)
            .fill_queue_size(ring)
            .comp_queue_size(ring)
            .build()
            .map_err(|e| bad(&e))?;
        // Per port: a full fill ring, a full TX ring and a full pending list may all hold
        // frames at once; one batch more on top.
        let frames = ifaces.len() as u32 * cfg.ring_size * 3 + cfg.batch as u32 * 2;
        let frames =
            NonZeroU32::new(frames).ok_or_else(|| IoError::Config("no interfaces".into()))?;
        let (umem, descs) =
            Umem::new(umem_cfg, frames, false).map_err(|source| IoError::Umem { queue, source })?;
        let sock_cfg = SocketConfig::builder()
            .rx_queue_size(ring)
            .tx_queue_size(ring)
            .libxdp_flags(LibxdpFlags::XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD)
            .xdp_flags(XdpFlags::empty())
            .bind_flags(BindFlags::XDP_USE_NEED_WAKEUP)
            .build();
        let mut ports = Vec::with_capacity(ifaces.len());
        for name in ifaces {
            let iface = name.parse().map_err(|_| IoError::Iface(name.clone()))?;
            // SAFETY: xsk-rs requires INHIBIT_PROG_LOAD when sharing a UMEM on an already
            // bound (iface, queue) pair; we set it, and each (iface, queue) is bound once.
            let (tx, rx, fq_cq) =
                unsafe { Socket::new(sock_cfg, &umem, &iface, queue) }.map_err(|source| {
                    IoError::Socket {
                        iface: name.clone(),
                        queue,
                        source,
                    }
                })?;
            let (fq, cq) = fq_cq.ok_or_else(|| IoError::NoRings {
                iface: name.clone(),
                queue,
            })?;
            if let Err(e) = set_tx_budget(tx.fd().as_raw_fd(), cfg.ring_size) {
                tracing::debug!(iface = %name, queue, error = %e, "XDP_MAX_TX_SKB_BUDGET not set (kernel default 32 applies)");
            }
            ports.push(Port {
                tx,
                rx,
                fq,
                cq,
                pending: Vec::with_capacity(cfg.ring_size as usize),
                in_fill: 0,
                in_tx: 0,
            });
        }
        let mut io = WorkerIo {
            umem,
            ports,
            free: descs,
            // Room for a batch from every port, the hand-off rings and the held frames, so
            // the batch never reallocates.
            batch: Vec::with_capacity(cfg.batch * (ifaces.len() + 64) + MAX_HELD),
            held: Vec::with_capacity(MAX_HELD),
            scratch: Vec::with_capacity(cfg.ring_size as usize),
            cfg,
        };
        io.scratch
            .resize(cfg.ring_size as usize, FrameDesc::default());
        io.refill();
        Ok(io)
    }

    /// The socket fd of each port, for the XSKMAP and for poll().
    pub fn fds(&self) -> Vec<RawFd> {
        self.ports.iter().map(|p| p.rx.fd().as_raw_fd()).collect()
    }

    pub fn ports(&self) -> usize {
        self.ports.len()
    }

    /// The kernel's drop counters of each socket (`XDP_STATISTICS`, in port order):
    /// rx_dropped, rx_invalid_descs, tx_invalid_descs, rx_ring_full,
    /// rx_fill_ring_empty_descs, tx_ring_empty_descs. A socket whose query fails reads
    /// as zeros. One getsockopt per socket: call it about once a second, not per batch.
    pub fn kernel_stats(&self) -> impl Iterator<Item = [u64; XSK_STATS]> + '_ {
        self.ports.iter().map(|p| match p.rx.fd().xdp_statistics() {
            Ok(s) => [
                s.rx_dropped(),
                s.rx_invalid_descs(),
                s.tx_invalid_descs(),
                s.rx_ring_full(),
                s.rx_fill_ring_empty_descs(),
                s.tx_ring_empty_descs(),
            ],
            Err(_) => [0; XSK_STATS],
        })
    }

    /// Completion rings → free; then top up every fill ring from free, in one produce per
    /// ring, never offering more than the ring has room for.
    pub fn refill(&mut self) {
        for p in &mut self.ports {
            let n = p.cq.nb_avail(self.cfg.ring_size) as usize;
            if n > 0 {
                // SAFETY: `scratch` entries are plain descriptors we overwrite; consume
                // returns frames the kernel has finished transmitting (ownership rule:
                // completion ring → free).
                let got = unsafe { p.cq.consume(&mut self.scratch[..n]) };
                self.free.extend_from_slice(&self.scratch[..got]);
                p.in_tx -= got as u32;
            }
        }
        for p in &mut self.ports {
            let want =
                (self.cfg.ring_size - p.in_fill).min(p.fq.nb_free(self.cfg.ring_size)) as usize;
            let n = want.min(self.free.len());
            if n == 0 {
                continue;
            }
            let start = self.free.len() - n;
            // SAFETY: the last `n` descriptors of `free` are idle userspace frames of this
            // UMEM; `n` ≤ nb_free so produce takes all of them (it is all-or-nothing), and
            // we drop them from `free` right after (ownership rule: free → fill ring).
            let put = unsafe { p.fq.produce(&self.free[start..]) };
            if put == n {
                self.free.truncate(start);
                p.in_fill += n as u32;
            }
        }
    }

    /// Take up to `cfg.batch` received frames from port `port` into the batch.
    pub fn receive(&mut self, port: usize) -> usize {
        let Some(p) = self.ports.get_mut(port) else {
            return 0;
        };
        let max = self.cfg.batch;
        let n = p.rx.nb_avail(max as u32) as usize;
        if n == 0 {
            return 0;
        }
        let base = self.batch.len();
        self.batch.resize(base + n, Slot::new(FrameDesc::default()));
        self.scratch[..n]
            .iter_mut()
            .for_each(|d| *d = FrameDesc::default());
        // SAFETY: consume fills `scratch` with descriptors of frames the kernel has
        // written and released to us (ownership rule: RX ring → batch).
        let got = unsafe { p.rx.consume(&mut self.scratch[..n]) };
        for (slot, d) in self.batch[base..base + got]
            .iter_mut()
            .zip(&self.scratch[..got])
        {
            *slot = Slot::new(*d);
        }
        self.batch.truncate(base + got);
        p.in_fill -= got as u32;
        got
    }

    /// Copy `bytes` into a free frame appended to the batch (a frame handed over by
    /// another worker, after `hops` workers looked for its flow). False if no frame is
    /// free or the bytes do not fit.
    pub fn inject(&mut self, bytes: &[u8], hops: u8) -> bool {
        let Some(desc) = self.free_frame_with(bytes) else {
            return false;
        };
        self.batch.push(Slot {
            hops,
            ..Slot::new(desc)
        });
        true
    }

    /// A free frame holding a copy of `bytes`, or None if no frame is free or the bytes
    /// do not fit one.
    fn free_frame_with(&mut self, bytes: &[u8]) -> Option<FrameDesc> {
        if bytes.len() > self.cfg.frame_size as usize - 256 {
            return None;
        }
        let mut desc = self.free.pop()?;
        // SAFETY: `desc` came from `free`, so no ring and no other slot refers to it.
        let mut data = unsafe { self.umem.data_mut(&mut desc) };
        let mut cur = data.cursor();
        cur.set_pos(0);
        if io::Write::write_all(&mut cur, bytes).is_err() {
            self.free.push(desc);
            return None;
        }
        Some(desc)
    }

    /// Replace batch frame `i`'s bytes with `bytes` (another packet to send in its
    /// place, which may be longer). False, and the frame is unchanged, if it does not fit.
    pub fn replace(&mut self, i: usize, bytes: &[u8]) -> bool {
        if bytes.len() > self.cfg.frame_size as usize - 256 {
            return false;
        }
        let Some(slot) = self.batch.get_mut(i) else {
            return false;
        };
        // SAFETY: descriptors in `batch` are owned by userspace (ownership rule); the
        // exclusive borrow of `self` means no other reference to the frame exists.
        let mut data = unsafe { self.umem.data_mut(&mut slot.desc) };
        let mut cur = data.cursor();
        cur.set_pos(0);
        io::Write::write_all(&mut cur, bytes).is_ok()
    }

    /// Grow batch frame `i` in place for an encapsulation: put `bytes` at offset `at`,
    /// followed by the `keep` bytes that were there (what lies after them, Ethernet
    /// padding, goes). False, and the frame is unchanged, if the frame is shorter than
    /// `at + keep` or its data segment has no room.
    ///
    /// xsk-rs 0.11 keeps a descriptor's address private, so the packet cannot start
    /// earlier in the frame's headroom (what `bpf_xdp_adjust_head` does in XDP): the
    /// `keep` bytes move up instead, one copy of the IP packet. Only packets of DSR
    /// tunnel flows not yet in the XDP fast path pay it.
    pub fn insert(&mut self, i: usize, at: usize, bytes: &[u8], keep: usize) -> bool {
        let Some(slot) = self.batch.get_mut(i) else {
            return false;
        };
        // SAFETY: descriptors in `batch` are owned by userspace (ownership rule); the
        // exclusive borrow of `self` means no other reference to the frame exists.
        let mut data = unsafe { self.umem.data_mut(&mut slot.desc) };
        let total = at + bytes.len() + keep;
        if data.contents().len() < at + keep {
            return false;
        }
        {
            let mut cur = data.cursor();
            if cur.buf_len() < total {
                return false;
            }
            cur.set_pos(total);
        }
        let c = data.contents_mut();
        c.copy_within(at..at + keep, at + bytes.len());
        c[at..at + bytes.len()].copy_from_slice(bytes);
        true
    }

    /// Queue a copy of `bytes` for transmission on `port`, in a free frame. False if no
    /// frame is free, it does not fit one, or the port's TX backlog is full.
    pub fn send_copy(&mut self, port: usize, bytes: &[u8]) -> bool {
        let Some(p) = self.ports.get(port) else {
            return false;
        };
        if p.pending.len() >= p.pending.capacity() {
            return false;
        }
        let Some(desc) = self.free_frame_with(bytes) else {
            return false;
        };
        match self.ports.get_mut(port) {
            Some(p) => {
                p.pending.push(desc);
                true
            }
            None => {
                self.free.push(desc);
                false
            }
        }
    }

    pub fn batch_len(&self) -> usize {
        self.batch.len()
    }

    /// How many workers looked for batch frame `i`'s flow before it came here.
    pub fn hops(&self, i: usize) -> u8 {
        self.batch.get(i).map_or(0, |s| s.hops)
    }

    /// The bytes of batch frame `i` (empty if `i` is out of range).
    pub fn frame(&mut self, i: usize) -> &mut [u8] {
        let Some(slot) = self.batch.get_mut(i) else {
            return &mut [];
        };
        // SAFETY: descriptors in `batch` are owned by userspace (ownership rule), and the
        // returned borrow ties up `self`, so the frame cannot be queued while borrowed.
        let mut data = unsafe { self.umem.data_mut(&mut slot.desc) };
        let len = data.contents().len();
        let ptr = data.contents_mut().as_mut_ptr();
        // SAFETY: `ptr..ptr+len` is this frame's data segment inside the UMEM mapping,
        // which lives as long as `self.umem`; the exclusive borrow of `self` guarantees no
        // other reference to it exists for the returned lifetime.
        unsafe { std::slice::from_raw_parts_mut(ptr, len) }
    }

    /// Queue batch frame `i` for transmission on `port`. False (and the frame is freed)
    /// if the port's TX backlog is full.
    pub fn send(&mut self, i: usize, port: usize) -> bool {
        let Some(slot) = self.batch.get_mut(i) else {
            return false;
        };
        if slot.done {
            return false;
        }
        slot.done = true;
        let desc = slot.desc;
        match self.ports.get_mut(port) {
            Some(p) if p.pending.len() < p.pending.capacity() => {
                p.pending.push(desc);
                true
            }
            _ => {
                self.free.push(desc);
                false
            }
        }
    }

    /// Return batch frame `i` to the free list (dropped or copied elsewhere).
    pub fn release(&mut self, i: usize) {
        if let Some(slot) = self.batch.get_mut(i) {
            if !slot.done {
                slot.done = true;
                self.free.push(slot.desc);
            }
        }
    }

    /// Keep batch frame `i` until [`WorkerIo::requeue_held`] or its deadline: `deadline`
    /// (ns) the first time, the original one when the frame was held before. False (and
    /// the frame is freed) if the hold list is full.
    pub fn hold(&mut self, i: usize, deadline: u64) -> bool {
        let Some(slot) = self.batch.get_mut(i) else {
            return false;
        };
        if slot.done {
            return false;
        }
        slot.done = true;
        if self.held.len() < MAX_HELD {
            self.held
                .push((slot.desc, slot.deadline.unwrap_or(deadline), slot.hops));
            true
        } else {
            self.free.push(slot.desc);
            false
        }
    }

    /// Put every held frame back into the batch, to be processed again. Returns how many.
    pub fn requeue_held(&mut self) -> usize {
        let n = self.held.len();
        for (desc, deadline, hops) in self.held.drain(..) {
            self.batch.push(Slot {
                desc,
                done: false,
                deadline: Some(deadline),
                hops,
            });
        }
        n
    }

    /// Free held frames whose deadline is before `now`. Returns how many.
    pub fn expire_held(&mut self, now: u64) -> usize {
        let before = self.held.len();
        let free = &mut self.free;
        self.held.retain(|(desc, deadline, _)| {
            if *deadline < now {
                free.push(*desc);
                false
            } else {
                true
            }
        });
        before - self.held.len()
    }

    /// End the batch: frames not sent are freed.
    pub fn end_batch(&mut self) {
        for slot in self.batch.drain(..) {
            if !slot.done {
                self.free.push(slot.desc);
            }
        }
    }

    /// Move pending frames into the TX rings (never more than each has room for) and
    /// kick the kernel where the ring asks for it.
    pub fn flush(&mut self) -> FlushResult {
        let mut res = FlushResult::default();
        for p in &mut self.ports {
            if p.pending.is_empty() {
                if p.in_tx > 0 && p.tx.needs_wakeup() {
                    let _ = p.tx.wakeup();
                }
                continue;
            }
            let n = (p.tx.nb_free(self.cfg.ring_size) as usize).min(p.pending.len());
            if n > 0 {
                // SAFETY: the first `n` pending descriptors are userspace-owned frames of
                // this UMEM with their lengths set; n ≤ nb_free so all are taken, and they
                // leave `pending` right after (ownership rule: pending → TX ring).
                let put = unsafe { p.tx.produce(&p.pending[..n]) };
                if put == n {
                    p.pending.drain(..n);
                    p.in_tx += n as u32;
                    res.sent += n as u32;
                }
            }
            if p.tx.needs_wakeup() {
                let _ = p.tx.wakeup();
            }
        }
        res
    }

    /// Kick fill rings that ask for it (the kernel stops RX when a fill ring ran dry).
    pub fn wake_fill(&mut self) {
        for p in &mut self.ports {
            if p.fq.needs_wakeup() {
                let _ = p.fq.wakeup(p.rx.fd_mut(), 0);
            }
        }
    }

    /// Frames waiting in userspace TX backlogs.
    pub fn backlog(&self) -> usize {
        self.ports.iter().map(|p| p.pending.len()).sum()
    }

    /// Frames in TX rings whose completion has not come back yet. In copy mode the
    /// kernel transmits only when kicked (sendto/poll), so a worker must not sleep while
    /// any are outstanding.
    pub fn tx_in_flight(&self) -> u32 {
        self.ports.iter().map(|p| p.in_tx).sum()
    }
}
