//! Instant disks for a restore from a backup point: each disk of the point gets a sparse local
//! file in the disk directory whose chunks are fetched from the point on first use, while a
//! background thread fetches the rest ([`devices::virtio::block::Hydration`]). The guest starts
//! at once; once every disk is whole the VM no longer needs the repository.
//!
//! The disk directory is `--disk-dir DIR` (kept, and finished before the process exits), or a
//! private `$TMPDIR/arkvm-restore-<pid>-disks` removed when the VM exits. What a killed restore
//! left there is removed by the next restore, once its process is gone ([`cleanup_stale`]).
//!
//! A disk chunk that cannot be read in time stops the VM with
//! [`GuestExit::RestoreFailed`] naming the point, the disk and the chunk.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::virtio::block::{hydrate, Hydration};
use snapshot::repo::{LockMode, RepoError};

use super::source::{LockedObject, OpenedSource, SourceError};
use crate::saved_state::disk_part_name;
use crate::vstate::vcpu::{ExitSignal, GuestExit};

/// The name prefix of default disk directories: `arkvm-restore-<pid>-disks`.
const TMP_PREFIX: &str = "arkvm-restore-";
const TMP_SUFFIX: &str = "-disks";
/// Present in a `--disk-dir` while its disks are incomplete.
pub const INCOMPLETE_MARKER: &str = "HYDRATING";

/// The default disk directory of this process.
pub fn default_dir() -> PathBuf {
    std::env::temp_dir().join(format!("{TMP_PREFIX}{}{TMP_SUFFIX}", std::process::id()))
}

/// Removes the default disk directories of restores whose process is gone (killed: a normal
/// exit removes its own). Returns how many were removed.
pub fn cleanup_stale() -> usize {
    let tmp = std::env::temp_dir();
    let me = std::process::id();
    let mut removed = 0;
    for entry in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(TMP_PREFIX)
            .and_then(|r| r.strip_suffix(TMP_SUFFIX))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        match std::fs::remove_dir_all(entry.path()) {
            Ok(()) => {
                tracing::info!(
                    "removed {} left by restore process {pid}, which is gone",
                    entry.path().display()
                );
                removed += 1;
            }
            Err(e) => tracing::warn!("cannot remove {}: {e}", entry.path().display()),
        }
    }
    removed
}

/// Totals over every disk, for `GET /vm`, `status` and the progress bar.
#[derive(Clone, Debug, Default)]
pub struct HydrationTotals {
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub done: bool,
    pub error: Option<String>,
    pub dir: PathBuf,
    pub elapsed_ms: u64,
}

/// The disks of a restore from a point, being hydrated.
pub struct DiskHydration {
    disks: Vec<Arc<Hydration>>,
    dir: PathBuf,
    temporary: bool,
    exit: Arc<OnceLock<Arc<ExitSignal>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    started: Instant,
    finished_ms: OnceLock<u64>,
    /// The background pass reads at most this many bytes per second (guest reads are not
    /// limited).
    rate: Option<u64>,
}

fn write_err(path: &Path) -> impl Fn(std::io::Error) -> SourceError + '_ {
    move |e| SourceError::WriteDisk(path.to_path_buf(), e)
}

impl DiskHydration {
    /// Creates the disk directory (`target`, or the private default) and a sparse file per
    /// disk of the point, registers each for read-through, and points the configuration at
    /// them. `None` when the source is not a point or has no disks.
    pub fn prepare(
        opened: &mut OpenedSource,
        target: Option<&Path>,
        retry_for: Duration,
        rate: Option<u64>,
    ) -> Result<Option<Self>, SourceError> {
        let Some((repo, point)) = opened.point_disks() else {
            return Ok(None);
        };
        if opened.state.config.disks.is_empty() {
            return Ok(None);
        }
        let temporary = target.is_none();
        let dir = target.map(Path::to_path_buf).unwrap_or_else(default_dir);
        if dir.exists() {
            return Err(SourceError::DiskDirExists(dir));
        }
        let lock = Arc::new(
            repo.store()
                .lock(LockMode::Shared, true)
                .map_err(RepoError::from)?,
        );
        let mut readers = Vec::new();
        for (i, disk) in opened.state.config.disks.iter().enumerate() {
            let id = disk.device_id(i);
            readers.push(repo.object_reader(point, &disk_part_name(&id))?);
        }
        snapshot::fs_util::create_private_dir(&dir).map_err(write_err(&dir))?;
        let marker = dir.join(INCOMPLETE_MARKER);
        if !temporary {
            snapshot::fs_util::create_private_file(&marker).map_err(write_err(&marker))?;
        }
        let exit: Arc<OnceLock<Arc<ExitSignal>>> = Arc::new(OnceLock::new());
        let label = opened.label.clone();
        let mut disks = Vec::new();
        let configs = opened.state.config.disks.iter_mut().enumerate();
        for ((i, disk), reader) in configs.zip(readers) {
            let id = disk.device_id(i);
            let path = dir.join(format!("{id}.img"));
            let file = snapshot::fs_util::private_open_options()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(write_err(&path))?;
            file.set_len(reader.size()).map_err(write_err(&path))?;
            let source = Arc::new(LockedObject {
                reader,
                _lock: lock.clone(),
            });
            let exit = exit.clone();
            let hydration = Arc::new(Hydration::new(
                format!("disk {id} of point {label}"),
                file,
                source,
                retry_for,
                Box::new(move |why| match exit.get() {
                    Some(exit) => exit.report(GuestExit::RestoreFailed {
                        detail: why.to_string(),
                    }),
                    None => tracing::error!("{why}"),
                }),
            ));
            hydrate::register(&path, hydration.clone());
            disks.push(hydration);
            disk.path = path;
            disk.overlay = None;
            // Keep the id the snapshot used, so the saved device state finds its disk.
            disk.id = Some(id);
        }
        Ok(Some(Self {
            disks,
            dir,
            temporary,
            exit,
            thread: Mutex::new(None),
            started: Instant::now(),
            finished_ms: OnceLock::new(),
            rate,
        }))
    }

