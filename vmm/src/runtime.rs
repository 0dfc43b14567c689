//! The running VMM: the event loop (event-manager) that serves stdin, guest exits, devices, the
//! control API, the snapshot engine and continuous protection. It owns the [`Machine`] (the
//! built VM), the [`CaptureEngine`] and the [`DrControl`], and hands each call the parts it
//! needs.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::terminal::Terminal;

use vmm_sys_util::eventfd::EventFd;

use crate::api::ApiServer;
use crate::api_handler::{handle_request, ApiContext};
use crate::builder::BuiltVm;
use crate::capture::CaptureEngine;
use crate::config::VmConfig;
use crate::dr_checkpoints::{DrConfig, DrControl, DrControlError, DrStatus};
use crate::machine::Machine;
use crate::vstate::vcpu::{ExitSignal, GuestExit, VcpuError};
use devices::legacy::serial::SerialDevice;
use snapshot::lock;

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
        let room = lock(&self.serial).input_room();
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
                lock(&self.serial).enqueue_input(&buf[..n]);
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
    machine: Machine,
    events: EventManager<Subscriber>,
    api: Option<ApiServer>,
    engine: CaptureEngine,
    /// Continuous protection to a DR receiver, once started.
    dr: DrControl,
}

impl Vmm {
    /// Wraps a built VM (vCPUs paused) with its event loop; `restored_from` names the snapshot
    /// it was restored from, if any.
    pub fn new(
        config: VmConfig,
        built: BuiltVm,
        restored_from: Option<String>,
    ) -> Result<Self, RuntimeError> {
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
        let engine = CaptureEngine::new().map_err(RuntimeError::EventFd)?;
        let wake: Subscriber = Arc::new(Mutex::new(WakeHandler {
            evt: engine.wake_evt().clone(),
        }));
        events.add_subscriber(wake);
        for device in built.devices.subscribers() {
            events.add_subscriber(device);
        }
        let dr = DrControl::new(built.devices.output_commit().clone());
        Ok(Self {
            machine: Machine::new(config, built, restored_from),
            events,
            api: None,
            engine,
            dr,
        })
    }

    /// Bounds the copy-on-write staging pool of live snapshots.
    pub fn set_cow_staging(&mut self, size: crate::capture::staging::StagingSize) {
        self.engine.set_cow_staging(size);
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

    /// The VM.
    pub fn machine(&self) -> &Machine {
        &self.machine
    }

    /// Starts continuous protection (`run --dr-target`).
    pub fn start_dr(
        &mut self,
        config: &DrConfig,
        staging: Option<&Path>,
    ) -> Result<DrStatus, DrControlError> {
        self.dr.start(config, staging, &self.machine.config.name)
    }

    /// Runs the guest until it stops; returns why it stopped.
    pub fn run(&mut self) -> Result<GuestExit, RuntimeError> {
        let _raw = RawTerminal::enter();
        self.machine.resume()?;
        crate::seccomp::enter(crate::seccomp::ThreadKind::Main);
        tracing::info!(
            "guest running with {} vCPUs",
            self.machine.built.vcpus.len()
        );
        loop {
            let exit_signal = &self.machine.built.exit;
            if crate::signals::terminated() && exit_signal.reason().is_none() {
                exit_signal.report(GuestExit::Requested);
            }
            if let Some(exit) = self.machine.built.exit.reason() {
                tracing::info!("guest stopped: {exit}");
                if let Some(lazy) = &self.machine.built.lazy_memory {
                    lazy.vm_ending();
                }
                if let Some(ended) = self.engine.stop(&mut self.machine) {
                    self.dr.snapshot_ended(&ended);
                }
                for v in &mut self.machine.built.vcpus {
                    v.finish();
                }
                // Dropping the server answers queued calls and removes the socket.
                self.api = None;
                return Ok(exit);
            }
            let timeout = if self.dr.is_started() { 10 } else { 500 };
            self.events
                .run_with_timeout(timeout)
                .map_err(RuntimeError::EventLoop)?;
            self.serve_api();
            if let Some(ended) = self.engine.poll(&mut self.machine) {
                self.dr.snapshot_ended(&ended);
            }
            self.dr.poll(&mut self.engine, &mut self.machine);
        }
    }

    /// Answers every queued API call.
    fn serve_api(&mut self) {
        loop {
            let Some(call) = self.api.as_ref().and_then(|a| a.try_recv()) else {
                return;
            };
            let response = handle_request(
                ApiContext {
                    machine: &mut self.machine,
                    engine: &mut self.engine,
                    dr: &mut self.dr,
                },
                call.request,
            );
            call.responder.respond(response);
        }
    }
}
