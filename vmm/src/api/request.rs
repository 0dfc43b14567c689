//! The requests of the control API: the typed [`ApiRequest`] handed to the VMM, the JSON bodies
//! it carries, and the routing of an HTTP method, path and body to it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use snapshot::repo::Compression;

use crate::capture::SnapshotRequest;
pub use crate::capture::{SnapshotMode, SnapshotStrategy, SnapshotTarget};
use crate::dr_checkpoints::DrConfig;
pub use crate::dr_checkpoints::MIN_DR_INTERVAL_MS;

/// One call on the control API, parsed and validated, for the VMM to act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiRequest {
    /// `GET /`: arkvm's version and the VM's state. 200 with
    /// [`RootInfo`](super::response::RootInfo).
    GetRoot,
    /// `GET /metrics`: counters in the Prometheus text format. 200, `text/plain`.
    GetMetrics,
    /// `GET /vm`: the VM's run state and configuration. Answer with [`ApiResponse::vm`].
    ///
    /// [`ApiResponse::vm`]: super::response::ApiResponse::vm
    GetVm,
    /// `PUT /vm/pause`: stop the vCPUs. 204, or 409 if the VM is not running.
    PauseVm,
    /// `PUT /vm/resume`: restart the vCPUs. 204, or 409 if the VM is not paused.
    ResumeVm,
    /// `PUT /vm/shutdown`: stop the guest and exit. 204, sent before the VMM exits.
    ShutdownVm,
    /// `PUT /snapshot`: start a snapshot. 202 with
    /// [`SnapshotStarted`](super::response::SnapshotStarted), or 409 if one is running.
    CreateSnapshot(SnapshotParams),
    /// `GET /snapshot`: progress of the running snapshot, or the outcome of the last one. 200
    /// with [`SnapshotStatus`](crate::capture::SnapshotStatus), or 404 if none was taken.
    GetSnapshot,
    /// `DELETE /snapshot`: cancel the running snapshot. 204, or 409 if none is running.
    CancelSnapshot,
    /// `PUT /dr`: start sending checkpoints to a DR receiver. 202 with
    /// [`DrStatus`](crate::dr_checkpoints::DrStatus), or 409 if DR is already running.
    StartDr(DrParams),
    /// `DELETE /dr`: stop sending checkpoints. 204, or 409 if DR is not running.
    StopDr,
    /// `GET /dr`: DR status. 200 with [`DrStatus`](crate::dr_checkpoints::DrStatus).
    GetDr,
}

/// The body of `PUT /snapshot`, validated: exactly one of `out` and `repo`; absolute paths
/// (they are resolved by the VMM process, not by the client); `strategy` only for live
/// snapshots; `key` and `compression` only with `repo`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "SnapshotBody", into = "SnapshotBody")]
pub struct SnapshotParams {
    pub target: SnapshotTarget,
    pub mode: SnapshotMode,
    /// Meaningful for [`SnapshotMode::Live`] only; `Cow` for paused snapshots.
    pub strategy: SnapshotStrategy,
    /// Key file for encryption at rest in the repository.
    pub key: Option<PathBuf>,
    /// How a backup compresses its chunks.
    pub compression: Compression,
}

impl From<SnapshotParams> for SnapshotRequest {
    fn from(p: SnapshotParams) -> Self {
        SnapshotRequest {
            target: p.target,
            mode: p.mode,
            strategy: p.strategy,
            key: p.key,
            compression: p.compression,
        }
    }
}

/// The wire form of [`SnapshotParams`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotBody {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    out: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    repo: Option<PathBuf>,
    #[serde(default)]
    mode: SnapshotMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    strategy: Option<SnapshotStrategy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    compression: Option<String>,
}

impl TryFrom<SnapshotBody> for SnapshotParams {
    type Error = String;

