//! The gateway's admin socket, where `pingate gateway stock` and `lines` ask a running gateway: a Unix socket, mode
//! 0600 (only the gateway's own user may ask), or for compatibility a TCP address (keep it on loopback: it has no
//! authentication). Accept errors are waited out with a backoff instead of spinning a core.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;

use super::Gateway;

/// Where the admin socket is: `IP:port`, or a path with a `/` in it (a Unix socket).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdminAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl AdminAddr {
    /// `IP:port`, or a Unix socket path, which must hold a `/` (`./admin.sock`, `/run/pingate/admin.sock`) so that a
    /// mistyped address is never taken for a file name; a relative path is relative to `base`.
    pub fn parse(s: &str, base: &Path) -> Result<AdminAddr, String> {
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(AdminAddr::Tcp(a));
        }
        if !s.contains('/') {
            return Err(format!(
                "`{s}`: an IP address and port (127.0.0.1:9583), or a Unix socket path with a `/` in it \
                 (/run/pingate/admin.sock, ./admin.sock)"
            ));
        }
        let path = Path::new(s);
        let path = if path.is_absolute() {
            path.to_path_buf()
        } else {
            base.join(path)
        };
        // sun_path holds 108 bytes, the last a NUL.
        if path.as_os_str().len() > 107 {
            return Err(format!(
                "{}: a Unix socket path may be 107 bytes at most",
                path.display()
            ));
        }
        Ok(AdminAddr::Unix(path))
    }
}

impl std::fmt::Display for AdminAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdminAddr::Tcp(a) => write!(f, "{a}"),
            AdminAddr::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

/// One connection to the admin socket.
pub trait AdminStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> AdminStream for T {}

/// The admin socket, listening. A Unix socket's file is removed when this is dropped (if it is still this one's).
pub enum AdminListener {
    Tcp(TcpListener),
    Unix {
        listener: UnixListener,
        /// The socket file and its (device, inode), to remove it only if nobody replaced it since.
        file: Option<(PathBuf, (u64, u64))>,
    },
}

fn identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

impl AdminListener {
    /// Binds `addr`. A Unix socket is made mode 0600; a socket file left by a gateway that is gone (nothing answers
    /// on it) is replaced, while one a running process answers on, or a file that is not a socket, is refused.
    pub async fn bind(addr: &AdminAddr) -> std::io::Result<AdminListener> {
        let path = match addr {
            AdminAddr::Tcp(a) => return TcpListener::bind(a).await.map(AdminListener::Tcp),
            AdminAddr::Unix(p) => p,
        };
        match std::fs::symlink_metadata(path) {
            Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
                if tokio::net::UnixStream::connect(path).await.is_ok() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::AddrInUse,
                        "a running process answers on this socket (another gateway?)",
                    ));
                }
                std::fs::remove_file(path)?;
            }
            Ok(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "a file that is not a socket is in the way (left alone)",
                ))
            }
            Err(_) => {}
        }
        let listener = UnixListener::bind(path)?;
        use std::os::unix::fs::PermissionsExt;
        if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        Ok(AdminListener::Unix {
            listener,
            file: identity(path).map(|id| (path.clone(), id)),
        })
    }

    /// Where it listens, for the log.
    pub fn local(&self) -> String {
        match self {
            AdminListener::Tcp(l) => l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            AdminListener::Unix { listener, .. } => listener
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| p.display().to_string()))
                .unwrap_or_default(),
        }
    }

    async fn accept(&self) -> std::io::Result<Box<dyn AdminStream>> {
        match self {
            AdminListener::Tcp(l) => l.accept().await.map(|(s, _)| Box::new(s) as Box<dyn AdminStream>),
            AdminListener::Unix { listener, .. } => listener
                .accept()
                .await
                .map(|(s, _)| Box::new(s) as Box<dyn AdminStream>),
        }
    }

    /// The next connection, or `None` once `stop` is cancelled. Accept errors (out of file descriptors and the
    /// like) are logged and waited out with `backoff`.
    pub async fn next(&self, stop: &CancellationToken, backoff: &mut AcceptBackoff) -> Option<Box<dyn AdminStream>> {
        next_accepted(|| self.accept(), stop, backoff).await
    }
}

