//! vCPU threads: one per vCPU, each an explicit run-state machine (`Running`, `Paused`,
//! `Finished`) driven by [`VcpuEvent`]s over a channel and answering with [`VcpuResponse`]s.
//!
//! Another thread kicks a vCPU out of `KVM_RUN` by sending it a real-time signal whose handler
//! sets `immediate_exit` in the vCPU's `kvm_run`; a signal that arrives between two `KVM_RUN`
//! calls makes the next one return at once, so no event is ever missed. Exits are handled in one
//! free function, [`handle_exit`], that dispatches to the PIO and MMIO buses.

use std::cell::Cell;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{kvm_run, CpuId, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::vcpu_state::{VcpuState, VcpuStateError};
use devices::Bus;

/// Why a vCPU thread could not be driven.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler")]
    SignalHandler(#[source] vmm_sys_util::errno::Error),
    /// The vCPU thread could not be spawned.
    #[error("cannot spawn the thread of vCPU {0}")]
    Spawn(u8, #[source] std::io::Error),
    /// The vCPU thread is gone.
    #[error("vCPU {0} is no longer running")]
    Gone(u8),
    /// The vCPU did not answer in time.
    #[error("vCPU {0} did not answer within {1:?}")]
    Timeout(u8, Duration),
    /// The vCPU answered with an error.
    #[error("vCPU {0} failed")]
    Failed(u8, #[source] VcpuRequestError),
    /// The vCPU answered something unexpected.
    #[error("vCPU {0} answered {1} where {2} was expected")]
    Unexpected(u8, &'static str, &'static str),
}

/// Why a vCPU thread could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum VcpuRequestError {
    /// State is saved only while the vCPU is paused.
    #[error("cannot save the state of a running vCPU")]
    SaveWhileRunning,
    /// KVM refused to give the state.
    #[error(transparent)]
    Save(#[from] VcpuStateError),
}

/// Why the guest stopped running; the process exit status follows from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest asked for a reset (i8042) or KVM reported a reset event.
    Reset,
    /// The guest shut itself down.
    Shutdown,
    /// A shutdown was asked for through the API.
    Requested,
    /// A triple fault.
    TripleFault { vcpu: u8 },
    /// KVM could not run the guest's code.
    InternalError { vcpu: u8, detail: String },
    /// KVM refused to enter the guest.
    FailEntry { vcpu: u8, reason: u64 },
    /// The vCPU thread hit a host-side error.
    VcpuFailure { vcpu: u8, detail: String },
    /// Guest memory could not be loaded from the snapshot being restored.
    RestoreFailed { detail: String },
}

impl GuestExit {
    /// Whether this is a normal end (exit status 0).
    pub fn is_clean(&self) -> bool {
        matches!(self, Self::Reset | Self::Shutdown | Self::Requested)
    }
}

impl std::fmt::Display for GuestExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Reset => write!(f, "the guest asked for a reset"),
            Self::Shutdown => write!(f, "the guest shut down"),
            Self::Requested => write!(f, "shutdown requested"),
            Self::TripleFault { vcpu } => {
                write!(f, "vCPU {vcpu} triple-faulted (KVM_EXIT_SHUTDOWN)")
            }
            Self::InternalError { vcpu, detail } => {
                write!(f, "KVM internal error on vCPU {vcpu}: {detail}")
            }
            Self::FailEntry { vcpu, reason } => {
                write!(
                    f,
                    "KVM failed to enter vCPU {vcpu} (hardware reason {reason:#x})"
                )
            }
            Self::VcpuFailure { vcpu, detail } => write!(f, "vCPU {vcpu} failed: {detail}"),
            Self::RestoreFailed { detail } => write!(f, "restore failed: {detail}"),
        }
    }
}

/// Where vCPUs report that the guest has stopped: the first report wins.
pub struct ExitSignal {
    evt: EventFd,
    reason: Mutex<Option<GuestExit>>,
}