    fn try_from(b: SnapshotBody) -> Result<Self, String> {
        let target = match (b.out, b.repo) {
            (Some(out), None) => SnapshotTarget::Dir(require_absolute("out", out)?),
            (None, Some(repo)) if snapshot::repo::is_remote(&repo) => SnapshotTarget::Repo(repo),
            (None, Some(repo)) => SnapshotTarget::Repo(require_absolute("repo", repo)?),
            _ => return Err("exactly one of \"out\" and \"repo\" must be given".to_string()),
        };
        if b.mode == SnapshotMode::Paused && b.strategy.is_some() {
            return Err("\"strategy\" applies only to live snapshots".to_string());
        }
        let key = b.key.map(|k| require_absolute("key", k)).transpose()?;
        if key.is_some() && !matches!(target, SnapshotTarget::Repo(_)) {
            return Err("\"key\" applies only to a repository (\"repo\")".to_string());
        }
        if b.compression.is_some() && !matches!(target, SnapshotTarget::Repo(_)) {
            return Err("\"compression\" applies only to a repository (\"repo\")".to_string());
        }
        let compression = b
            .compression
            .map(|c| c.parse::<Compression>())
            .transpose()?
            .unwrap_or_default();
        Ok(SnapshotParams {
            target,
            mode: b.mode,
            strategy: b.strategy.unwrap_or_default(),
            key,
            compression,
        })
    }
}

impl From<SnapshotParams> for SnapshotBody {
    fn from(p: SnapshotParams) -> Self {
        let (out, repo) = match p.target {
            SnapshotTarget::Dir(d) => (Some(d), None),
            SnapshotTarget::Repo(r) => (None, Some(r)),
        };
        SnapshotBody {
            out,
            repo,
            mode: p.mode,
            strategy: (p.mode == SnapshotMode::Live).then_some(p.strategy),
            key: p.key,
            compression: (p.compression != Compression::default())
                .then(|| p.compression.name().to_string()),
        }
    }
}

/// The body of `PUT /dr`: where to send checkpoints, how often, and the link key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "DrBody", into = "DrBody")]
pub struct DrParams {
    /// The receiver, as `HOST:PORT`.
    pub target: String,
    /// Milliseconds between checkpoints, at least [`MIN_DR_INTERVAL_MS`].
    pub interval_ms: u64,
    /// Pre-shared key file that authenticates and encrypts the link (absolute path).
    pub key: PathBuf,
    /// Hold transmitted frames until a checkpoint after them is committed.
    pub output_commit: bool,
}

impl From<DrParams> for DrConfig {
    fn from(p: DrParams) -> Self {
        DrConfig {
            target: p.target,
            interval_ms: p.interval_ms,
            key: p.key,
            output_commit: p.output_commit,
        }
    }
}

/// The wire form of [`DrParams`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DrBody {
    target: String,
    interval_ms: u64,
    key: PathBuf,
    #[serde(default)]
    output_commit: bool,
}

impl TryFrom<DrBody> for DrParams {
    type Error = String;

    fn try_from(b: DrBody) -> Result<Self, String> {
        let port_ok = b
            .target
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !port_ok {
            return Err(format!("\"target\" must be HOST:PORT, not {:?}", b.target));
        }
        if b.interval_ms < MIN_DR_INTERVAL_MS {
            return Err(format!(
                "\"interval_ms\" must be at least {MIN_DR_INTERVAL_MS}"
            ));
        }
        Ok(DrParams {
            target: b.target,
            interval_ms: b.interval_ms,
            key: require_absolute("key", b.key)?,
            output_commit: b.output_commit,
        })
    }
}

impl From<DrParams> for DrBody {
    fn from(p: DrParams) -> Self {
        DrBody {
            target: p.target,
            interval_ms: p.interval_ms,
            key: p.key,
            output_commit: p.output_commit,
        }
    }
}

fn require_absolute(field: &str, path: PathBuf) -> Result<PathBuf, String> {
    if path.is_absolute() {
        Ok(path)
    } else {
        Err(format!(
            "\"{field}\" must be an absolute path, not {:?}",
            path.display().to_string()
        ))
    }
}

/// The body of the endpoints that take none: empty, or an empty JSON object.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoBody {}

/// Why a request could not be routed; the server answers with `status` and `message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RouteError {
    pub(crate) status: u16,
    pub(crate) message: String,
    /// For 405: the methods the path accepts.
    pub(crate) allow: Option<&'static str>,
}

impl RouteError {
    fn new(status: u16, message: String) -> Self {
        RouteError {
            status,
            message,
            allow: None,
        }
    }
}

