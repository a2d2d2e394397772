//! The virtio-blk device of one export, as a `vhost-user-backend` backend: features,
//! configuration space, and the queues' requests handed to the engine.
//!
//! Threads: `vhost-user-backend` runs one thread per entry of `queues_per_thread`; here
//! each queue has its own, which takes the queue's requests one after the other.
//!
//! Every request taken off a queue is recorded in the inflight region the VMM keeps
//! (`inflight.rs`) until its completion is published; a worker that starts on a region
//! (after the previous one died) resubmits the requests recorded there before it takes
//! new ones, whatever order they would have completed in (see docs/architecture.md).

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::{
    VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Backend, VhostUserFrontendReqHandler};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_OK,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::inflight::{Region, Tracker};
use super::request::{self, Target, MAX_RANGE_SECTORS, MAX_RANGE_SEGMENTS, SECTOR};
use super::Export;
use crate::cbw::Device;
use crate::engine::Engine;
use crate::sync::Recover;

/// Guest memory as the VMM shares it.
pub type Memory = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// Descriptors a queue may have (the VMM picks its size up to this).
pub const MAX_QUEUE_SIZE: usize = 1024;
/// Requests completed at most before the driver is notified, within a pass over a
/// queue that keeps filling (bounds the wait of the first request of a long pass).
const NOTIFY_EVERY: usize = 32;
/// Largest segment a request may have (`size_max`).
const SIZE_MAX: u32 = 1 << 20;

/// The backend of one connection of an export.
pub struct BlkBackend {
    export: Arc<Export>,
    device: Arc<Device>,
    /// The engine and the device's slot: changes are told to the kernel's cache of
    /// `live/NAME` through it.
    engine: Arc<Engine>,
    slot: usize,
    event_idx: AtomicBool,
    mem: Mutex<Option<Memory>>,
    /// The channel to the VMM for configuration changes (resize), when it offers one.
    to_vmm: Mutex<Option<Backend>>,
    /// Per queue: its part of the inflight region, once the VMM handed one.
    trackers: Vec<Arc<Mutex<Tracker>>>,
    /// Per queue: held by the queue's thread while it serves requests, so that stopping
    /// the queue (`GET_VRING_BASE`) waits for the requests it took.
    serving: Vec<Mutex<()>>,
}

/// `queues_per_thread`: each queue has a thread of its own (queue *i* on thread *i*).
fn thread_masks(queues: usize) -> Vec<u64> {
    (0..queues).map(|q| 1u64 << q).collect()
}

/// The queue (index on the device) of event `device_event` of thread `thread_id`: the
/// thread's `device_event`-th queue in [`thread_masks`], so the thread's own.
fn queue_of(thread_id: usize, device_event: u16) -> Option<usize> {
    (device_event == 0).then_some(thread_id)
}

/// Signals the used ring when the driver asked to be told about what was added to it
/// since the last look (always without `EVENT_IDX`).
fn notify(vring: &VringRwLock<Memory>) {
    match vring.needs_notification() {
        Ok(false) => {}
        _ => {
            let _ = vring.signal_used_queue();
        }
    }
}

/// What completing a request of one queue needs, on the queue's thread or another.
#[derive(Clone)]
struct QueueCtx {
    export: Arc<Export>,
    device: Arc<Device>,
    engine: Arc<Engine>,
    slot: usize,
    tracker: Arc<Mutex<Tracker>>,
}

impl QueueCtx {
    /// Runs the request of `chain`; returns the bytes written to the guest.
    fn serve<M>(&self, mem: &GuestMemoryMmap<()>, chain: DescriptorChain<M>) -> u32
    where
        M: std::ops::Deref,
        M::Target: vm_memory::GuestMemory,
    {
        let changed = |offset, len| {
            self.engine
                .changed_elsewhere(self.slot, &self.device, offset, len)
        };
        let target = Target {
            device: &self.device,
            serial: self.export.name.as_bytes(),
            read_only: self.export.read_only,
            changed: &changed,
        };
        match request::serve_chain(&target, mem, chain) {
            Ok(o) => {
                self.export.count(o.status != VIRTIO_BLK_S_OK as u8);
                o.written
            }
            Err(e) => {
                log::debug!(
                    "vhost-user-blk {}: malformed request: {}",
                    self.export.name,
                    e.0
                );
                self.export.count(true);
                0
            }
        }
    }

