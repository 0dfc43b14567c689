//! Moving between snapshot directories and backup points: store a snapshot directory as a point
//! (memory chunks the repository already holds are not even read), and write a point out as a
//! snapshot directory that `arkvm restore --from` accepts.

use std::io::{self, Write};
use std::path::Path;

use super::backup::ObjectWriter;
use super::{PointManifest, RepoError, Repository};
use crate::chunk::CHUNK_SIZE;
use crate::dir::{SnapshotReader, SnapshotWriter};
use crate::manifest::{Manifest, PartKind};

impl Repository {
    /// Stores the snapshot directory `snap` as a backup point of `vm`.
    ///
    /// Memory parts in [`CHUNK_SIZE`] chunks are stored by their chunk table: a chunk whose id
    /// the repository already has is neither read nor hashed, and the others are read and
    /// checked against the table. Other parts are streamed, chunked and checked against their
    /// manifest hash; on any damage nothing becomes visible.
    pub fn store_snapshot(
        &self,
        snap: &SnapshotReader,
        vm: &str,
        parent: Option<&str>,
    ) -> Result<PointManifest, RepoError> {
        let mut backup = self.start_backup(vm, parent)?;
        for part in &snap.manifest().parts {
            let object = backup.add_object(&part.name, part.kind, part.size)?;
            // Chunk table ids are repository ids only in an unencrypted repository (an
            // encrypted one names chunks by a keyed hash).
            let by_table = !self.is_encrypted()
                && part
                    .chunks
                    .as_ref()
                    .is_some_and(|t| t.chunk_size == CHUNK_SIZE as u64);
            if by_table {
                let memory = snap.memory_part(&part.name)?;
                let mut buf = vec![0u8; CHUNK_SIZE];
                for (index, id) in memory.chunk_hashes().iter().enumerate() {
                    let index = index as u64;
                    if object.reuse_stored_chunk(index, *id)? {
                        continue;
                    }
                    let range = memory
                        .chunk_range(index)
                        .expect("index below the chunk count");
                    let chunk = &mut buf[..(range.end - range.start) as usize];
                    memory.read_chunk(index, chunk)?;
                    object.put_chunk(index, chunk)?;
                }
            } else {
                let mut sink = ObjectStream::new(&object);
                let copied = if part.kind == PartKind::Memory {
                    // Another chunk size: check the whole part first, then re-chunk it.
                    snap.verify_part(&part.name)?;
                    let mut file = snap.open_part(&part.name)?;
                    io::copy(&mut file, &mut sink)
                        .map(|_| ())
                        .map_err(|source| crate::dir::SnapshotError::Io {
                            action: format!("copy part '{}' out of", part.name),
                            path: snap.dir().join(&part.name),
                            source,
                        })
                } else {
                    snap.copy_part(&part.name, &mut sink).map(|_| ())
                };
                if let Some(error) = sink.error.take() {
                    return Err(error);
                }
                copied?;
                sink.finish()?;
            }
            backup.finish_object(object)?;
        }
        backup.commit()
    }

    /// Writes point `id` out as the snapshot directory `target` (which must not exist), every
    /// chunk checked; returns the directory's manifest.
    pub fn export_point(&self, id: &str, target: &Path) -> Result<Manifest, RepoError> {
        let point = self.read_point(id)?;
        let mut snap = SnapshotWriter::create(target)?;
        for object in &point.objects {
            match object.kind {
                PartKind::Memory => {
                    let part =
                        snap.add_memory_part(&object.name, object.size, object.chunk_size)?;
                    for (index, chunk) in object.chunks.iter().enumerate() {
                        part.write_chunk(index as u64, &self.read_chunk(chunk)?)?;
                    }
                    snap.finish_memory_part(part)?;
                }
                PartKind::State | PartKind::Raw => {
                    let mut part = if object.kind == PartKind::State {
                        snap.add_state_part_bytes(&object.name)?
                    } else {
                        snap.add_part(&object.name)?
                    };
                    for chunk in &object.chunks {
                        part.write_all(&self.read_chunk(chunk)?).map_err(|e| {
                            crate::dir::SnapshotError::Io {
                                action: format!("write part '{}' to", object.name),
                                path: snap.tmp_dir().join(&object.name),
                                source: e,
                            }
                        })?;
                    }
                    snap.finish_part(part)?;
                }
            }
        }
        Ok(snap.commit()?)
    }
}

/// A [`Write`] that cuts a stream into [`CHUNK_SIZE`] chunks and puts them into an object.
struct ObjectStream<'a> {
    object: &'a ObjectWriter,
    buf: Vec<u8>,
    index: u64,
    /// The repository error behind an `io::Error` this sink returned.
    error: Option<RepoError>,
}

impl<'a> ObjectStream<'a> {
    fn new(object: &'a ObjectWriter) -> Self {
        Self {
            object,
            buf: Vec::with_capacity(CHUNK_SIZE),
            index: 0,
            error: None,
        }
    }

    /// Puts the buffered chunk.
    fn put(&mut self) -> Result<(), RepoError> {
        self.object.put_chunk(self.index, &self.buf)?;
        self.index += 1;
        self.buf.clear();
        Ok(())
    }

    /// Puts the last, partial chunk.
    fn finish(mut self) -> Result<(), RepoError> {
        if !self.buf.is_empty() {
            self.put()?;
        }
        Ok(())
    }
}

impl Write for ObjectStream<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK_SIZE - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK_SIZE {
            if let Err(e) = self.put() {
                let text = e.to_string();
                self.error = Some(e);
                return Err(io::Error::other(text));
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
