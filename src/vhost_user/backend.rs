//! The virtio-blk device of one export, as a `vhost-user-backend` backend: features,
//! configuration space, and the queues' requests handed to the engine.
//!
//! Threads: `vhost-user-backend` runs one thread per entry of `queues_per_thread`; here
//! each queue has its own, which takes the queue's requests one after the other and
//! completes them in order (so a client that reconnects after the worker died resubmits
//! exactly the requests past the used index, see docs/architecture.md).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Backend, VhostUserFrontendReqHandler};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_OK,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::request::{self, Target, MAX_RANGE_SECTORS, MAX_RANGE_SEGMENTS, SECTOR};
use super::Export;
use crate::cbw::Device;
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
    event_idx: AtomicBool,
    mem: Mutex<Option<Memory>>,
    /// The channel to the VMM for configuration changes (resize), when it offers one.
    to_vmm: Mutex<Option<Backend>>,
}

impl BlkBackend {
    /// A backend serving `device` for `export`.
    pub fn new(export: Arc<Export>, device: Arc<Device>) -> BlkBackend {
        BlkBackend {
            export,
            device,
            event_idx: AtomicBool::new(false),
            mem: Mutex::new(None),
            to_vmm: Mutex::new(None),
        }
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

    /// Takes every available request of `vring`, runs it and completes it, in order.
    /// Each request is put in the used ring as soon as it is done (a driver that looks
    /// finds it without waiting for a notification), but the driver is notified once per
    /// pass over what was available, as `EVENT_IDX` allows: a notification wakes the
    /// driver's thread, which on a machine with few CPUs preempts this one, so one per
    /// request costs more than the request itself.
    fn process(&self, vring: &VringRwLock<Memory>, mem: &GuestMemoryMmap<()>) {
        let target = Target {
            device: &self.device,
            serial: self.export.name.as_bytes(),
            read_only: self.export.read_only,
        };
        let mut completed = 0usize;
        loop {
            let chain = vring.get_mut().get_queue_mut().pop_descriptor_chain(mem);
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let written = match request::serve_chain(&target, mem, chain) {
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
            };
            if let Err(e) = vring.add_used(head, written) {
                log::warn!(
                    "vhost-user-blk {}: completing a request: {e}",
                    self.export.name
                );
                break;
            }
            completed += 1;
            if completed % NOTIFY_EVERY == 0 {
                self.notify(vring);
            }
        }
        if completed % NOTIFY_EVERY != 0 {
            self.notify(vring);
        }
    }

    /// Signals the used ring when the driver asked to be told about what was added to it
    /// since the last look (always without `EVENT_IDX`).
    fn notify(&self, vring: &VringRwLock<Memory>) {
        match vring.needs_notification() {
            Ok(false) => {}
            _ => {
                let _ = vring.signal_used_queue();
            }
        }
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
        (0..self.export.queues).map(|q| 1u64 << q).collect()
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
        _thread_id: usize,
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
        let mem = atomic.memory();
        // A worker restart waits for the requests being served.
        let _pass = crate::keeper::GATE.enter();
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        loop {
            if event_idx {
                let _ = vring.disable_notification();
            }
            self.process(vring, &mem);
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