    /// Routes a chunk failure to `exit` (which stops the VM), and starts the background pass.
    pub fn start(self: &Arc<Self>, exit: Arc<ExitSignal>) -> std::io::Result<()> {
        let _ = self.exit.set(exit);
        if let Some(why) = self.disks.iter().find_map(|d| d.progress().error) {
            if let Some(exit) = self.exit.get() {
                exit.report(GuestExit::RestoreFailed { detail: why });
            }
        }
        let me = self.clone();
        let handle = std::thread::Builder::new()
            .name("disk-hydrate".into())
            .spawn(move || {
                // Reads the repository (files, or an object store's sockets) like a capture
                // worker, and writes the local disk files.
                crate::seccomp::enter(crate::seccomp::ThreadKind::Capture);
                me.run()
            })?;
        *snapshot::lock(&self.thread) = Some(handle);
        Ok(())
    }

    fn run(&self) {
        let mut fetched = 0u64;
        let begun = Instant::now();
        let rate = self.rate;
        let mut pace = |bytes: u64| {
            fetched += bytes;
            if let Some(rate) = rate.filter(|r| *r > 0) {
                let due = Duration::from_secs_f64(fetched as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(begun.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        };
        for d in &self.disks {
            if !d.hydrate_all(&mut pace) {
                return;
            }
        }
        let ms = self.started.elapsed().as_millis() as u64;
        let _ = self.finished_ms.set(ms);
        if !self.temporary {
            let _ = std::fs::remove_file(self.dir.join(INCOMPLETE_MARKER));
        }
        tracing::info!(
            "disks hydrated into {} in {ms} ms; the VM no longer needs the repository",
            self.dir.display()
        );
    }

    /// The sum over every disk.
    pub fn totals(&self) -> HydrationTotals {
        let mut t = HydrationTotals {
            done: true,
            dir: self.dir.clone(),
            ..Default::default()
        };
        for d in &self.disks {
            let p = d.progress();
            t.bytes_done += p.bytes_done;
            t.bytes_total += p.bytes_total;
            t.done &= p.done;
            if t.error.is_none() {
                t.error = p.error;
            }
        }
        // Done once the background pass has also closed the directory's books (the marker).
        t.done &= self.finished_ms.get().is_some();
        t.elapsed_ms = match self.finished_ms.get() {
            Some(ms) if t.done => *ms,
            _ => self.started.elapsed().as_millis() as u64,
        };
        t
    }

    /// The restore failed before the VM ran: stop and remove the directory this restore made.
    pub fn abandon(&self) {
        self.disks.iter().for_each(|d| d.cancel());
        if let Some(handle) = snapshot::lock(&self.thread).take() {
            let _ = handle.join();
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!("cannot remove {}: {e}", self.dir.display());
        }
    }

    /// Whether the disk directory is removed at exit.
    pub fn is_temporary(&self) -> bool {
        self.temporary
    }

    /// At exit: a temporary directory is removed (hydration stops); a `--disk-dir` is
    /// hydrated to the end first, so the files it keeps are whole.
    pub fn finish(&self) {
        if self.temporary {
            self.disks.iter().for_each(|d| d.cancel());
        } else if !self.totals().done && self.totals().error.is_none() {
            eprintln!(
                "arkvm: finishing the disks in {} before exiting",
                self.dir.display()
            );
        }
        match snapshot::lock(&self.thread).take() {
            Some(handle) => {
                let _ = handle.join();
            }
            // Never started (the VM did not get to run): a kept directory is still filled.
            None if !self.temporary => self.run(),
            None => {}
        }
        if self.temporary {
            if let Err(e) = std::fs::remove_dir_all(&self.dir) {
                tracing::warn!("cannot remove {}: {e}", self.dir.display());
            }
        } else if let Some(why) = self.totals().error {
            eprintln!(
                "arkvm: the disks in {} are incomplete ({} is left there): {why}",
                self.dir.display(),
                INCOMPLETE_MARKER
            );
        }
    }
}