    /// Publishes the completion of `head` (and clears its inflight entry after, see
    /// `inflight.rs`); the caller notifies the driver. False if the used ring cannot be
    /// written.
    fn complete(&self, vring: &VringRwLock<Memory>, head: u16, written: u32) -> bool {
        let published = self.tracker.lock().recover().complete(head, || {
            vring.add_used(head, written)?;
            Ok::<_, virtio_queue::Error>(vring.get_ref().get_queue().next_used())
        });
        if let Err(e) = published {
            log::warn!(
                "vhost-user-blk {}: completing a request: {e}",
                self.export.name
            );
            return false;
        }
        true
    }

    /// The chain whose head is `head` in `vring`'s descriptor table.
    fn chain_at<'m>(
        vring: &VringRwLock<Memory>,
        mem: &'m GuestMemoryMmap<()>,
        head: u16,
    ) -> DescriptorChain<&'m GuestMemoryMmap<()>> {
        let state = vring.get_ref();
        let queue = state.get_queue();
        DescriptorChain::new(mem, GuestAddress(queue.desc_table()), queue.size(), head)
    }
}

impl BlkBackend {
    /// A backend serving `device` (in `slot` of `engine`) for `export`.
    pub fn new(
        export: Arc<Export>,
        device: Arc<Device>,
        engine: Arc<Engine>,
        slot: usize,
    ) -> BlkBackend {
        BlkBackend {
            engine,
            slot,
            event_idx: AtomicBool::new(false),
            mem: Mutex::new(None),
            to_vmm: Mutex::new(None),
            trackers: (0..export.queues).map(|_| Arc::default()).collect(),
            serving: (0..export.queues).map(|_| Mutex::new(())).collect(),
            export,
            device,
        }
    }

    fn queue_ctx(&self, q: usize) -> Option<QueueCtx> {
        Some(QueueCtx {
            export: self.export.clone(),
            device: self.device.clone(),
            engine: self.engine.clone(),
            slot: self.slot,
            tracker: self.trackers.get(q)?.clone(),
        })
    }

    /// Once per region the VMM handed: reads queue `q`'s part, resubmits the requests it
    /// records in flight (oldest first) and moves the available ring past what was
    /// taken, before the queue's new requests.
    fn resubmit(
        &self,
        q: usize,
        ctx: &QueueCtx,
        vring: &VringRwLock<Memory>,
        mem: &GuestMemoryMmap<()>,
    ) {
        let mut tracker = ctx.tracker.lock().recover();
        let Some(log) = tracker.take_pending() else {
            return;
        };
        let name = &self.export.name;
        let used = match vring.queue_used_idx() {
            Ok(u) => u,
            Err(e) => {
                log::warn!("vhost-user-blk {name}: queue {q}: reading the used index: {e}; requests are not tracked");
                tracker.attach(None);
                return;
            }
        };
        let size = vring.get_ref().get_queue().size();
        let rec = match log.recover(used, size) {
            Ok(rec) => rec,
            Err(why) => {
                log::warn!(
                    "vhost-user-blk {name}: queue {q}: the inflight region is not usable ({why}); \
                     nothing is resubmitted"
                );
                log.reset(used);
                return;
            }
        };
        tracker.resume(rec.next_counter);
        drop(tracker);
        vring.set_queue_next_avail(rec.next_avail);
        if rec.resubmit.is_empty() {
            return;
        }
        log::info!(
            "vhost-user-blk {name}: queue {q}: resubmitting {} request(s) in flight when the previous worker ended",
            rec.resubmit.len()
        );
        for head in rec.resubmit {
            let written = ctx.serve(mem, QueueCtx::chain_at(vring, mem, head));
            if !ctx.complete(vring, head, written) {
                break;
            }
        }
        notify(vring);
    }

