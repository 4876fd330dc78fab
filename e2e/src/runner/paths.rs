//! Path rewriting: there is no container filesystem, so each mount path in a container's
//! command, args, environment and working directory is replaced by the host folder that
//! holds the volume.

use std::path::PathBuf;

/// One container's view of the filesystem: mount paths mapped to host folders.
#[derive(Clone, Debug, Default)]
pub(super) struct Mounts(pub(super) Vec<(String, PathBuf)>);

impl Mounts {
    /// Replace every mount path (as a whole path component) in `s` with its host folder,
    /// in one pass: text that was substituted is never rewritten again (a host folder
    /// under `/tmp` stays itself when `/tmp` is also a mount), and at each position the
    /// longest mount path wins.
    pub(super) fn rewrite(&self, s: &str) -> String {
        let mut sorted: Vec<(&str, &PathBuf)> = self
            .0
            .iter()
            .map(|(m, h)| (m.trim_end_matches('/'), h))
            .filter(|(m, _)| !m.is_empty())
            .collect();
        sorted.sort_by_key(|(m, _)| std::cmp::Reverse(m.len()));
        let mut out = String::new();
        let mut i = 0;
        'scan: while i < s.len() {
            let before = &s[..i];
            let before_ok = before.is_empty()
                || before.ends_with("://")
                || !is_path_char(before.chars().last().unwrap_or(' '));
            if before_ok {
                for (mount, host) in &sorted {
                    if let Some(after) = s[i..].strip_prefix(mount) {
                        let after_ok = after.is_empty()
                            || after.starts_with('/')
                            || !is_path_char(after.chars().next().unwrap_or(' '));
                        if after_ok {
                            out.push_str(&host.display().to_string());
                            i += mount.len();
                            continue 'scan;
                        }
                    }
                }
            }
            let c = s[i..].chars().next().unwrap_or(' ');
            out.push(c);
            i += c.len_utf8();
        }
        out
    }
}

fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_mount_paths_as_whole_components() {
        let m = Mounts(vec![
            ("/etc/taper".into(), PathBuf::from("/tmp/v/job")),
            ("/data".into(), PathBuf::from("/tmp/v/data")),
        ]);
        assert_eq!(
            m.rewrite("--job=/etc/taper/job.yaml"),
            "--job=/tmp/v/job/job.yaml"
        );
        assert_eq!(m.rewrite("file:///data/x"), "file:///tmp/v/data/x");
        assert_eq!(m.rewrite("/database"), "/database");
        assert_eq!(m.rewrite("/data"), "/tmp/v/data");
    }

    #[test]
    fn a_host_folder_under_another_mount_is_not_rewritten_again() {
        let m = Mounts(vec![
            ("/etc/taper".into(), PathBuf::from("/tmp/pods/1/job")),
            ("/tmp".into(), PathBuf::from("/tmp/pods/1/tmp")),
        ]);
        assert_eq!(
            m.rewrite("--job=/etc/taper/job.yaml /tmp/x"),
            "--job=/tmp/pods/1/job/job.yaml /tmp/pods/1/tmp/x"
        );
    }
}
