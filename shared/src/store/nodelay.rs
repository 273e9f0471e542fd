//! `TCP_NODELAY` on the connections to a database server.
//!
//! sqlx 0.9.0 stopped setting `TCP_NODELAY` on its sockets (upstream issue 4335, fixed after
//! that release). Without it, a message larger than what the socket takes in one write (its
//! first send buffer is 16 KiB on Linux) leaves in two parts, and Nagle's algorithm holds the
//! second until the server acknowledges the first, which a server delays by up to 40 ms. A
//! cleanup batch naming ~1,400 ids crosses that size: on PostgreSQL those batches took 40–90 ms
//! more than their statement (bench/results/cleanup.md). sqlx offers no hook on its socket, so
//! each new connection sets the option on every TCP socket of this process that is connected
//! to the server's address; the ones already set are set again, which changes nothing.
//! That is after the TLS handshake, which sqlx runs first: its small messages still wait for
//! delayed ACKs, so a new PostgreSQL connection with TLS took ~88 ms here, ~2 ms without.
//! Remove this module once sqlx sets the option itself again.

use std::net::SocketAddr;

/// A database server's address as the connection options name it.
#[derive(Debug, Clone)]
pub struct Server {
    host: String,
    port: u16,
}

impl Server {
    /// The server at `host:port`; `None` for a Unix socket, where Nagle does not apply.
    pub fn new(host: &str, port: u16, unix_socket: bool) -> Option<Server> {
        (!unix_socket && !host.starts_with('/')).then(|| Server {
            host: host.trim_matches(|c| c == '[' || c == ']').to_string(),
            port,
        })
    }

    /// The addresses it resolves to now (resolved on each call, so a DNS change that moves the
    /// server is followed); empty when it does not resolve, as connecting then says.
    pub async fn addresses(&self) -> Vec<SocketAddr> {
        match tokio::net::lookup_host((self.host.as_str(), self.port)).await {
            Ok(addrs) => addrs.collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Sets `TCP_NODELAY` on every socket of this process connected to the server; returns
    /// how many it set.
    pub async fn set_nodelay_on_connections(&self) -> usize {
        set_on_connections_to(&self.addresses().await)
    }
}

/// Sets `TCP_NODELAY` on every TCP socket of this process connected to one of `servers`;
/// returns how many sockets it set. Errors are ignored: without the option a connection
/// works, only slower.
pub fn set_on_connections_to(servers: &[SocketAddr]) -> usize {
    let mut set = 0;
    for_each_connection_to(servers, |s| {
        set += usize::from(s.set_tcp_nodelay(true).is_ok())
    });
    set
}

/// How many TCP sockets of this process are connected to one of `servers`, and how many of
/// them have `TCP_NODELAY`.
pub fn count_connections_to(servers: &[SocketAddr]) -> (usize, usize) {
    let (mut all, mut set) = (0, 0);
    for_each_connection_to(servers, |s| {
        all += 1;
        set += usize::from(s.tcp_nodelay().unwrap_or(false));
    });
    (all, set)
}

/// Calls `f` with each socket of this process connected to one of `servers`, found through
/// `/proc/self/fd`.
#[cfg(target_os = "linux")]
fn for_each_connection_to(servers: &[SocketAddr], mut f: impl FnMut(socket2::SockRef<'_>)) {
    use std::os::fd::BorrowedFd;

    if servers.is_empty() {
        return;
    }
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    for fd in fds {
        // SAFETY: `fd` was open when the directory was read. Another thread may close it (or
        // reuse the number) before the calls below: they then fail with EBADF or see whatever
        // the number names now, and only a TCP socket connected to the database server is
        // touched, with an option that changes latency, not data.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let sock = socket2::SockRef::from(&fd);
        let connected_to_server = sock
            .peer_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .is_some_and(|peer| servers.contains(&peer));
        if connected_to_server {
            f(sock);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn for_each_connection_to(_servers: &[SocketAddr], _f: impl FnMut(socket2::SockRef<'_>)) {}