impl Drop for AdminListener {
    fn drop(&mut self) {
        if let AdminListener::Unix {
            file: Some((path, id)), ..
        } = self
        {
            if identity(path) == Some(*id) {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

impl From<TcpListener> for AdminListener {
    fn from(l: TcpListener) -> AdminListener {
        AdminListener::Tcp(l)
    }
}

impl From<UnixListener> for AdminListener {
    fn from(listener: UnixListener) -> AdminListener {
        AdminListener::Unix { listener, file: None }
    }
}

/// The first wait after an accept error.
pub const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// The longest wait after accept errors in a row.
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The wait after an accept error: [`ACCEPT_BACKOFF_MIN`] doubling to [`ACCEPT_BACKOFF_MAX`] while errors follow each
/// other, back to the minimum once a connection is accepted.
#[derive(Debug)]
pub struct AcceptBackoff(Duration);

impl Default for AcceptBackoff {
    fn default() -> AcceptBackoff {
        AcceptBackoff(ACCEPT_BACKOFF_MIN)
    }
}

/// Accepts with `accept` until a connection comes (`Some`) or `stop` is cancelled (`None`), waiting after each error.
async fn next_accepted<S, F, Fut>(mut accept: F, stop: &CancellationToken, backoff: &mut AcceptBackoff) -> Option<S>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::io::Result<S>>,
{
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return None,
            r = accept() => r,
        };
        match accepted {
            Ok(s) => {
                backoff.0 = ACCEPT_BACKOFF_MIN;
                return Some(s);
            }
            Err(e) => {
                let wait = backoff.0;
                tracing::warn!(error = %e, wait_ms = wait.as_millis() as u64, "admin socket: accept failed");
                tokio::select! {
                    _ = stop.cancelled() => return None,
                    _ = tokio::time::sleep(wait) => {}
                }
                backoff.0 = (wait * 2).min(ACCEPT_BACKOFF_MAX);
            }
        }
    }
}

/// Connects to a gateway's admin socket: a path with a `/` is a Unix socket, anything else an `IP:port`.
pub async fn connect(addr: &str) -> std::io::Result<Box<dyn AdminStream>> {
    if addr.contains('/') {
        Ok(Box::new(tokio::net::UnixStream::connect(addr).await?))
    } else {
        Ok(Box::new(tokio::net::TcpStream::connect(addr).await?))
    }
}

/// The admin socket (a Unix socket, or TCP on loopback; see [`AdminAddr`]): a client writes one command line (`stock`,
/// `lines`, `terminals`, `unlock TERMINAL-ID`) and reads one JSON answer. Accept errors are waited out with a backoff.
pub async fn serve_admin(listener: impl Into<AdminListener>, gw: Arc<Gateway>, stop: CancellationToken) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let listener = listener.into();
    let mut backoff = AcceptBackoff::default();
    loop {
        let Some(stream) = listener.next(&stop, &mut backoff).await else {
            return;
        };
        let gw = gw.clone();
        tokio::spawn(async move {
            let (rd, mut wr) = tokio::io::split(stream);
            let mut line = String::new();
            let mut rd = BufReader::new(rd.take(256));
            let read = tokio::time::timeout(Duration::from_secs(5), rd.read_line(&mut line)).await;
            let answer = match (read, line.trim()) {
                (Ok(Ok(_)), "stock") => serde_json::to_string_pretty(&gw.stock()).unwrap_or_default(),
                (Ok(Ok(_)), "lines") => serde_json::to_string_pretty(&*gw.lines().borrow()).unwrap_or_default(),
                (Ok(Ok(_)), "terminals") => serde_json::to_string_pretty(&gw.mac_status()).unwrap_or_default(),
                (Ok(Ok(_)), cmd) if cmd.starts_with("unlock ") => {
                    let terminal = cmd["unlock ".len()..].trim();
                    let unlocked = gw.unlock_terminal(terminal);
                    serde_json::to_string_pretty(&serde_json::json!({"terminal": terminal, "unlocked": unlocked}))
                        .unwrap_or_default()
                }
                (Ok(Ok(_)), other) => format!(
                    "{{\"error\": \"unknown command `{}`; try `stock`, `lines`, `terminals` or `unlock ID`\"}}",
                    other.escape_default()
                ),
                _ => return,
            };
            let _ = wr.write_all(answer.as_bytes()).await;
            let _ = wr.write_all(b"\n").await;
        });
    }
}

/// Sends one admin command to a running gateway and returns its answer; `addr` is a Unix socket path (with a `/`)
/// or an `IP:port`.
pub async fn ask_admin(addr: &str, command: &str) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = connect(addr)
        .await
        .map_err(|e| format!("gateway admin at {addr}: {e}"))?;
    s.write_all(format!("{command}\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
        .await
        .map_err(|_| format!("gateway admin at {addr}: no answer"))?
        .map_err(|e| e.to_string())?;
    Ok(out.trim_end().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn an_address_or_a_path_with_a_slash() {
        let base = Path::new("/etc/pingate");
        assert_eq!(
            AdminAddr::parse("127.0.0.1:9583", base),
            Ok(AdminAddr::Tcp("127.0.0.1:9583".parse().unwrap()))
        );
        assert_eq!(
            AdminAddr::parse("/run/pingate/admin.sock", base),
            Ok(AdminAddr::Unix("/run/pingate/admin.sock".into()))
        );
        assert_eq!(
            AdminAddr::parse("./admin.sock", base),
            Ok(AdminAddr::Unix("/etc/pingate/./admin.sock".into()))
        );
        // A host name, or a bare word, is neither: never taken for a file in the working folder.
        for bad in ["localhost:9583", "admin.sock"] {
            assert!(AdminAddr::parse(bad, base)
                .unwrap_err()
                .contains("Unix socket path with a `/`"));
        }
        let long = format!("/{}", "x".repeat(107));
        assert!(AdminAddr::parse(&long, base).unwrap_err().contains("107 bytes at most"));
    }

    #[tokio::test(start_paused = true)]
    async fn accept_errors_are_waited_out_doubling_to_a_second() {
        let calls = AtomicUsize::new(0);
        let stop = CancellationToken::new();
        let stopper = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(4_050)).await;
            stopper.cancel();
        });
        let started = tokio::time::Instant::now();
        let at = std::sync::Mutex::new(Vec::new());
        let mut backoff = AcceptBackoff::default();
        let got = next_accepted(
            || {
                // A loop that spins (no wait) is stopped here rather than hang the test.
                if calls.fetch_add(1, Ordering::SeqCst) > 100 {
                    stop.cancel();
                }
                at.lock().unwrap().push(started.elapsed().as_millis());
                async { Err::<(), _>(std::io::Error::other("too many open files")) }
            },
            &stop,
            &mut backoff,
        )
        .await;
        assert!(got.is_none());
        // Tried at 0, then after 100, 200, 400, 800, 1000, 1000 ms: 7 tries in 4 s, not a spinning core.
        assert_eq!(*at.lock().unwrap(), [0, 100, 300, 700, 1500, 2500, 3500]);
        assert_eq!(calls.load(Ordering::SeqCst), 7);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_accepted_resets_the_backoff() {
        let n = AtomicUsize::new(0);
        let stop = CancellationToken::new();
        let started = tokio::time::Instant::now();
        let at = std::sync::Mutex::new(Vec::new());
        let mut served = 0;
        let mut backoff = AcceptBackoff::default();
        let accept = || {
            let i = n.fetch_add(1, Ordering::SeqCst);
            at.lock().unwrap().push(started.elapsed().as_millis());
            if i == 5 {
                stop.cancel();
            }
            async move {
                if i == 2 {
                    Ok(())
                } else {
                    Err(std::io::Error::other("no"))
                }
            }
        };
        let mut accept = accept;
        while next_accepted(&mut accept, &stop, &mut backoff).await.is_some() {
            served += 1;
        }
        assert_eq!(served, 1);
        // Errors at 0 and 100 ms, a connection at 300 ms, then the wait starts again from 100 ms.
        assert_eq!(*at.lock().unwrap(), [0, 100, 300, 300, 400, 600]);
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("pingate-admin-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[tokio::test]
    async fn a_unix_socket_is_mode_0600_replaces_a_stale_one_and_refuses_a_live_one_or_a_file() {
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        let d = dir("unix");
        let path = d.join("admin.sock");
        let addr = AdminAddr::Unix(path.clone());
        let l = AdminListener::bind(&addr).await.unwrap();
        let m = std::fs::symlink_metadata(&path).unwrap();
        assert!(m.file_type().is_socket());
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        assert_eq!(l.local(), path.display().to_string());
        // A second gateway on the same socket is refused while the first answers.
        let e = AdminListener::bind(&addr).await.err().expect("refused");
        assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "{e}");
        assert!(path.exists(), "the live socket is left alone");
        // A socket left behind (its gateway killed: the file stays, nobody answers) is replaced.
        let std_listener = std::os::unix::net::UnixListener::bind(d.join("stale.sock")).unwrap();
        drop(std_listener);
        assert!(d.join("stale.sock").exists());
        let stale = AdminListener::bind(&AdminAddr::Unix(d.join("stale.sock")))
            .await
            .unwrap();
        drop(stale);
        assert!(!d.join("stale.sock").exists(), "removed on drop");
        // A regular file in the way is neither removed nor used.
        std::fs::write(d.join("file.sock"), "keep me").unwrap();
        let e = AdminListener::bind(&AdminAddr::Unix(d.join("file.sock")))
            .await
            .err()
            .expect("refused");
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists, "{e}");
        assert_eq!(std::fs::read_to_string(d.join("file.sock")).unwrap(), "keep me");
        drop(l);
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(&d);
    }
}
