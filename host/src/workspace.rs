//! Run workspaces: one directory the steps of a run share.
//!
//! Model: a run names at most one workspace, either
//! - `source`: a host directory *copied* into a fresh directory
//!   `<root>/<run id>` that the run owns (the service's root is
//!   `<workspace_dir>/<database instance>`), or
//! - `dir`: a host directory used in place, which the run does not own.
//!
//! Both host paths must be absolute and lie under a directory the service
//! allows (`allowed_dirs`), exactly like a task's `dirs`. Each task of the run
//! mounts the workspace at its `guest` path (default `/workspace`), read-only
//! unless it asks for `rw` (or not at all with `none`), and starts there
//! unless it names its own `cwd`.
//!
//! Invariants:
//! - Only a copy is ever deleted, never a directory the run merely uses.
//! - A copy is deleted per its `cleanup` policy once the run has ended,
//!   whatever ended it (success, failure, fail-fast, abort, timeout): the
//!   service calls [`Workspace::finish`] right after the run's final state is
//!   committed.
//! - The copy follows no symlink: links in the source are skipped, so a
//!   source tree cannot smuggle a path outside itself into the workspace.
//! - A run that could not be created leaves no copy behind.
//! - The prepared workspace is stored with its run ([`Workspace::record`]),
//!   so a server started after the one that made the copy died applies the
//!   policy when the run ends.
//! - A copy made for a run whose creation did not commit (the process died
//!   between the copy and the commit) is named after a run id no run has;
//!   the next service on that database deletes it at start-up
//!   ([`copies_under`] lists the candidates, [`delete_copies`] deletes
//!   them). Each database has a root of its own, so that sweep never sees
//!   another database's copies.

use std::path::{Path, PathBuf};

use crate::model::{RunState, RunWorkspace, WorkspaceCleanup, WorkspaceSpec};

/// The default guest path of a workspace.
pub const DEFAULT_GUEST: &str = "/workspace";

/// Why a workspace could not be prepared (the submitter's mistake, except
/// for `Copy`, which may also be the host's).
#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    #[error("workspace: give exactly one of `source` (copied) and `dir` (used in place)")]
    OneOf,
    #[error("workspace: host path `{0}` must be absolute")]
    NotAbsolute(String),
    #[error("workspace: `{path}`: {message}")]
    Unusable { path: String, message: String },
    #[error("workspace: `{0}` is not under a directory this host allows (config `allowed_dirs`)")]
    NotAllowed(String),
    #[error("workspace: invalid guest path {0:?}: it must be absolute and contain no NUL")]
    Guest(String),
    #[error("workspace: cannot copy `{from}` to `{to}`: {message}")]
    Copy {
        from: String,
        to: String,
        message: String,
    },
}

/// A prepared workspace.
#[derive(Debug, Clone)]
pub struct Workspace {
    /// The host directory the steps mount.
    pub host: PathBuf,
    pub guest: String,
    /// The run owns `host` (a copy) and may delete it.
    pub owned: bool,
    pub cleanup: WorkspaceCleanup,
}

