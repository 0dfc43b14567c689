//! A blocking S3 client: `object_store`'s async Amazon S3 client driven by a small private tokio
//! runtime, so the rest of arkvm stays synchronous. Configured from a `s3://BUCKET/PREFIX` URL
//! and the `AWS_*` environment variables; the secret key never appears in an error.

use std::sync::Arc;
use std::time::Duration;

use futures_util::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
    RetryConfig,
};

use super::error::S3Error;

/// Worker threads of the private runtime: requests are issued one at a time per caller thread,
/// so two workers keep a few callers busy without taking the VMM's cores.
const WORKER_THREADS: usize = 2;

/// Transient failures (connection errors, 5xx, throttling) are retried this many times, with
/// exponential backoff from [`INITIAL_BACKOFF`] up to [`MAX_BACKOFF`], for at most
/// [`RETRY_TIMEOUT`] per request.
const MAX_RETRIES: usize = 10;
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
const RETRY_TIMEOUT: Duration = Duration::from_secs(30);
/// A TCP connection that is not up after this long counts as failed (and is retried).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// One request (a chunk of at most a few MiB) that takes longer than this is failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// A parsed `s3://BUCKET/PREFIX` repository URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Url {
    /// The bucket.
    pub bucket: String,
    /// The key prefix of the repository's objects: empty, or `/`-separated components ending
    /// in `/`.
    pub prefix: String,
}

impl S3Url {
    /// Parses `s3://BUCKET[/PREFIX]`; `None` if `url` is not an `s3://` URL at all.
    pub fn parse(url: &str) -> Option<Result<Self, S3Error>> {
        let rest = url.strip_prefix("s3://")?;
        let bad = |problem: &str| {
            Some(Err(S3Error::BadUrl {
                url: url.chars().take(200).collect(),
                problem: problem.to_string(),
            }))
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !bucket_ok {
            return bad("the bucket name must be 3-63 characters of a-z 0-9 . -");
        }
        let prefix = prefix.trim_end_matches('/');
        let component_ok = |c: &str| {
            !c.is_empty()
                && !c.starts_with('.')
                && c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
        };
        if !prefix.is_empty() && !prefix.split('/').all(component_ok) {
            return bad("the prefix must be /-separated components of A-Z a-z 0-9 . _ -");
        }
        Some(Ok(Self {
            bucket: bucket.to_string(),
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
        }))
    }
}

impl std::fmt::Display for S3Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "s3://{}/{}",
            self.bucket,
            self.prefix.trim_end_matches('/')
        )
    }
}

/// One listed object.
#[derive(Clone, Debug)]
pub struct Listed {
    /// The name below the repository prefix.
    pub name: String,
    /// When the server last wrote it, in ms since the Unix epoch.
    pub modified_unix_ms: i64,
    /// Its entity tag, if the server gave one.
    pub etag: Option<String>,
}

/// A blocking client of one bucket, below one prefix.
pub struct S3Client {
    runtime: tokio::runtime::Runtime,
    store: Arc<AmazonS3>,
    url: S3Url,
    endpoint: String,
    secret: String,
}

/// What a failed request was, for [`S3Client::classify`].
pub enum Failure {
    /// The object does not exist.
    NotFound,
    /// A conditional create found the object there.
    Exists,
    /// Anything else, as a one-line description without secrets.
    Other(String),
}

