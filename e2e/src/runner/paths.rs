//! Path rewriting: there is no container filesystem, so each mount path in a container's
//! command, args, environment and working directory is replaced by the host folder that
//! holds the volume.

use std::path::PathBuf;

/// One container's view of the filesystem: mount paths mapped to host folders.
#[derive(Clone, Debug, Default)]
pub(super) struct Mounts(pub(super) Vec<(String, PathBuf)>);

impl Mounts {
    /// Replace every mount path (as a whole path component) in `s` with its host folder.
    pub(super) fn rewrite(&self, s: &str) -> String {
        let mut out = s.to_string();
        let mut sorted = self.0.clone();
        sorted.sort_by_key(|(m, _)| std::cmp::Reverse(m.len()));
        for (mount, host) in &sorted {
            let mount = mount.trim_end_matches('/');
            if mount.is_empty() {
                continue;
            }
            let mut result = String::new();
            let mut rest = out.as_str();
            while let Some(i) = rest.find(mount) {
                let after = &rest[i + mount.len()..];
                let before = &rest[..i];
                let before_ok = before.is_empty()
                    || before.ends_with("://")
                    || !is_path_char(before.chars().last().unwrap_or(' '));
                let after_ok = after.is_empty()
                    || after.starts_with('/')
                    || !is_path_char(after.chars().next().unwrap_or(' '));
                result.push_str(&rest[..i]);
                if before_ok && after_ok {
                    result.push_str(&host.display().to_string());
                } else {
                    result.push_str(mount);
                }
                rest = after;
            }
            result.push_str(rest);
            out = result;
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
}
