//! A virtio device's I/O thread: serves queue notifications off the vCPU threads.
//!
//! The partition registers one eventfd per queue with KVM as an ioeventfd on the transport's
//! `QueueNotify` register (datamatch: the queue index), so a driver's notification ends in the
//! kernel, which signals the eventfd, and the vCPU goes straight back to the guest. This thread
//! waits on those eventfds, and on each wake-up clears the eventfd and serves the queue's whole
//! available ring, then raises the interrupt (an irqfd) once for the batch. A notification that
//! arrives while a batch is being served sets the eventfd again, so nothing is missed. For a
//! device that asks for it ([`VirtioDevice::polls_queue`]) the thread then polls the queue for an
//! adaptive window with the driver's notifications suppressed (see `poll_window`).

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use std::time::Instant;

use vmm_sys_util::eventfd::EventFd;

use super::data_path::DataPath;
use super::poll_window::{PollWindow, may_poll};
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

/// The thread's loop: wait for a notification, backend input (or the stop), serve, repeat.
///
/// A device with a backend ([`VirtioDevice::backend`], a TAP) has its descriptor watched too,
/// while it is "armed": input that finds no room in the queue disarms it (else the thread would
/// spin on a readable descriptor), and the driver's next notification of that queue re-arms it.
fn serve<D: VirtioDevice>(path: &DataPath<D>, notifiers: &[EventFd], stop: &EventFd) {
    let backend = path.lock().device.backend();
    let mut fds: Vec<libc::pollfd> = std::iter::once(stop.as_raw_fd())
        .chain(notifiers.iter().map(AsRawFd::as_raw_fd))
        .chain(backend.map(|(fd, _)| fd))
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let backend_slot = 1 + notifiers.len();
    let may_poll = may_poll();
    let mut windows: Vec<PollWindow> = (0..notifiers.len())
        .map(|index| PollWindow::new(may_poll && path.lock().device.polls_queue(index)))
        .collect();
    loop {
        // SAFETY: `fds` is a live array of `fds.len()` pollfds whose descriptors stay open while
        // `stop` and `notifiers` are borrowed and the device in `path` (which owns the backend's
        // descriptor) is alive; poll writes only their `revents`.
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
        let mut rearm = false;
        for (index, notifier) in notifiers.iter().enumerate() {
            if fds[1 + index].revents & libc::POLLIN == 0 {
                continue;
            }
            // Cleared before serving: a notification from here on wakes the next round.
            let _ = notifier.read();
            let poll = &mut windows[index];
            poll.notified(Instant::now());
            // `index` < queue count <= u16::MAX.
            let polled = path.notify_polling(index as u32, poll.window());
            poll.batch_done(polled.served_at);
            rearm |= backend.is_some_and(|(_, queue)| queue == index);
        }
        if let Some(fd) = fds.get_mut(backend_slot).filter(|_| rearm) {
            fd.events = libc::POLLIN;
        }
        let Some((_, queue)) = backend else {
            continue;
        };
        let revents = fds[backend_slot].revents;
        if revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            // A backend that failed (its interface was deleted) is never readable again: stop
            // watching it (poll skips negative descriptors) rather than spin on its error.
            fds[backend_slot].fd = -1;
        } else if revents & libc::POLLIN != 0 && !path.serve_backend(queue) {
            fds[backend_slot].events = 0;
        }
    }
}