impl Workspace {
    /// Checks `spec` and, for a `source`, copies it to `<root>/<run_id>`.
    /// Blocking (file copies): call it off the async runtime.
    pub fn prepare(
        spec: &WorkspaceSpec,
        allowed: &[PathBuf],
        root: &Path,
        run_id: &str,
    ) -> Result<Workspace, WorkspaceError> {
        let guest = spec
            .guest
            .clone()
            .unwrap_or_else(|| DEFAULT_GUEST.to_owned());
        if !wasmtask_runtime::is_absolute_guest_path(&guest) {
            return Err(WorkspaceError::Guest(guest));
        }
        let (path, owned) = match (&spec.source, &spec.dir) {
            (Some(s), None) => (s, true),
            (None, Some(d)) => (d, false),
            _ => return Err(WorkspaceError::OneOf),
        };
        if !Path::new(path).is_absolute() {
            return Err(WorkspaceError::NotAbsolute(path.clone()));
        }
        let canonical = std::fs::canonicalize(path).map_err(|e| WorkspaceError::Unusable {
            path: path.clone(),
            message: e.to_string(),
        })?;
        if !canonical.is_dir() {
            return Err(WorkspaceError::Unusable {
                path: path.clone(),
                message: "not a directory".into(),
            });
        }
        if !allowed.iter().any(|a| canonical.starts_with(a)) {
            return Err(WorkspaceError::NotAllowed(path.clone()));
        }
        if !owned {
            return Ok(Workspace {
                host: canonical,
                guest,
                owned,
                cleanup: spec.cleanup,
            });
        }
        let dest = root.join(run_id);
        let copy_err = |e: std::io::Error| WorkspaceError::Copy {
            from: canonical.display().to_string(),
            to: dest.display().to_string(),
            message: e.to_string(),
        };
        std::fs::create_dir_all(root).map_err(copy_err)?;
        if let Err(e) = copy_tree(&canonical, &dest) {
            let _ = std::fs::remove_dir_all(&dest);
            return Err(copy_err(e));
        }
        Ok(Workspace {
            host: dest,
            guest,
            owned,
            cleanup: spec.cleanup,
        })
    }

    /// Whether the policy deletes the copy of a run that ended `state`.
    pub fn should_delete(&self, state: RunState) -> bool {
        self.owned
            && match self.cleanup {
                WorkspaceCleanup::Always => true,
                WorkspaceCleanup::OnSuccess => state == RunState::Succeeded,
                WorkspaceCleanup::Never => false,
            }
    }

    /// Applies the cleanup policy for a run that ended `state`. Returns
    /// whether the copy was deleted. Blocking.
    pub fn finish(&self, state: RunState) -> std::io::Result<bool> {
        if !self.should_delete(state) {
            return Ok(false);
        }
        match std::fs::remove_dir_all(&self.host) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
            Err(e) => Err(e),
        }
    }

    /// How it is stored with its run.
    pub fn record(&self) -> RunWorkspace {
        RunWorkspace {
            host: self.host.to_string_lossy().into_owned(),
            guest: self.guest.clone(),
            owned: self.owned,
            cleanup: self.cleanup,
        }
    }

    /// The workspace a stored run names.
    pub fn from_record(r: &RunWorkspace) -> Workspace {
        Workspace {
            host: PathBuf::from(&r.host),
            guest: r.guest.clone(),
            owned: r.owned,
            cleanup: r.cleanup,
        }
    }

    /// Deletes a copy whose run was never created.
    pub fn discard(&self) {
        if self.owned {
            let _ = std::fs::remove_dir_all(&self.host);
        }
    }
}

/// The run ids with a copy under `root`: the directories named like a run
/// id ([`crate::db::is_run_id`]). Anything else there is not a copy and is
/// left alone; a missing root has none.
pub fn copies_under(root: &Path) -> std::io::Result<Vec<String>> {
    let entries = match std::fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut ids = Vec::new();
    for entry in entries {
        let entry = entry?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        // `file_type` does not follow a symlink: a link is never a copy.
        if crate::db::is_run_id(&name) && entry.file_type()?.is_dir() {
            ids.push(name);
        }
    }
    ids.sort();
    Ok(ids)
}

/// Deletes the copies of `ids` under `root` (runs that were never
/// committed), saying so in the log, and what could not be deleted.
/// Blocking: call it off the async runtime.
pub fn delete_copies(root: &Path, ids: &[String]) {
    for id in ids {
        let path = root.join(id);
        match std::fs::remove_dir_all(&path) {
            Ok(()) => tracing::warn!(
                path = %path.display(),
                "deleted a workspace copy no run has (its run was never committed)"
            ),
            Err(e) => tracing::warn!(
                path = %path.display(),
                error = %e,
                "cannot delete a workspace copy no run has"
            ),
        }
    }
}

