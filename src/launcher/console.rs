//! The serial console: QEMU writes it on its stdout, the launcher copies every byte to the
//! container log (its own stdout: `kubectl logs <vm>-launcher`) and to each client of the console
//! socket (`kubectl vmkeep console`, through `vmkeep console` run in the container). A new client
//! first gets the last [`HISTORY_BYTES`] of output; what any client types goes to the guest.

use std::{
    collections::VecDeque,
    path::Path,
    sync::{Arc, Mutex},
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{UnixListener, UnixStream},
    sync::{broadcast, mpsc},
};
use tracing::{debug, warn};

/// How much recent console output a newly attached client is shown.
pub const HISTORY_BYTES: usize = 64 * 1024;

#[derive(Default)]
struct History {
    bytes: VecDeque<u8>,
}

/// Relays QEMU's console (`output`, `input`) to the log and to clients of `socket`. Returns when
/// QEMU closes its output.
pub async fn relay(
    mut output: impl AsyncRead + Unpin + Send + 'static,
    mut input: impl AsyncWrite + Unpin + Send + 'static,
    socket: &Path,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket)?;
    let history = Arc::new(Mutex::new(History::default()));
    let (out_tx, _) = broadcast::channel::<Arc<[u8]>>(256);
    let (in_tx, mut in_rx) = mpsc::channel::<Vec<u8>>(64);
    tokio::spawn(async move {
        while let Some(bytes) = in_rx.recv().await {
            if input.write_all(&bytes).await.is_err() || input.flush().await.is_err() {
                break;
            }
        }
    });
    {
        let (history, out_tx) = (history.clone(), out_tx.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                // Subscribe under the history lock: nothing is missed or shown twice.
                let (past, rx) = {
                    let h = history.lock().expect("console history");
                    (h.bytes.iter().copied().collect::<Vec<u8>>(), out_tx.subscribe())
                };
                tokio::spawn(client(stream, past, rx, in_tx.clone()));
            }
        });
    }
    Ok(tokio::spawn(async move {
        let mut log = tokio::io::stdout();
        let mut buf = vec![0u8; 8192];
        loop {
            let n = match output.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let chunk: Arc<[u8]> = Arc::from(&buf[..n]);
            {
                let mut h = history.lock().expect("console history");
                h.bytes.extend(chunk.iter());
                let excess = h.bytes.len().saturating_sub(HISTORY_BYTES);
                h.bytes.drain(..excess);
                let _ = out_tx.send(chunk.clone());
            }
            if log.write_all(&chunk).await.is_err() || log.flush().await.is_err() {
                warn!("cannot write the console to the container log");
            }
        }
    }))
}

async fn client(
    stream: UnixStream,
    past: Vec<u8>,
    mut output: broadcast::Receiver<Arc<[u8]>>,
    input: mpsc::Sender<Vec<u8>>,
) {
    let (mut reader, mut writer) = stream.into_split();
    let to_client = async move {
        writer.write_all(&past).await?;
        loop {
            match output.recv().await {
                Ok(chunk) => writer.write_all(&chunk).await?,
                // A client too slow for the console loses some output, not its connection.
                Err(broadcast::error::RecvError::Lagged(n)) => debug!(chunks = n, "console client lagged"),
                Err(broadcast::error::RecvError::Closed) => return Ok::<_, std::io::Error>(()),
            }
        }
    };
    let from_client = async move {
        let mut buf = vec![0u8; 1024];
        loop {
            let n = reader.read(&mut buf).await?;
            if n == 0 || input.send(buf[..n].to_vec()).await.is_err() {
                return Ok::<_, std::io::Error>(());
            }
        }
    };
    tokio::select! {
        _ = to_client => {}
        _ = from_client => {}
    }
}

/// `vmkeep console`, run inside the launcher container (by `kubectl vmkeep console` over an
/// exec stream): copies stdin to the console socket and the console to stdout until either ends.
pub async fn attach(socket: &Path) -> anyhow::Result<()> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|e| anyhow::anyhow!("no console at {} (is the VM running?): {e}", socket.display()))?;
    let (mut reader, mut writer) = stream.into_split();
    let out = async move {
        let mut stdout = tokio::io::stdout();
        let mut buf = vec![0u8; 8192];
        loop {
            let n = reader.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(());
            }
            stdout.write_all(&buf[..n]).await?;
            stdout.flush().await?;
        }
    };
    let inp = async move {
        tokio::io::copy(&mut tokio::io::stdin(), &mut writer).await?;
        // Input ended: the console still streams (until the client goes or the VM stops).
        std::future::pending::<()>().await;
        Ok::<_, std::io::Error>(())
    };
    tokio::select! {
        r = out => r?,
        r = inp => r?,
    }
    Ok(())
}