impl ExitSignal {
    /// Creates the signal.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
            reason: Mutex::new(None),
        })
    }

    /// Records `exit` unless another was recorded first, and wakes the event loop.
    pub fn report(&self, exit: GuestExit) {
        let mut reason = snapshot::lock(&self.reason);
        if reason.is_none() {
            *reason = Some(exit);
        }
        if let Err(e) = self.evt.write(1) {
            tracing::error!("cannot signal guest exit: {e}");
        }
    }

    /// The recorded exit, if any.
    pub fn reason(&self) -> Option<GuestExit> {
        snapshot::lock(&self.reason).clone()
    }

    /// The event fd the event loop waits on.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

/// The buses a vCPU dispatches I/O exits to.
pub struct IoBuses {
    pub pio: Bus,
    pub mmio: Bus,
}

/// What a vCPU thread is asked to do.
pub enum VcpuEvent {
    Pause,
    Resume,
    SaveState,
    Finish,
}

/// What a vCPU thread answers.
#[derive(Debug)]
pub enum VcpuResponse {
    Paused,
    Resumed,
    Saved(Box<VcpuState>),
    Error(VcpuRequestError),
    Finished,
}

impl VcpuResponse {
    fn name(&self) -> &'static str {
        match self {
            Self::Paused => "Paused",
            Self::Resumed => "Resumed",
            Self::Saved(_) => "Saved",
            Self::Error(_) => "Error",
            Self::Finished => "Finished",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RunState {
    Running,
    Paused,
    Finished,
}

thread_local! {
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(|r| r.get());
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own kvm_run mapping, set by the vCPU thread before
        // it can receive a kick and valid until the thread exits; a single byte store is
        // async-signal-safe.
        unsafe { (*run).immediate_exit = 1 };
    }
}

/// Installs the kick signal handler once per process.
pub fn install_kick_handler() -> Result<(), VcpuError> {
    static INSTALLED: std::sync::OnceLock<Result<(), vmm_sys_util::errno::Error>> =
        std::sync::OnceLock::new();
    (*INSTALLED.get_or_init(|| register_signal_handler(SIGRTMIN(), kick_handler)))
        .map_err(VcpuError::SignalHandler)
}

/// A vCPU before its thread starts.
pub struct Vcpu {
    pub index: u8,
    pub fd: VcpuFd,
    pub cpuid: CpuId,
    pub msr_list: Vec<u32>,
    pub buses: Arc<IoBuses>,
    pub exit: Arc<ExitSignal>,
}

/// How an exit was handled.
#[derive(Debug, PartialEq, Eq)]
enum ExitAction {
    Continue,
    Interrupted,
    Stop(GuestExit),
}

/// Describes a KVM_EXIT_INTERNAL_ERROR, with the instruction bytes KVM reports when it has them.
fn describe_internal_error(run: &kvm_run) -> String {
    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the active member of
    // the union.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let ndata = (internal.ndata as usize).min(internal.data.len());
    let data = &internal.data[..ndata];
    // Emulation failures carry flags, then the instruction length and bytes.
    const EMULATION: u32 = 1;
    const FLAG_INSN_BYTES: u64 = 1;
    if internal.suberror == EMULATION && ndata >= 3 && data[0] & FLAG_INSN_BYTES != 0 {
        let raw: Vec<u8> = data[1..3].iter().flat_map(|w| w.to_le_bytes()).collect();
        let len = usize::from(raw[0]).min(15);
        let bytes: Vec<String> = raw[1..=len].iter().map(|b| format!("{b:02x}")).collect();
        return format!(
            "suberror {} (emulation failure), instruction bytes: {}",
            internal.suberror,
            bytes.join(" ")
        );
    }
    let words: Vec<String> = data.iter().map(|w| format!("{w:#x}")).collect();
    format!(
        "suberror {}, data [{}]",
        internal.suberror,
        words.join(", ")
    )
}

/// Handles one return from `KVM_RUN`.
fn handle_exit(index: u8, fd: &mut VcpuFd, buses: &IoBuses) -> ExitAction {
    match fd.run().inspect(super::exit_metrics::count) {
        Ok(exit) => match exit {
            VcpuExit::IoIn(port, data) => {
                if !buses.pio.read(u64::from(port), data) {
                    data.fill(0xff);
                }
                ExitAction::Continue
            }
            VcpuExit::IoOut(port, data) => {
                buses.pio.write(u64::from(port), data);
                ExitAction::Continue
            }
            VcpuExit::MmioRead(addr, data) => {
                if !buses.mmio.read(addr, data) {
                    tracing::debug!("vCPU {index}: MMIO read of unmapped {addr:#x}");
                    data.fill(0xff);
                }
                ExitAction::Continue
            }
            VcpuExit::MmioWrite(addr, data) => {
                if !buses.mmio.write(addr, data) {
                    tracing::debug!("vCPU {index}: MMIO write to unmapped {addr:#x}");
                }
                ExitAction::Continue
            }
            VcpuExit::Hlt => ExitAction::Continue,
            VcpuExit::Shutdown => ExitAction::Stop(GuestExit::TripleFault { vcpu: index }),
            VcpuExit::SystemEvent(kind, _) => match kind {
                KVM_SYSTEM_EVENT_RESET => ExitAction::Stop(GuestExit::Reset),
                KVM_SYSTEM_EVENT_SHUTDOWN => ExitAction::Stop(GuestExit::Shutdown),
                other => {
                    tracing::warn!("vCPU {index}: unhandled system event {other}");
                    ExitAction::Continue
                }
            },
            VcpuExit::FailEntry(reason, _) => ExitAction::Stop(GuestExit::FailEntry {
                vcpu: index,
                reason,
            }),
            VcpuExit::InternalError => {
                let detail = describe_internal_error(fd.get_kvm_run());
                ExitAction::Stop(GuestExit::InternalError {
                    vcpu: index,
                    detail,
                })
            }
            other => {
                tracing::debug!("vCPU {index}: ignored exit {other:?}");
                ExitAction::Continue
            }
        },
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => ExitAction::Interrupted,
        Err(e) => ExitAction::Stop(GuestExit::VcpuFailure {
            vcpu: index,
            detail: format!("KVM_RUN failed: {e}"),
        }),
    }
}

impl Vcpu {
    /// Starts the vCPU's thread in the `Paused` state.
    pub fn start(self) -> Result<VcpuHandle, VcpuError> {
        install_kick_handler()?;
        let index = self.index;
        let (event_tx, event_rx) = channel();
        let (response_tx, response_rx) = channel();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                crate::seccomp::enter(crate::seccomp::ThreadKind::Vcpu);
                self.run(event_rx, response_tx)
            })
            .map_err(|e| VcpuError::Spawn(index, e))?;
        Ok(VcpuHandle {
            index,
            events: event_tx,
            responses: response_rx,
            thread: Some(thread),
        })
    }

    fn run(mut self, events: Receiver<VcpuEvent>, responses: Sender<VcpuResponse>) {
        KVM_RUN.with(|r| r.set(self.fd.get_kvm_run() as *mut kvm_run));
        let _kicks = super::throttle::register_current();
        let mut clock = super::throttle::ThrottleClock::new();
        let mut state = RunState::Paused;
        while state != RunState::Finished {
            let event = if state == RunState::Paused {
                match events.recv() {
                    Ok(e) => Some(e),
                    Err(_) => break,
                }
            } else {
                match handle_exit(self.index, &mut self.fd, &self.buses) {
                    ExitAction::Continue => {}
                    ExitAction::Interrupted => self.fd.set_kvm_immediate_exit(0),
                    ExitAction::Stop(exit) => {
                        self.exit.report(exit);
                        state = RunState::Paused;
                    }
                }
                match clock.due() {
                    // Throttled (pre-copy auto-converge): sleep, but wake at once for an event.
                    Some(sleep) if state == RunState::Running => {
                        let event = events.recv_timeout(sleep).ok();
                        clock.restart();
                        event
                    }
                    _ => events.try_recv().ok(),
                }
            };
            if let Some(event) = event {
                state = self.handle_event(event, state, &responses);
            }
        }
        KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
    }

    fn handle_event(
        &mut self,
        event: VcpuEvent,
        state: RunState,
        responses: &Sender<VcpuResponse>,
    ) -> RunState {
        let (next, answer) = match event {
            VcpuEvent::Pause => (RunState::Paused, VcpuResponse::Paused),
            VcpuEvent::Resume => (RunState::Running, VcpuResponse::Resumed),
            VcpuEvent::SaveState => {
                let answer = if state == RunState::Running {
                    VcpuResponse::Error(VcpuRequestError::SaveWhileRunning)
                } else {
                    match VcpuState::save(self.index, &self.fd, &self.cpuid, &self.msr_list) {
                        Ok(s) => VcpuResponse::Saved(Box::new(s)),
                        Err(e) => VcpuResponse::Error(e.into()),
                    }
                };
                (state, answer)
            }
            VcpuEvent::Finish => (RunState::Finished, VcpuResponse::Finished),
        };
        // The receiver may be gone while the VMM shuts down; nothing is waiting then.
        let _ = responses.send(answer);
        next
    }
}

