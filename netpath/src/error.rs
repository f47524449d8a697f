//! Errors that reach a user. Each variant maps to an HTTP status on the API and to a clear
//! message from the CLI; `Internal` carries kernel or I/O failures with their context.

use std::fmt;

#[derive(Debug)]
pub enum Error {
    /// The request itself is wrong (bad CIDR, address outside the subnet, ...): HTTP 400.
    BadRequest(String),
    /// A named network or container does not exist: HTTP 404.
    NotFound(String),
    /// The request clashes with existing state (name taken, subnet overlap, in use): HTTP 409.
    Conflict(String),
    /// Something failed while carrying out a valid request: HTTP 500.
    Internal(anyhow::Error),
    /// A service the request needs cannot be reached (the cluster store): HTTP 503.
    Unavailable(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn status(&self) -> u16 {
        match self {
            Error::BadRequest(_) => 400,
            Error::NotFound(_) => 404,
            Error::Conflict(_) => 409,
            Error::Internal(_) => 500,
            Error::Unavailable(_) => 503,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::BadRequest(m) | Error::NotFound(m) | Error::Conflict(m) | Error::Unavailable(m) => f.write_str(m),
            Error::Internal(e) => write!(f, "{e:#}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<anyhow::Error> for Error {
    fn from(e: anyhow::Error) -> Self {
        Error::Internal(e)
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Internal(e.into())
    }
}

/// Shorthands that read well at the call site: `return Err(bad_request!("..."))`.
#[macro_export]
macro_rules! bad_request { ($($t:tt)*) => { $crate::error::Error::BadRequest(format!($($t)*)) } }
#[macro_export]
macro_rules! not_found { ($($t:tt)*) => { $crate::error::Error::NotFound(format!($($t)*)) } }
#[macro_export]
macro_rules! conflict { ($($t:tt)*) => { $crate::error::Error::Conflict(format!($($t)*)) } }
