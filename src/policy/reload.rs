//! Hot reload of the policy directory: notice that a file changed (one `stat` per file, so it
//! works on every filesystem and needs no inotify), and build the next policy set so that a
//! broken file keeps its last good version in force.
//!
//! Pure apart from reading the directory; the polling loop lives with the application.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{AgentPolicy, LoadReport, Policies, Severity};
use crate::fsutil::FileStamp;

/// What the policy directory looked like: each `.toml` file and its stamp, sorted by path.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DirStamp(Vec<(PathBuf, Option<FileStamp>)>);

impl DirStamp {
    /// Stamp every `.toml` file in `dir` (none if the directory cannot be read).
    pub fn of(dir: &Path) -> DirStamp {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                    .map(|p| {
                        let s = FileStamp::of(&p);
                        (p, s)
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        DirStamp(v)
    }
}

/// The new policy set after a reload: every file that loaded cleanly, plus, for each file that
/// failed, the agents it defined in the last good set, so a typo never revokes an agent's
/// access nor widens it. Each failure is logged at `error` with its file, line and field.
pub fn keep_last_good(current: &Policies, report: LoadReport) -> Policies {
    let failed: HashSet<&Path> = report
        .diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .map(|d| d.file.as_path())
        .collect();
    for d in report
        .diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Error)
    {
        tracing::error!("policy file not reloaded, keeping its last good version: {d}");
    }
    let mut agents: Vec<Arc<AgentPolicy>> = report.policies.agents().cloned().collect();
    for old in current.agents() {
        let from_failed_file = failed.contains(old.file());
        if from_failed_file && report.policies.get(old.agent()).is_none() {
            agents.push(old.clone());
        }
    }
    tracing::info!(agents = agents.len(), "policies reloaded");
    Policies::from_shared(agents)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"agent = "a"
[[routes]]
id = "r"
host = "api.example.test"
methods = ["GET"]
paths = ["/**"]
"#;

    fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(d.path().join(name), text).unwrap();
        }
        d
    }

    #[test]
    fn a_broken_file_keeps_its_last_good_agents() {
        let d = dir_with(&[
            ("a.toml", GOOD),
            ("b.toml", &GOOD.replace("\"a\"", "\"b\"")),
        ]);
        let first = Policies::load_dir(d.path()).unwrap();
        assert!(!first.has_errors());
        let current = first.policies;
        std::fs::write(
            d.path().join("a.toml"),
            "agent = \"a\"\n[[routes]]\nid = 3\n",
        )
        .unwrap();
        let report = Policies::load_dir(d.path()).unwrap();
        assert!(report.has_errors());
        let next = keep_last_good(&current, report);
        assert!(
            next.get("a").is_some(),
            "the broken file's agent stays in force"
        );
        assert!(next.get("b").is_some());
    }

    #[test]
    fn a_removed_file_removes_its_agent() {
        let d = dir_with(&[("a.toml", GOOD)]);
        let current = Policies::load_dir(d.path()).unwrap().policies;
        std::fs::remove_file(d.path().join("a.toml")).unwrap();
        let next = keep_last_good(&current, Policies::load_dir(d.path()).unwrap());
        assert!(next.get("a").is_none());
    }

    #[test]
    fn the_stamp_changes_when_a_file_is_added_edited_or_removed() {
        let d = dir_with(&[("a.toml", GOOD)]);
        let s0 = DirStamp::of(d.path());
        assert_eq!(s0, DirStamp::of(d.path()));
        std::fs::write(d.path().join("notes.txt"), "ignored").unwrap();
        assert_eq!(s0, DirStamp::of(d.path()), "only .toml files count");
        std::fs::write(d.path().join("b.toml"), GOOD).unwrap();
        let s1 = DirStamp::of(d.path());
        assert_ne!(s0, s1);
        std::fs::write(
            d.path().join("b.toml"),
            format!("{GOOD}\n# edited, longer\n"),
        )
        .unwrap();
        let s2 = DirStamp::of(d.path());
        assert_ne!(s1, s2);
        std::fs::remove_file(d.path().join("b.toml")).unwrap();
        assert_ne!(s2, DirStamp::of(d.path()));
    }
}