/// The endpoints: path, and the methods it accepts.
pub(super) const ENDPOINTS: &[(&str, &str)] = &[
    ("/", "GET"),
    ("/metrics", "GET"),
    ("/vm", "GET"),
    ("/vm/pause", "PUT"),
    ("/vm/resume", "PUT"),
    ("/vm/shutdown", "PUT"),
    ("/snapshot", "GET, PUT, DELETE"),
    ("/dr", "GET, PUT, DELETE"),
];

/// Maps a method, request target and body to an [`ApiRequest`].
pub(crate) fn route(method: &str, target: &str, body: &[u8]) -> Result<ApiRequest, RouteError> {
    if target.contains('?') || target.contains('#') {
        return Err(RouteError::new(
            400,
            "query strings are not supported".to_string(),
        ));
    }
    let Some(&(path, allow)) = ENDPOINTS.iter().find(|(p, _)| *p == target) else {
        return Err(RouteError::new(
            404,
            format!("there is no endpoint at {target:?}"),
        ));
    };
    let request = match (path, method) {
        ("/", "GET") => ApiRequest::GetRoot,
        ("/metrics", "GET") => ApiRequest::GetMetrics,
        ("/vm", "GET") => ApiRequest::GetVm,
        ("/vm/pause", "PUT") => ApiRequest::PauseVm,
        ("/vm/resume", "PUT") => ApiRequest::ResumeVm,
        ("/vm/shutdown", "PUT") => ApiRequest::ShutdownVm,
        ("/snapshot", "PUT") => return parse_body(body).map(ApiRequest::CreateSnapshot),
        ("/snapshot", "GET") => ApiRequest::GetSnapshot,
        ("/snapshot", "DELETE") => ApiRequest::CancelSnapshot,
        ("/dr", "PUT") => return parse_body(body).map(ApiRequest::StartDr),
        ("/dr", "GET") => ApiRequest::GetDr,
        ("/dr", "DELETE") => ApiRequest::StopDr,
        _ => {
            return Err(RouteError {
                status: 405,
                message: format!("{target} accepts {allow}, not {method}"),
                allow: Some(allow),
            })
        }
    };
    if !body.iter().all(u8::is_ascii_whitespace) {
        parse_body::<NoBody>(body)?;
    }
    Ok(request)
}