impl S3Client {
    /// A client for `url` configured from the environment: `AWS_ENDPOINT_URL` (default: AWS),
    /// `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` (required), `AWS_SESSION_TOKEN`,
    /// `AWS_REGION` (default `us-east-1`), `AWS_ALLOW_HTTP` (`true` for plain HTTP).
    pub fn from_env(url: &S3Url) -> Result<Self, S3Error> {
        let var = |name: &'static str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let access = var("AWS_ACCESS_KEY_ID").ok_or(S3Error::MissingEnv {
            name: "AWS_ACCESS_KEY_ID",
        })?;
        let secret = var("AWS_SECRET_ACCESS_KEY").ok_or(S3Error::MissingEnv {
            name: "AWS_SECRET_ACCESS_KEY",
        })?;
        let region = var("AWS_REGION")
            .or_else(|| var("AWS_DEFAULT_REGION"))
            .unwrap_or_else(|| "us-east-1".into());
        let allow_http = var("AWS_ALLOW_HTTP").is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let endpoint =
            var("AWS_ENDPOINT_URL").unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"));
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&url.bucket)
            .with_region(&region)
            .with_endpoint(&endpoint)
            .with_access_key_id(access)
            .with_secret_access_key(&secret)
            .with_allow_http(allow_http)
            .with_virtual_hosted_style_request(false)
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: INITIAL_BACKOFF,
                    max_backoff: MAX_BACKOFF,
                    base: 2.0,
                },
                max_retries: MAX_RETRIES,
                retry_timeout: RETRY_TIMEOUT,
            })
            .with_client_options(
                ClientOptions::new()
                    .with_allow_http(allow_http)
                    .with_connect_timeout(CONNECT_TIMEOUT)
                    .with_timeout(REQUEST_TIMEOUT),
            );
        if let Some(token) = var("AWS_SESSION_TOKEN") {
            builder = builder.with_token(token);
        }
        let store = builder.build().map_err(|e| S3Error::Config {
            problem: scrub(&e.to_string(), &secret),
        })?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(WORKER_THREADS)
            .thread_name("arkvm-s3")
            .on_thread_start(crate::thread_hook::on_thread_start)
            .enable_all()
            .build()
            .map_err(|source| S3Error::Runtime { source })?;
        Ok(Self {
            runtime,
            store: Arc::new(store),
            url: url.clone(),
            endpoint,
            secret,
        })
    }

    /// The repository URL.
    pub fn url(&self) -> &S3Url {
        &self.url
    }

    fn path(&self, name: &str) -> Result<ObjectPath, object_store::Error> {
        ObjectPath::parse(format!("{}{name}", self.url.prefix)).map_err(Into::into)
    }

    /// Creates `name` unless it exists (`If-None-Match: *`, one PUT, never multipart).
    pub fn put_create(&self, name: &str, bytes: &[u8]) -> Result<(), object_store::Error> {
        let path = self.path(name)?;
        let options = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        let payload = PutPayload::from(bytes.to_vec());
        self.runtime
            .block_on(self.store.put_opts(&path, payload, options))
            .map(drop)
    }

    /// The bytes of `name`, and its entity tag if the server gave one.
    pub fn get(&self, name: &str) -> Result<(Vec<u8>, Option<String>), object_store::Error> {
        let path = self.path(name)?;
        self.runtime.block_on(async {
            let result = self.store.get(&path).await?;
            let etag = result.meta.e_tag.clone();
            Ok((result.bytes().await?.to_vec(), etag))
        })
    }

    /// Whether `name` exists.
    pub fn head(&self, name: &str) -> Result<bool, object_store::Error> {
        let path = self.path(name)?;
        match self.runtime.block_on(self.store.head(&path)) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The first of `names` that does not exist (HEADs, `in_flight` at a time), if any.
    pub fn first_missing(
        &self,
        names: &[String],
        in_flight: usize,
    ) -> Result<Option<String>, (String, object_store::Error)> {
        use futures_util::StreamExt;
        self.runtime.block_on(async {
            let mut heads = futures_util::stream::iter(names)
                .map(|name| async move {
                    let path = self.path(name).map_err(|e| (name.clone(), e))?;
                    match self.store.head(&path).await {
                        Ok(_) => Ok(None),
                        Err(object_store::Error::NotFound { .. }) => Ok(Some(name.clone())),
                        Err(e) => Err((name.clone(), e)),
                    }
                })
                .buffer_unordered(in_flight.max(1));
            while let Some(answer) = heads.next().await {
                if let Some(missing) = answer? {
                    return Ok(Some(missing));
                }
            }
            Ok(None)
        })
    }

    /// Every object below `folder` (a `/`-terminated folder below the prefix, or empty).
    pub fn list(&self, folder: &str) -> Result<Vec<Listed>, object_store::Error> {
        let full = format!("{}{folder}", self.url.prefix);
        let full = full.trim_end_matches('/');
        let prefix = (!full.is_empty())
            .then(|| ObjectPath::parse(full))
            .transpose()?;
        let metas: Vec<_> = self
            .runtime
            .block_on(self.store.list(prefix.as_ref()).try_collect())?;
        Ok(metas
            .into_iter()
            .filter_map(|meta| {
                let name = meta.location.as_ref().strip_prefix(&self.url.prefix)?;
                Some(Listed {
                    name: name.to_string(),
                    modified_unix_ms: meta.last_modified.timestamp_millis(),
                    etag: meta.e_tag,
                })
            })
            .collect())
    }

    /// Removes `name` (absent is fine).
    pub fn delete(&self, name: &str) -> Result<(), object_store::Error> {
        let path = self.path(name)?;
        match self.runtime.block_on(self.store.delete(&path)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Sorts a failure into what the store reports, with a short sentence for the common
    /// misconfigurations and the secret key removed from anything quoted.
    pub fn classify(&self, e: &object_store::Error) -> Failure {
        let text = crate::error::error_chain(e);
        if text.contains("NoSuchBucket") {
            return Failure::Other(format!("bucket '{}' does not exist", self.url.bucket));
        }
        match e {
            object_store::Error::NotFound { .. } => return Failure::NotFound,
            object_store::Error::AlreadyExists { .. }
            | object_store::Error::Precondition { .. } => return Failure::Exists,
            _ => {}
        }
        let problem = if [
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "AccessDenied",
            "403",
        ]
        .iter()
        .any(|s| text.contains(s))
        {
            "access denied: check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY".to_string()
        } else if ["connect", "sending request", "timed out", "dns error"]
            .iter()
            .any(|s| text.contains(s))
        {
            format!("cannot reach the object store at {}", self.endpoint)
        } else {
            let one_line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
            one_line.chars().take(300).collect()
        };
        Failure::Other(scrub(&problem, &self.secret))
    }
}

/// `text` with every occurrence of `secret` blanked out.
fn scrub(text: &str, secret: &str) -> String {
    if secret.is_empty() {
        text.to_string()
    } else {
        text.replace(secret, "<secret>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_into_bucket_and_prefix() {
        let url = |t: &str| S3Url::parse(t).map(|r| r.map_err(|e| e.to_string()));
        assert!(url("/var/repo").is_none());
        assert!(url("relative/s3://x").is_none());
        let ok = url("s3://bucket/a/b/").unwrap().unwrap();
        assert_eq!((ok.bucket.as_str(), ok.prefix.as_str()), ("bucket", "a/b/"));
        assert_eq!(ok.to_string(), "s3://bucket/a/b");
        let bare = url("s3://bucket").unwrap().unwrap();
        assert_eq!(bare.prefix, "");
        for bad in [
            "s3://",
            "s3://ab/x",
            "s3://Bucket/x",
            "s3://bucket/a//b",
            "s3://bucket/../x",
            "s3://bucket/a b",
        ] {
            assert!(url(bad).unwrap().is_err(), "{bad}");
        }
    }

    #[test]
    fn secrets_are_scrubbed() {
        assert_eq!(scrub("key=abc123 end", "abc123"), "key=<secret> end");
        assert_eq!(scrub("nothing", ""), "nothing");
    }
}
