//! A small typed client for the daemon's API, used by the CLI and by tests.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::Value;

use super::ErrorBody;

/// The daemon answered with an error status (callers that care, like the CNI plugin,
/// downcast to it; everyone else sees the message).
#[derive(Debug)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ApiError {}

/// No daemon listens on the socket.
#[derive(Debug)]
pub struct Unreachable(pub String);

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unreachable {}

pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: &Path) -> Self {
        Self { socket: socket.to_owned() }
    }

    /// Sends one request; a non-2xx answer becomes an error carrying the daemon's message.
    pub async fn request(&self, method: Method, path: &str, body: Option<&impl Serialize>) -> Result<Bytes> {
        let resp = self.send(method, path, body).await?;
        Ok(resp.into_body().collect().await.context("reading the daemon's answer")?.to_bytes())
    }

    /// GETs a stream of lines (NDJSON) and hands each to `each` as it arrives, until the
    /// daemon ends the stream (Ok) or `each` returns false.
    pub async fn get_lines(&self, path: &str, mut each: impl FnMut(&str) -> bool) -> Result<()> {
        let mut body = self.send(Method::GET, path, None::<&()>).await?.into_body();
        let mut buf: Vec<u8> = vec![];
        while let Some(frame) = body.frame().await {
            let frame = frame.context("reading from the daemon")?;
            let Some(data) = frame.data_ref() else { continue };
            buf.extend_from_slice(data);
            while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                if !each(String::from_utf8_lossy(&line[..nl]).trim_end()) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Sends one request and returns the answer with its body unread; a non-2xx answer
    /// becomes an error carrying the daemon's message.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<hyper::Response<hyper::body::Incoming>> {
        let stream = tokio::net::UnixStream::connect(&self.socket).await.map_err(|e| {
            anyhow::Error::new(Unreachable(format!(
                "cannot connect to the netpath daemon at {}: {e}. Is `netpath daemon` running? (set --socket or NETPATH_SOCKET)",
                self.socket.display()
            )))
        })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.context("talking to the daemon")?;
        tokio::spawn(conn);
        let payload = match body {
            Some(b) => Bytes::from(serde_json::to_vec(b)?),
            None => Bytes::new(),
        };
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "netpath")
            .header("content-type", "application/json")
            .body(Full::new(payload))?;
        let resp = sender.send_request(req).await.context("talking to the daemon")?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let bytes = resp.into_body().collect().await.context("reading the daemon's answer")?.to_bytes();
        let msg = serde_json::from_slice::<ErrorBody>(&bytes)
            .map(|e| e.message)
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
        Err(ApiError { status: status.as_u16(), message: msg }.into())
    }

    pub async fn get(&self, path: &str) -> Result<Value> {
        json(self.request(Method::GET, path, None::<&()>).await?)
    }

    pub async fn post(&self, path: &str, body: &impl Serialize) -> Result<Value> {
        json(self.request(Method::POST, path, Some(body)).await?)
    }

    pub async fn delete(&self, path: &str) -> Result<()> {
        self.request(Method::DELETE, path, None::<&()>).await.map(|_| ())
    }
}

fn json(b: Bytes) -> Result<Value> {
    if b.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&b).context("the daemon sent invalid JSON")
}

/// Escapes a name for use in a URL path segment.
pub fn seg(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
