//! `vmms connect-vm NAME [--launch]`: the VM's console over RDP through the daemon's single-port
//! listener, as VMConnect reaches a Hyper-V VM: FreeRDP's `/vmconnect:<GUID>` (TLS right after
//! the pre-connection PDU, then NLA with the console account, then the console).
//!
//! The password never appears on a command line (where `ps` and /proc show it to every user):
//! the printed line asks FreeRDP to read it from standard input (`/from-stdin:force`, FreeRDP
//! 2.x), and `--launch` writes it there.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::api::ApiError;
use crate::cli::{Cli, CliError};
use crate::rdp::{INFO_FILE, ListenerInfo, parse_credentials};

/// FreeRDP's X11 client, as Debian names it (freerdp2-x11; freerdp3-x11 calls it xfreerdp3).
const CLIENTS: [&str; 2] = ["xfreerdp", "xfreerdp3"];

/// Prints (or with `launch`, runs) the FreeRDP command line for the VM's console.
pub fn connect_vm(cli: &Cli<'_>, launch: bool) -> Result<(), CliError> {
    let fail = |error: ApiError| CliError {
        verb: cli.verb,
        target: cli.target.clone(),
        error,
    };
    let vm = cli.find()?;
    if vm.process_id.is_none() {
        return Err(fail(ApiError::with_code(
            32775,
            format!("the VM is {}; only a running VM has a console", vm.state),
        )));
    }
    let info_path = cli.store.join(INFO_FILE);
    let info: ListenerInfo = std::fs::read(&info_path)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .ok_or_else(|| {
            fail(ApiError::new(format!(
                "no RDP listener information in {} (is the daemon serving with RDP?)",
                info_path.display()
            )))
        })?;
    let password = std::fs::read_to_string(&info.credentials)
        .ok()
        .and_then(|text| parse_credentials(&text))
        .map(|c| c.password)
        .ok_or_else(|| {
            fail(ApiError::new(format!(
                "cannot read the console account from {}",
                info.credentials.display()
            )))
        })?;
    let host = if info.address.ip().is_unspecified() {
        "127.0.0.1".to_owned()
    } else {
        info.address.ip().to_string()
    };
    let client = CLIENTS
        .iter()
        .find(|name| on_path(name))
        .copied()
        .unwrap_or(CLIENTS[0]);
    let args = [
        // FreeRDP 2's /vmconnect forces port 2179 over /v:HOST:PORT; /port: wins.
        format!("/v:{host}"),
        format!("/port:{}", info.address.port()),
        format!("/vmconnect:{}", vm.id),
        "/cert:ignore".to_owned(),
        format!("/u:{}", info.username),
        // The password comes on standard input, read before connecting.
        "/from-stdin:force".to_owned(),
        format!("/t:{} (COM1)", vm.name),
    ];
    if !launch {
        let quoted: Vec<String> = args.iter().map(|a| shell_quote(a)).collect();
        // Only the file's name: FreeRDP asks for the password (echo off) before connecting.
        out!(
            "{client} {}    # asks for the password (in {}); --launch gives it",
            quoted.join(" "),
            info.credentials.display()
        );
        return Ok(());
    }
    let mut child = Command::new(client)
        .args(&args)
        .stdin(Stdio::piped())
        .spawn()
        .map_err(|e| fail(ApiError::new(format!("cannot run {client}: {e}"))))?;
    // FreeRDP reads one line; closing the pipe afterwards leaves it nothing else to read.
    if let Some(mut stdin) = child.stdin.take()
        && let Err(e) = stdin.write_all(format!("{password}\n").as_bytes())
    {
        let _ = child.kill();
        let _ = child.wait();
        return Err(fail(ApiError::new(format!(
            "cannot give {client} the password: {e}"
        ))));
    }
    let status = child
        .wait()
        .map_err(|e| fail(ApiError::new(format!("cannot wait for {client}: {e}"))))?;
    if status.success() {
        Ok(())
    } else {
        Err(fail(ApiError::new(format!("{client} ended with {status}"))))
    }
}

fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(name).is_file()))
}

/// A word as a POSIX shell reads it back unchanged.
fn shell_quote(word: &str) -> String {
    let plain = word
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "/:.,_-=@+".contains(c));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}
