//! Why an S3 store cannot be opened.

use crate::repo::store::StoreError;

/// Why an S3 store cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    /// The URL is not a usable `s3://BUCKET/PREFIX`.
    #[error("'{url}' is not a usable repository URL: {problem}")]
    BadUrl {
        /// The URL (shortened).
        url: String,
        /// What is wrong.
        problem: String,
    },
    /// A required environment variable is not set.
    #[error("{name} is not set: an s3:// repository needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL for a server other than AWS) in the environment of the process that writes it (for a backup or DR of a running VM, the arkvm that runs it)")]
    MissingEnv {
        /// The variable.
        name: &'static str,
    },
    /// The S3 client refused its configuration.
    #[error("the S3 client configuration is invalid: {problem}")]
    Config {
        /// What is wrong (without secrets).
        problem: String,
    },
    /// The private runtime could not start.
    #[error("cannot start the S3 client's runtime")]
    Runtime {
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl From<S3Error> for StoreError {
    fn from(e: S3Error) -> Self {
        StoreError::Unusable {
            problem: crate::error::error_chain(&e),
        }
    }
}
