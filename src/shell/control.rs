//! The root-only control socket that `detourctl` talks to (protocol in [`crate::ctl`]).
//!
//! The socket file is mode 0600 and every connection's peer credentials must be uid 0.
//! A request that is not valid JSON, too long, or unknown gets an error answer; the daemon
//! keeps serving.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::ctl::{Request, Response, MAX_REQUEST};

/// Answers one request.
pub type Handler = Arc<dyn Fn(Request) -> futures::future::BoxFuture<'static, Response> + Send + Sync>;

/// Binds the control socket. Refuses to start when another daemon answers on it; removes a
/// stale socket file left by a crash.
///
/// # Errors
/// If another daemon is running or the socket cannot be created.
pub fn bind(path: &Path) -> Result<UnixListener> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("another detourd is running (its control socket {} answers)", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale control socket {}", path.display()))?;
    }
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
        }
    }
    let listener = UnixListener::bind(path).with_context(|| format!("binding control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves requests until the task is dropped.
pub async fn serve(listener: UnixListener, handler: Handler) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let h = handler.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), one(stream, h)).await;
        });
    }
}

async fn one(stream: UnixStream, handler: Handler) -> std::io::Result<()> {
    let uid = stream.peer_cred().map(|c| c.uid()).unwrap_or(u32::MAX);
    let (read, mut write) = stream.into_split();
    let response = if uid != 0 {
        Response::Error { message: "the control socket is for root only".into() }
    } else {
        let mut line = Vec::new();
        let mut reader = BufReader::new(read).take(MAX_REQUEST as u64 + 1);
        reader.read_until(b'\n', &mut line).await?;
        if line.len() > MAX_REQUEST {
            Response::Error { message: format!("request longer than {MAX_REQUEST} bytes") }
        } else {
            match serde_json::from_slice::<Request>(&line) {
                Ok(req) => handler(req).await,
                Err(e) => Response::Error { message: format!("bad request: {e}") },
            }
        }
    };
    let mut out = serde_json::to_vec(&response).unwrap_or_else(|_| b"{\"result\":\"error\",\"message\":\"encoding\"}".to_vec());
    out.push(b'\n');
    write.write_all(&out).await?;
    write.shutdown().await
}

/// Client side: sends one request and reads the answer.
///
/// # Errors
/// A clear message when the daemon is not running, or I/O and decoding errors.
pub async fn request(path: &Path, req: &Request) -> Result<Response> {
    let mut stream = match UnixStream::connect(path).await {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => {
            bail!("detourd is not running (no daemon answers on {})", path.display())
        }
        Err(e) => return Err(e).with_context(|| format!("connecting to {}", path.display())),
    };
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    stream.write_all(&line).await?;
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).await?;
    serde_json::from_slice(&buf).context("decoding the daemon's answer")
}