/// The VMM's handle on a running vCPU thread.
pub struct VcpuHandle {
    index: u8,
    events: Sender<VcpuEvent>,
    responses: Receiver<VcpuResponse>,
    thread: Option<JoinHandle<()>>,
}

/// How long a vCPU may take to answer an event.
pub const VCPU_RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

impl VcpuHandle {
    /// The vCPU's index.
    pub fn index(&self) -> u8 {
        self.index
    }

    /// Sends `event` and kicks the thread out of `KVM_RUN`.
    pub fn send(&self, event: VcpuEvent) -> Result<(), VcpuError> {
        self.events
            .send(event)
            .map_err(|_| VcpuError::Gone(self.index))?;
        if let Some(thread) = &self.thread {
            thread
                .kill(SIGRTMIN())
                .map_err(|_| VcpuError::Gone(self.index))?;
        }
        Ok(())
    }

    /// Waits for the thread's answer.
    pub fn recv(&self) -> Result<VcpuResponse, VcpuError> {
        match self.responses.recv_timeout(VCPU_RESPONSE_TIMEOUT) {
            Ok(VcpuResponse::Error(msg)) => Err(VcpuError::Failed(self.index, msg)),
            Ok(r) => Ok(r),
            Err(RecvTimeoutError::Timeout) => {
                Err(VcpuError::Timeout(self.index, VCPU_RESPONSE_TIMEOUT))
            }
            Err(RecvTimeoutError::Disconnected) => Err(VcpuError::Gone(self.index)),
        }
    }

    /// Sends `event` and checks the answer is `expected`.
    pub fn request(
        &self,
        event: VcpuEvent,
        expected: &'static str,
    ) -> Result<VcpuResponse, VcpuError> {
        self.send(event)?;
        let r = self.recv()?;
        if r.name() != expected {
            return Err(VcpuError::Unexpected(self.index, r.name(), expected));
        }
        Ok(r)
    }

    /// Asks the thread to finish and joins it. A thread that does not answer (blocked in the
    /// kernel, say on guest memory that will never arrive) is left behind rather than waited
    /// for forever; the process is ending.
    pub fn finish(&mut self) {
        let answered = self.send(VcpuEvent::Finish).is_ok()
            && matches!(
                self.responses.recv_timeout(Duration::from_secs(2)),
                Ok(VcpuResponse::Finished)
            );
        if let Some(thread) = self.thread.take() {
            if answered {
                if thread.join().is_err() {
                    tracing::error!("vCPU {} thread panicked", self.index);
                }
            } else {
                tracing::debug!(
                    "vCPU {} did not stop; leaving its thread behind",
                    self.index
                );
            }
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.finish();
        }
    }
}
