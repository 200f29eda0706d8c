//! Default identities (lease holders, field managers) when none is configured.

/// `<host>-<pid>`: the host name from `/etc/hostname` (the pod's name in a pod; empty when
/// unreadable) and this process's id.
pub fn host_pid() -> String {
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    join_host_pid(&host, std::process::id())
}

fn join_host_pid(hostname_file: &str, pid: u32) -> String {
    format!("{}-{pid}", hostname_file.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_pid_without_the_file_s_newline() {
        assert_eq!(join_host_pid("op-7d9f-x2\n", 1), "op-7d9f-x2-1");
        assert_eq!(join_host_pid("", 42), "-42");
    }

    #[test]
    fn ends_with_this_process_id() {
        assert!(host_pid().ends_with(&format!("-{}", std::process::id())));
    }
}