/// Parses a JSON body; every failure is a 400 whose message says what was wrong.
fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, RouteError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(RouteError::new(
            400,
            "this endpoint needs a JSON body".to_string(),
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        let what = match e.classify() {
            serde_json::error::Category::Data => "invalid request",
            _ => "malformed JSON",
        };
        RouteError::new(400, format!("{what}: {e}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn status_of(method: &str, target: &str, body: &str) -> u16 {
        match route(method, target, body.as_bytes()) {
            Ok(_) => 200,
            Err(e) => e.status,
        }
    }

    #[test]
    fn every_endpoint_routes() {
        let cases = [
            ("GET", "/vm", ApiRequest::GetVm),
            ("PUT", "/vm/pause", ApiRequest::PauseVm),
            ("PUT", "/vm/resume", ApiRequest::ResumeVm),
            ("PUT", "/vm/shutdown", ApiRequest::ShutdownVm),
            ("GET", "/snapshot", ApiRequest::GetSnapshot),
            ("DELETE", "/snapshot", ApiRequest::CancelSnapshot),
            ("GET", "/dr", ApiRequest::GetDr),
            ("DELETE", "/dr", ApiRequest::StopDr),
        ];
        for (method, path, want) in cases {
            assert_eq!(route(method, path, b"").unwrap(), want, "{method} {path}");
            assert_eq!(
                route(method, path, b" {} ").unwrap(),
                want,
                "{method} {path}"
            );
        }
    }

    #[test]
    fn snapshot_body_defaults_and_validation() {
        let req = route("PUT", "/snapshot", br#"{"out": "/s/1"}"#).unwrap();
        assert_eq!(
            req,
            ApiRequest::CreateSnapshot(SnapshotParams {
                target: SnapshotTarget::Dir("/s/1".into()),
                mode: SnapshotMode::Live,
                strategy: SnapshotStrategy::Cow,
                key: None,
                compression: Default::default(),
            })
        );
        let req = route(
            "PUT",
            "/snapshot",
            br#"{"repo": "/r", "mode": "live", "strategy": "precopy", "key": "/k"}"#,
        )
        .unwrap();
        let ApiRequest::CreateSnapshot(p) = req else {
            panic!("wrong request {req:?}");
        };
        assert_eq!(p.target, SnapshotTarget::Repo("/r".into()));
        assert_eq!(p.strategy, SnapshotStrategy::Precopy);
        assert_eq!(p.key.as_deref(), Some(Path::new("/k")));
        let req = route(
            "PUT",
            "/snapshot",
            br#"{"repo": "/r", "compression": "off"}"#,
        )
        .unwrap();
        let ApiRequest::CreateSnapshot(p) = req else {
            panic!("not a snapshot: {req:?}");
        };
        assert_eq!(p.compression, Compression::Off);
        assert_eq!(
            serde_json::to_value(&p).unwrap()["compression"],
            serde_json::json!("off")
        );

        for bad in [
            r#"{}"#,
            r#"{"out": "/a", "repo": "/b"}"#,
            r#"{"out": "rel/dir"}"#,
            r#"{"out": "/a", "mode": "paused", "strategy": "cow"}"#,
            r#"{"out": "/a", "key": "/k"}"#,
            r#"{"out": "/a", "compression": "off"}"#,
            r#"{"repo": "/r", "compression": "zip"}"#,
            r#"{"out": "/a", "mode": "frozen"}"#,
            r#"{"out": "/a", "bogus": 1}"#,
            r#"{"out": "/a""#,
            "",
        ] {
            assert_eq!(status_of("PUT", "/snapshot", bad), 400, "{bad}");
        }
    }

    #[test]
    fn params_serialize_to_the_wire_form_and_back() {
        let p = SnapshotParams {
            target: SnapshotTarget::Dir("/x".into()),
            mode: SnapshotMode::Paused,
            strategy: SnapshotStrategy::Cow,
            key: None,
            compression: Default::default(),
        };
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(json, serde_json::json!({"out": "/x", "mode": "paused"}));
        assert_eq!(serde_json::from_value::<SnapshotParams>(json).unwrap(), p);

        let d = DrParams {
            target: "drhost:7070".into(),
            interval_ms: 1000,
            key: "/etc/arkvm/dr.key".into(),
            output_commit: true,
        };
        let json = serde_json::to_value(&d).unwrap();
        assert_eq!(serde_json::from_value::<DrParams>(json).unwrap(), d);
    }

    #[test]
    fn dr_body_validation() {
        let ok = r#"{"target": "10.0.0.2:7070", "interval_ms": 1000, "key": "/k"}"#;
        assert_eq!(status_of("PUT", "/dr", ok), 200);
        for bad in [
            r#"{"target": "10.0.0.2", "interval_ms": 1000, "key": "/k"}"#,
            r#"{"target": "h:99999", "interval_ms": 1000, "key": "/k"}"#,
            r#"{"target": "h:1", "interval_ms": 1, "key": "/k"}"#,
            r#"{"target": "h:1", "interval_ms": 1000, "key": "k"}"#,
            r#"{"target": "h:1", "interval_ms": 1000}"#,
            r#"{"target": "h:1", "interval_ms": 1000, "key": "/k", "keep": 3}"#,
        ] {
            assert_eq!(status_of("PUT", "/dr", bad), 400, "{bad}");
        }
    }

    #[test]
    fn unknown_paths_methods_and_bodies() {
        assert_eq!(status_of("GET", "/nope", ""), 404);
        assert_eq!(status_of("GET", "/vm/", ""), 404);
        assert_eq!(status_of("GET", "/vm?x=1", ""), 400);
        let e = route("POST", "/vm/pause", b"").unwrap_err();
        assert_eq!((e.status, e.allow), (405, Some("PUT")));
        assert_eq!(status_of("DELETE", "/vm", ""), 405);
        assert_eq!(status_of("PUT", "/vm/pause", r#"{"now": true}"#), 400);
        assert_eq!(status_of("PUT", "/vm/pause", "{"), 400);
        let e = route("PUT", "/vm/pause", b"nonsense").unwrap_err();
        assert!(e.message.starts_with("malformed JSON"), "{}", e.message);
        let e = route("PUT", "/vm/pause", br#"{"now": true}"#).unwrap_err();
        assert!(e.message.contains("unknown field"), "{}", e.message);
    }
}
