//! The running VMM: the event loop (event-manager) that serves stdin, guest exits and devices,
//! and pause/resume of all vCPUs.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::terminal::Terminal;

use vmm_sys_util::eventfd::EventFd;

use crate::api::ApiServer;
use crate::builder::BuiltVm;
use crate::capture::job::SnapshotJob;
use crate::capture::progress::Progress;
use crate::config::VmConfig;
use crate::vstate::vcpu::{ExitSignal, GuestExit, VcpuError, VcpuEvent};
use devices::legacy::serial::SerialDevice;

/// Why the running VMM failed.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot create the event loop")]
    EventManager(#[source] event_manager::Error),
    #[error("the event loop failed")]
    EventLoop(#[source] event_manager::Error),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("cannot create an event fd")]
    EventFd(#[source] std::io::Error),
}

/// Whether the guest's vCPUs are running.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    Running,
    Paused,
}

/// The subscriber type of the event loop.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Wakes the loop when a vCPU reports an exit or the guest asks for a reset.
struct ExitHandler {
    exit: Arc<ExitSignal>,
}

impl MutEventSubscriber for ExitHandler {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // The count itself carries no meaning; a wakeup with no recorded reason is an i8042
        // reset request.
        let _ = self.exit.eventfd().read();
        if self.exit.reason().is_none() {
            if crate::signals::terminated() {
                self.exit.report(GuestExit::Requested);
            } else {
                self.exit.report(GuestExit::Reset);
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.exit.eventfd(), EventSet::IN)) {
            tracing::error!("cannot watch guest exits: {e}");
        }
    }
}

/// Feeds stdin to the serial port.
struct StdinHandler {
    serial: Arc<Mutex<SerialDevice>>,
}

impl MutEventSubscriber for StdinHandler {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        let room = self
            .serial
            .lock()
            .expect("serial lock poisoned")
            .input_room();
        let want = room.min(buf.len());
        if want == 0 {
            return;
        }
        match std::io::stdin().lock().read(&mut buf[..want]) {
            Ok(0) | Err(_) => {
                // End of input (or a closed terminal): stop watching it.
                let _ = ops.remove(events);
            }
            Ok(n) => {
                self.serial
                    .lock()
                    .expect("serial lock poisoned")
                    .enqueue_input(&buf[..n]);
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let stdin = std::io::stdin();
        if let Err(e) = ops.add(Events::new(&stdin.as_raw_fd(), EventSet::IN)) {
            tracing::debug!("stdin is not pollable, serial input disabled: {e}");
        }
    }
}

/// Puts the terminal in raw mode while the guest runs and restores it afterwards.
struct RawTerminal;

impl RawTerminal {
    fn enter() -> Option<Self> {
        use std::io::IsTerminal;
        let stdin = std::io::stdin();
        if stdin.is_terminal() && stdin.lock().set_raw_mode().is_ok() {
            Some(Self)
        } else {
            None
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = std::io::stdin().lock().set_canon_mode();
    }
}

/// Drains an event fd that only exists to wake the loop.
struct WakeHandler {
    evt: Arc<EventFd>,
}

impl MutEventSubscriber for WakeHandler {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&*self.evt, EventSet::IN)) {
            tracing::error!("cannot watch a wakeup event: {e}");
        }
    }
}

/// Wakes the loop when API calls are queued; the loop drains them itself.
struct ApiWake {
    fd: std::os::fd::RawFd,
}

impl MutEventSubscriber for ApiWake {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {}

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new_raw(self.fd, EventSet::IN)) {
            tracing::error!("cannot watch the API socket: {e}");
        }
    }
}

/// A running VM and its event loop.
pub struct Vmm {
    pub built: BuiltVm,
    pub config: VmConfig,
    state: RunState,
    events: EventManager<Subscriber>,
    pub(crate) api: Option<ApiServer>,
    pub(crate) snapshot: Option<SnapshotJob>,
    pub(crate) last_snapshot: Option<Progress>,
    pub(crate) snapshot_done: Arc<EventFd>,
    pub(crate) snapshot_count: u64,
    pub(crate) restored_from: Option<String>,
    /// The backup point whose instant the change tracking started at, while it is intact.
    pub(crate) backup_parent: Option<String>,
    /// Whether the running snapshot is a backup into a repository.
    pub(crate) backup_parent_pending: bool,
    /// Write-protection tracking, armed by the first live snapshot and kept from then on.
    pub(crate) cow_tracker: Option<Arc<crate::capture::cow::CowTracker>>,
    /// Continuous protection to a DR receiver, once started.
    pub(crate) dr: Option<crate::dr_checkpoints::DrLoop>,
    /// Whether the running snapshot is a DR checkpoint.
    pub(crate) dr_checkpoint_running: bool,
}

