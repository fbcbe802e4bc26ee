//! A virtio device's I/O thread: serves queue notifications off the vCPU threads.
//!
//! The partition registers one eventfd per queue with KVM as an ioeventfd on the transport's
//! `QueueNotify` register (datamatch: the queue index), so a driver's notification ends in the
//! kernel, which signals the eventfd, and the vCPU goes straight back to the guest. This thread
//! waits on those eventfds, and on each wake-up clears the eventfd and serves the queue's whole
//! available ring, then raises the interrupt (an irqfd) once for the batch. A notification that
//! arrives while a batch is being served sets the eventfd again, so nothing is missed.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use super::data_path::DataPath;
use super::{VirtioDevice, VirtioError};

/// The running I/O thread of one device; stopping it (on drop) waits for its batch to finish.
#[derive(Debug)]
pub(super) struct IoThread {
    /// One per queue, in queue order: what the partition registers as ioeventfds.
    notifiers: Vec<EventFd>,
    stop: EventFd,
    handle: Option<JoinHandle<()>>,
}

impl IoThread {
    /// Starts a thread named `name` serving `path`'s `queue_count` queues.
    pub(super) fn spawn<D: VirtioDevice + 'static>(
        name: String,
        path: Arc<DataPath<D>>,
        queue_count: usize,
    ) -> Result<Self, VirtioError> {
        let eventfd = || EventFd::new(libc::EFD_NONBLOCK).map_err(VirtioError::IoThread);
        let notifiers = (0..queue_count)
            .map(|_| eventfd())
            .collect::<Result<Vec<_>, _>>()?;
        let stop = eventfd()?;
        let thread_notifiers = notifiers
            .iter()
            .map(|fd| fd.try_clone().map_err(VirtioError::IoThread))
            .collect::<Result<Vec<_>, _>>()?;
        let thread_stop = stop.try_clone().map_err(VirtioError::IoThread)?;
        let handle = std::thread::Builder::new()
            .name(name)
            .spawn(move || serve(&path, &thread_notifiers, &thread_stop))
            .map_err(VirtioError::IoThread)?;
        Ok(Self {
            notifiers,
            stop,
            handle: Some(handle),
        })
    }

    /// The queues' notification eventfds, in queue order.
    pub(super) fn notifiers(&self) -> &[EventFd] {
        &self.notifiers
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        // If the write fails the counter is saturated, so the thread wakes anyway.
        let _ = self.stop.write(1);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// The thread's loop: wait for a notification (or the stop), serve, repeat.
fn serve<D: VirtioDevice>(path: &DataPath<D>, notifiers: &[EventFd], stop: &EventFd) {
    let mut fds: Vec<libc::pollfd> = std::iter::once(stop)
        .chain(notifiers)
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: `fds` is a live array of `fds.len()` pollfds whose descriptors stay open while
        // `stop` and `notifiers` are borrowed; poll writes only their `revents`.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if ready < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            // poll cannot fail otherwise on a valid array; stop rather than spin.
            return;
        }
        if fds[0].revents != 0 {
            return;
        }
        for (index, (fd, notifier)) in fds[1..].iter().zip(notifiers).enumerate() {
            if fd.revents & libc::POLLIN == 0 {
                continue;
            }
            // Cleared before serving: a notification from here on wakes the next round.
            let _ = notifier.read();
            // `index` < queue count <= u16::MAX.
            path.notify(index as u32);
        }
    }
}