    /// Tells the VMM that the configuration space changed (the capacity, after a resize).
    pub fn config_changed(&self) {
        if let Some(b) = self.to_vmm.lock().recover().as_ref() {
            if let Err(e) = b.handle_config_change() {
                log::warn!(
                    "vhost-user-blk {}: telling the VMM about the new size failed: {e}",
                    self.export.name
                );
            }
        }
    }

    /// Inflight I/O tracking, unless a test turns it off (fault injection
    /// `FLEECEFS_FAULT_NO_INFLIGHT`, to show what it prevents).
    fn inflight_feature(&self) -> VhostUserProtocolFeatures {
        #[cfg(feature = "fault-injection")]
        if std::env::var_os("FLEECEFS_FAULT_NO_INFLIGHT").is_some() {
            return VhostUserProtocolFeatures::empty();
        }
        VhostUserProtocolFeatures::INFLIGHT_SHMFD
    }

    /// The virtio-blk configuration space (`struct virtio_blk_config`, little endian).
    fn config_space(&self) -> Vec<u8> {
        let mut c = vec![0u8; 60];
        let put = |c: &mut Vec<u8>, at: usize, b: &[u8]| c[at..at + b.len()].copy_from_slice(b);
        let block = self
            .device
            .source()
            .logical_block_size()
            .clamp(SECTOR, 4096) as u32;
        put(&mut c, 0, &(self.device.size() / SECTOR).to_le_bytes()); // capacity
        put(&mut c, 8, &SIZE_MAX.to_le_bytes()); // size_max
        put(&mut c, 12, &(MAX_QUEUE_SIZE as u32 - 2).to_le_bytes()); // seg_max
        put(&mut c, 20, &block.to_le_bytes()); // blk_size
        c[24] = 0; // physical_block_exp
        c[25] = 0; // alignment_offset
        put(&mut c, 26, &1u16.to_le_bytes()); // min_io_size (in blocks)
        put(&mut c, 28, &0u32.to_le_bytes()); // opt_io_size
        put(&mut c, 34, &(self.export.queues as u16).to_le_bytes()); // num_queues
        put(&mut c, 36, &MAX_RANGE_SECTORS.to_le_bytes()); // max_discard_sectors
        put(&mut c, 40, &MAX_RANGE_SEGMENTS.to_le_bytes()); // max_discard_seg
        put(&mut c, 44, &(block / SECTOR as u32).to_le_bytes()); // discard_sector_alignment
        put(&mut c, 48, &MAX_RANGE_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        put(&mut c, 52, &MAX_RANGE_SEGMENTS.to_le_bytes()); // max_write_zeroes_seg
        c[56] = 1; // write_zeroes_may_unmap
        c
    }

    /// Takes every available request of `vring`, runs it and completes it. Each request
    /// is put in the used ring as soon as it is done (a driver that looks finds it
    /// without waiting for a notification), but the driver is notified once per pass
    /// over what was available, as `EVENT_IDX` allows: a notification wakes the driver's
    /// thread, which on a machine with few CPUs preempts this one, so one per request
    /// costs more than the request itself.
    ///
    /// The guest memory a request is served with is read after the request was taken off
    /// the ring: the driver maps the memory a request uses (`ADD_MEM_REG`) before it
    /// makes the request available, so that view has it, while a view taken earlier
    /// (when the event came, or for the previous request) may not.
    fn process(&self, ctx: &QueueCtx, vring: &VringRwLock<Memory>, atomic: &Memory) {
        // Test-only fault injection: `FLEECEFS_FAULT_VHOST_SLOW_QUEUE=MILLISECONDS` makes
        // a queue's thread that was woken sleep before it looks at the ring (the driver
        // may map memory and make requests available meanwhile).
        #[cfg(feature = "fault-injection")]
        {
            static SLOW: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
            let slow = SLOW.get_or_init(|| {
                std::env::var("FLEECEFS_FAULT_VHOST_SLOW_QUEUE")
                    .ok()
                    .and_then(|v| v.parse().ok())
            });
            if let Some(ms) = *slow {
                std::thread::sleep(std::time::Duration::from_millis(ms));
            }
        }
        let mut completed = 0usize;
        loop {
            let head = {
                let mem = atomic.memory();
                let chain = vring.get_mut().get_queue_mut().pop_descriptor_chain(&*mem);
                let Some(chain) = chain else { break };
                chain.head_index()
            };
            ctx.tracker.lock().recover().take(head);
            #[cfg(feature = "fault-injection")]
            if self.hold(ctx, vring, head) {
                continue;
            }
            let mem = atomic.memory();
            let written = ctx.serve(&mem, QueueCtx::chain_at(vring, &mem, head));
            if !ctx.complete(vring, head, written) {
                break;
            }
            completed += 1;
            if completed % NOTIFY_EVERY == 0 {
                notify(vring);
            }
        }
        if completed % NOTIFY_EVERY != 0 {
            notify(vring);
        }
    }

    /// Test-only fault injection: with `FLEECEFS_FAULT_VHOST_HOLD=MILLISECONDS,FILE`, the
    /// next request taken off a queue after FILE appears is held (and FILE removed) for
    /// MILLISECONDS on a thread of its own while its queue goes on with the next ones:
    /// later requests complete first, and the held one is in flight meanwhile. True if
    /// `head` is held.
    #[cfg(feature = "fault-injection")]
    fn hold(&self, ctx: &QueueCtx, vring: &VringRwLock<Memory>, head: u16) -> bool {
        static SPEC: std::sync::OnceLock<Option<(u64, std::path::PathBuf)>> =
            std::sync::OnceLock::new();
        let spec = SPEC.get_or_init(|| {
            let v = std::env::var("FLEECEFS_FAULT_VHOST_HOLD").ok()?;
            let (ms, file) = v.split_once(',')?;
            Some((ms.parse().ok()?, file.into()))
        });
        let Some((ms, file)) = spec else {
            return false;
        };
        // Removing it is the test-and-clear: one request per time the file appears.
        if std::fs::remove_file(file).is_err() {
            return false;
        }
        let ms = *ms;
        let Some(atomic) = self.mem.lock().recover().clone() else {
            return false;
        };
        let (ctx, vring) = (ctx.clone(), vring.clone());
        log::info!(
            "vhost-user-blk {}: holding request {head} for {ms} ms",
            self.export.name
        );
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(ms));
            let _pass = crate::keeper::GATE.enter();
            let mem = atomic.memory();
            let written = ctx.serve(&mem, QueueCtx::chain_at(&vring, &mem, head));
            if ctx.complete(&vring, head, written) {
                notify(&vring);
                log::info!(
                    "vhost-user-blk {}: released request {head}",
                    ctx.export.name
                );
            }
        });
        true
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock<Memory>;

    fn num_queues(&self) -> usize {
        self.export.queues
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        let mut bits = [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_TOPOLOGY,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_MQ,
        ]
        .iter()
        .fold(0u64, |f, b| f | 1 << b);
        if self.export.read_only {
            bits |= 1 << VIRTIO_BLK_F_RO;
        } else {
            bits |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        bits | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | self.inflight_feature()
    }

    fn get_inflight_fd(
        &self,
        msg: &VhostUserInflight,
    ) -> std::io::Result<(VhostUserInflight, File)> {
        if usize::from(msg.num_queues) > self.export.queues {
            return Err(std::io::Error::other(format!(
                "an inflight region for {} queues: the device has {}",
                msg.num_queues, self.export.queues
            )));
        }
        let (_, file) = Region::create(msg.num_queues, msg.queue_size)?;
        let len = Region::len_for(msg.num_queues, msg.queue_size) as u64;
        log::debug!(
            "vhost-user-blk {}: inflight region for {} queue(s) of {}: {len} bytes",
            self.export.name,
            msg.num_queues,
            msg.queue_size
        );
        Ok((
            VhostUserInflight::new(len, 0, msg.num_queues, msg.queue_size),
            file,
        ))
    }

    fn set_inflight_fd(&self, msg: &VhostUserInflight, file: File) -> std::io::Result<()> {
        // A region that cannot be used leaves the queues untracked (the VMM restarts
        // them from their used index, as without a region); the device keeps working.
        let region = Region::map(
            &file,
            msg.mmap_offset,
            msg.mmap_size,
            msg.num_queues,
            msg.queue_size,
        )
        .inspect_err(|why| {
            log::warn!(
                "vhost-user-blk {}: the VMM's inflight region is not usable ({why}); \
                 requests in flight at a restart cannot be resubmitted",
                self.export.name
            )
        })
        .ok()
        .map(Arc::new);
        for (q, tracker) in self.trackers.iter().enumerate() {
            let log = region.as_ref().and_then(|r| r.queue(q));
            tracker.lock().recover().attach(log);
        }
        Ok(())
    }

    /// `GET_VRING_BASE`: the queue is no longer ready (its thread takes no new request);
    /// returns once the requests its thread took are completed, so that the index the VMM
    /// gets counts only completed requests (the vhost-user protocol's stop, which a VMM
    /// relies on to pause or reset the device).
    fn stop_vring(&self, queue_index: u32) -> std::io::Result<()> {
        if let Some(m) = self.serving.get(queue_index as usize) {
            drop(m.lock().recover());
        }
        Ok(())
    }

    /// `RESET_DEVICE`: the queues are disabled; returns once the requests their threads
    /// took are completed.
    fn reset_device(&self) {
        for m in &self.serving {
            drop(m.lock().recover());
        }
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let c = self.config_space();
        let start = offset as usize;
        match start.checked_add(size as usize) {
            Some(end) if end <= c.len() => c[start..end].to_vec(),
            _ => Vec::new(),
        }
    }

    fn update_memory(&self, mem: Memory) -> std::io::Result<()> {
        *self.mem.lock().recover() = Some(mem);
        Ok(())
    }

    fn set_backend_req_fd(&self, backend: Backend) {
        *self.to_vmm.lock().recover() = Some(backend);
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        thread_masks(self.export.queues)
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)
            .inspect_err(|e| log::warn!("vhost-user-blk {}: an exit event: {e}", self.export.name))
            .ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock<Memory>],
        thread_id: usize,
    ) -> std::io::Result<()> {
        // An error here would end the queue's thread for good: anything unexpected is
        // logged and ignored instead.
        let Some(vring) = vrings
            .get(device_event as usize)
            .filter(|_| evset == EventSet::IN)
        else {
            log::debug!(
                "vhost-user-blk {}: unexpected event {device_event} ({evset:?})",
                self.export.name
            );
            return Ok(());
        };
        let Some(atomic) = self.mem.lock().recover().clone() else {
            return Ok(());
        };
        let Some((q, ctx)) =
            queue_of(thread_id, device_event).and_then(|q| Some((q, self.queue_ctx(q)?)))
        else {
            return Ok(());
        };
        // A worker restart waits for the requests being served.
        let _pass = crate::keeper::GATE.enter();
        // So does a stop of the queue; a queue stopped meanwhile is not served.
        let Some(_serving) = self.serving.get(q).map(|m| m.lock().recover()) else {
            return Ok(());
        };
        if !vring.get_ref().get_queue().ready() {
            return Ok(());
        }
        self.resubmit(q, &ctx, vring, &atomic.memory());
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        loop {
            if event_idx {
                let _ = vring.disable_notification();
            }
            self.process(&ctx, vring, &atomic);
            if !event_idx {
                break;
            }
            // True when requests arrived after the last look: take them too.
            match vring.enable_notification() {
                Ok(true) => continue,
                _ => break,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The queue a thread's event is for agrees with the threads given to
    /// `vhost-user-backend` (the inflight region is per queue on the device).
    #[test]
    fn queue_of_an_event_agrees_with_the_thread_masks() {
        for queues in 1..=MAX_QUEUES_TESTED {
            for (thread, mask) in thread_masks(queues).into_iter().enumerate() {
                let mine: Vec<usize> = (0..64).filter(|b| mask >> b & 1 == 1).collect();
                for (event, &q) in mine.iter().enumerate() {
                    assert_eq!(queue_of(thread, event as u16), Some(q));
                }
                assert_eq!(queue_of(thread, mine.len() as u16), None);
            }
        }
    }

    const MAX_QUEUES_TESTED: usize = super::super::MAX_QUEUES;
}