impl Vmm {
    /// Wraps a built VM (vCPUs paused) with its event loop.
    pub fn new(config: VmConfig, built: BuiltVm) -> Result<Self, RuntimeError> {
        let mut events: EventManager<Subscriber> =
            EventManager::new().map_err(RuntimeError::EventManager)?;
        let exit: Subscriber = Arc::new(Mutex::new(ExitHandler {
            exit: built.exit.clone(),
        }));
        let stdin: Subscriber = Arc::new(Mutex::new(StdinHandler {
            serial: built.devices.serial(),
        }));
        events.add_subscriber(exit);
        events.add_subscriber(stdin);
        let snapshot_done =
            Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(RuntimeError::EventFd)?);
        let wake: Subscriber = Arc::new(Mutex::new(WakeHandler {
            evt: snapshot_done.clone(),
        }));
        events.add_subscriber(wake);
        for device in built.devices.subscribers() {
            events.add_subscriber(device);
        }
        Ok(Self {
            built,
            config,
            state: RunState::Paused,
            events,
            api: None,
            snapshot: None,
            last_snapshot: None,
            snapshot_done,
            snapshot_count: 0,
            restored_from: None,
            backup_parent: None,
            backup_parent_pending: false,
            cow_tracker: None,
            dr: None,
            dr_checkpoint_running: false,
        })
    }

    /// Serves the control API on `server` from now on.
    pub fn attach_api(&mut self, server: ApiServer) {
        let wake: Subscriber = Arc::new(Mutex::new(ApiWake {
            fd: server.as_raw_fd(),
        }));
        self.events.add_subscriber(wake);
        self.api = Some(server);
    }

    /// Adds a subscriber (a device, the API server) to the event loop.
    pub fn add_subscriber(&mut self, s: Subscriber) {
        self.events.add_subscriber(s);
    }

    /// The current run state.
    pub fn state(&self) -> RunState {
        self.state
    }

    /// Pauses every vCPU and returns how long it took.
    pub fn pause(&mut self) -> Result<Duration, RuntimeError> {
        let t = Instant::now();
        for v in &self.built.vcpus {
            v.send(VcpuEvent::Pause)?;
        }
        for v in &self.built.vcpus {
            let r = v.recv()?;
            if !matches!(r, crate::vstate::vcpu::VcpuResponse::Paused) {
                return Err(VcpuError::Unexpected(v.index(), "other", "Paused").into());
            }
        }
        self.state = RunState::Paused;
        tracing::debug!(
            "paused {} vCPUs in {:?}",
            self.built.vcpus.len(),
            t.elapsed()
        );
        Ok(t.elapsed())
    }

    /// Resumes every vCPU.
    pub fn resume(&mut self) -> Result<(), RuntimeError> {
        for v in &self.built.vcpus {
            v.send(VcpuEvent::Resume)?;
        }
        for v in &self.built.vcpus {
            v.recv()?;
        }
        self.state = RunState::Running;
        Ok(())
    }

    /// Runs the guest until it stops; returns why it stopped.
    pub fn run(&mut self) -> Result<GuestExit, RuntimeError> {
        let _raw = RawTerminal::enter();
        self.resume()?;
        tracing::info!("guest running with {} vCPUs", self.built.vcpus.len());
        loop {
            if crate::signals::terminated() && self.built.exit.reason().is_none() {
                self.built.exit.report(GuestExit::Requested);
            }
            if let Some(exit) = self.built.exit.reason() {
                tracing::info!("guest stopped: {exit}");
                self.stop_snapshot();
                for v in &mut self.built.vcpus {
                    v.finish();
                }
                // Dropping the server answers queued calls and removes the socket.
                self.api = None;
                return Ok(exit);
            }
            let timeout = if self.dr.is_some() { 10 } else { 500 };
            self.events
                .run_with_timeout(timeout)
                .map_err(RuntimeError::EventLoop)?;
            self.serve_api();
            self.poll_snapshot();
            self.poll_dr();
        }
    }
}
