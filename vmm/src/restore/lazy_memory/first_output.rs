//! A console writer that notes, at the restored guest's first output, how much of its memory
//! was loaded: the proof that a restore runs before it has read the whole point.

use std::io::Write;
use std::sync::{Arc, OnceLock};

use super::progress::LoaderProgress;

/// Passes every write through to `inner`; the first non-empty write after the loader's
/// progress is set is recorded in it and logged.
pub struct FirstOutputWriter {
    inner: Box<dyn Write + Send>,
    progress: Arc<OnceLock<Arc<LoaderProgress>>>,
    seen: bool,
}

impl FirstOutputWriter {
    /// Wraps `inner`. Set the returned slot to the loader's progress before the guest runs.
    pub fn new(inner: Box<dyn Write + Send>) -> (Self, Arc<OnceLock<Arc<LoaderProgress>>>) {
        let progress = Arc::new(OnceLock::new());
        let w = Self {
            inner,
            progress: progress.clone(),
            seen: false,
        };
        (w, progress)
    }
}

impl Write for FirstOutputWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if !self.seen && !buf.is_empty() {
            if let Some(p) = self.progress.get() {
                self.seen = true;
                if let Some(loaded) = p.note_first_output() {
                    let i = p.info();
                    tracing::info!(
                        "first guest output {} ms after the memory loader started, with {} of {} \
                         MiB of memory loaded",
                        i.first_output_after_ms.unwrap_or_default(),
                        loaded >> 20,
                        i.bytes_total >> 20
                    );
                }
            }
        }
        self.inner.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