/// Copies the files and directories under `from` into `to` (created),
/// skipping symlinks and special files.
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let ty = entry.file_type()?;
        let target = to.join(entry.file_name());
        if ty.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else if ty.is_file() {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(source: Option<&Path>, cleanup: WorkspaceCleanup) -> WorkspaceSpec {
        WorkspaceSpec {
            source: source.map(|p| p.to_string_lossy().into_owned()),
            dir: None,
            guest: None,
            cleanup,
        }
    }

    #[test]
    fn a_source_is_copied_without_its_symlinks_and_cleaned_per_policy() {
        let tmp = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(tmp.path()).unwrap();
        let src = root.join("src");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::write(src.join("a.txt"), "a").unwrap();
        std::fs::write(src.join("sub/b.txt"), "b").unwrap();
        std::os::unix::fs::symlink("/etc", src.join("etc")).unwrap();
        let ws = Workspace::prepare(
            &spec(Some(&src), WorkspaceCleanup::OnSuccess),
            std::slice::from_ref(&root),
            &root.join("ws"),
            "r_1",
        )
        .unwrap();
        assert!(ws.owned);
        assert_eq!(ws.guest, DEFAULT_GUEST);
        assert_eq!(
            std::fs::read_to_string(ws.host.join("sub/b.txt")).unwrap(),
            "b"
        );
        assert!(!ws.host.join("etc").exists(), "symlinks are not copied");
        assert!(!ws.finish(RunState::Failed).unwrap());
        assert!(ws.host.exists(), "on_success keeps a failed run's copy");
        assert!(ws.finish(RunState::Succeeded).unwrap());
        assert!(!ws.host.exists());
        assert!(src.join("a.txt").exists(), "the source is never touched");
    }

    #[test]
    fn a_dir_used_in_place_is_never_deleted() {
        let tmp = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(tmp.path()).unwrap();
        let ws = Workspace::prepare(
            &WorkspaceSpec {
                dir: Some(root.to_string_lossy().into_owned()),
                ..WorkspaceSpec::default()
            },
            std::slice::from_ref(&root),
            &root.join("ws"),
            "r_1",
        )
        .unwrap();
        assert!(!ws.owned);
        assert!(!ws.finish(RunState::Succeeded).unwrap());
        assert!(root.exists());
    }

    #[test]
    fn bad_workspaces_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(tmp.path()).unwrap();
        let allowed = root.join("allowed");
        std::fs::create_dir_all(&allowed).unwrap();
        let prep = |s: WorkspaceSpec| {
            Workspace::prepare(&s, std::slice::from_ref(&allowed), &root.join("ws"), "r")
        };
        assert!(matches!(
            prep(spec(Some(&root), WorkspaceCleanup::Always)),
            Err(WorkspaceError::NotAllowed(_))
        ));
        assert!(matches!(
            prep(WorkspaceSpec::default()),
            Err(WorkspaceError::OneOf)
        ));
        assert!(matches!(
            prep(WorkspaceSpec {
                source: Some("relative".into()),
                ..WorkspaceSpec::default()
            }),
            Err(WorkspaceError::NotAbsolute(_))
        ));
        assert!(matches!(
            prep(WorkspaceSpec {
                source: Some(allowed.to_string_lossy().into_owned()),
                guest: Some("ws".into()),
                ..WorkspaceSpec::default()
            }),
            Err(WorkspaceError::Guest(_))
        ));
    }

    #[test]
    fn copies_under_lists_run_named_directories_only() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("instance");
        assert!(
            copies_under(&root).unwrap().is_empty(),
            "a missing root has none"
        );
        let (a, b, file, link) = (
            crate::db::new_run_id(),
            crate::db::new_run_id(),
            crate::db::new_run_id(),
            crate::db::new_run_id(),
        );
        std::fs::create_dir_all(root.join(&b).join("sub")).unwrap();
        std::fs::create_dir(root.join(&a)).unwrap();
        std::fs::create_dir(root.join("other")).unwrap();
        std::fs::create_dir(root.join("r_backup")).unwrap();
        std::fs::write(root.join(file), "x").unwrap();
        std::os::unix::fs::symlink(dir.path(), root.join(link)).unwrap();
        assert_eq!(copies_under(&root).unwrap(), [a, b]);
    }
}
