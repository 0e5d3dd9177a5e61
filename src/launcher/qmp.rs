//! A QMP (QEMU Machine Protocol) client: JSON lines over a Unix socket. The launcher needs four
//! commands (`qmp_capabilities`, `query-status`, `system_powerdown`, `quit`), so this is a few
//! lines rather than a dependency on a crate generating the whole QAPI schema (the `qapi` crate
//! compiles thousands of types). Protocol: docs/interop/qmp-spec.rst in QEMU.

use std::{path::Path, time::Duration};

use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixStream, unix::OwnedWriteHalf},
};

/// A QMP connection in command mode.
pub struct Qmp {
    lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    writer: OwnedWriteHalf,
}

impl Qmp {
    /// Connects to `socket`, retrying for up to `wait` while QEMU creates it, reads the greeting
    /// and enters command mode. Errors: no socket in time, an I/O error, a refusal.
    pub async fn connect(socket: &Path, wait: Duration) -> anyhow::Result<Self> {
        let deadline = tokio::time::Instant::now() + wait;
        let stream = loop {
            match UnixStream::connect(socket).await {
                Ok(stream) => break stream,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    anyhow::bail!("cannot connect to QMP at {}: {e}", socket.display())
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let (reader, writer) = stream.into_split();
        let mut qmp = Qmp { lines: BufReader::new(reader).lines(), writer };
        let greeting = qmp.next().await?;
        anyhow::ensure!(greeting.get("QMP").is_some(), "not a QMP greeting: {greeting}");
        qmp.execute("qmp_capabilities").await?;
        Ok(qmp)
    }

    async fn next(&mut self) -> anyhow::Result<Value> {
        let line = self.lines.next_line().await?.ok_or_else(|| anyhow::anyhow!("QMP connection closed"))?;
        Ok(serde_json::from_str(&line)?)
    }

    /// Runs `command` and returns its `return` value; asynchronous events read meanwhile are
    /// skipped. Errors: QEMU's `error` reply (its class and description), a closed connection.
    pub async fn execute(&mut self, command: &str) -> anyhow::Result<Value> {
        let mut line = serde_json::to_vec(&json!({ "execute": command }))?;
        line.push(b'\n');
        self.writer.write_all(&line).await?;
        loop {
            let reply = self.next().await?;
            if let Some(value) = reply.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = reply.get("error") {
                anyhow::bail!("QMP {command}: {} {}", error["class"], error["desc"]);
            }
        }
    }

    /// `query-status`: whether the guest's CPUs run (`running: true`).
    pub async fn running(&mut self) -> anyhow::Result<bool> {
        Ok(self.execute("query-status").await?.get("running") == Some(&Value::Bool(true)))
    }
}
