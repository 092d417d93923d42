//! [`LoopThread`]: the std thread of a service loop (ksmd, the OOM
//! reaper), stopped and joined on drop.

use std::thread::JoinHandle;

/// A service whose loop runs on a [`LoopThread`].
pub trait StopLoop {
    /// Asks the loop to return after its current step.
    fn stop_loop(&self);
    /// After the thread was joined.
    fn joined(&self) {}
}

/// A running loop thread of `S`; [`stop`](Self::stop) or dropping it asks
/// the loop to return, joins the thread, then calls [`StopLoop::joined`].
#[derive(Debug)]
pub struct LoopThread<S: StopLoop> {
    service: S,
    handle: Option<JoinHandle<()>>,
}

impl<S: StopLoop> LoopThread<S> {
    /// The thread `handle` that runs `service`'s loop.
    pub fn new(service: S, handle: JoinHandle<()>) -> Self {
        LoopThread {
            service,
            handle: Some(handle),
        }
    }

    /// Stops the loop and joins the thread.
    pub fn stop(mut self) {
        self.join();
    }

    fn join(&mut self) {
        self.service.stop_loop();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
            self.service.joined();
        }
    }
}

impl<S: StopLoop> Drop for LoopThread<S> {
    fn drop(&mut self) {
        self.join();
    }
}
