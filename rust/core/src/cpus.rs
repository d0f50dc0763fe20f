//! How many CPUs this process may use: the affinity mask (what
//! `std::thread::available_parallelism` reports) capped by the CPU quota of
//! its cgroup (v2 `cpu.max`, or v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`),
//! the limit a container's `--cpus` sets. A quota of 1.5 CPUs gives 2
//! threads: the work is split evenly, so both finish within the quota.

use std::path::{Path, PathBuf};

/// The CPUs available to this process (at least 1).
pub fn available() -> usize {
    let affinity = std::thread::available_parallelism().map_or(1, |n| n.get());
    match cgroup_quota(Path::new("/proc/self/cgroup"), Path::new("/sys/fs/cgroup")) {
        Some(q) => affinity.min(q),
        None => affinity,
    }
}

/// The smallest CPU quota on the way from this process's cgroup to the
/// root, in whole CPUs (rounded up), or None when there is none.
fn cgroup_quota(self_cgroup: &Path, root: &Path) -> Option<usize> {
    let membership = std::fs::read_to_string(self_cgroup).ok()?;
    let mut best: Option<usize> = None;
    for dir in quota_dirs(&membership, root) {
        for d in dir.ancestors().take_while(|d| d.starts_with(root)) {
            if let Some(q) = read_quota(d) {
                best = Some(best.map_or(q, |b| b.min(q)));
            }
        }
    }
    best
}

/// The directories whose quota files apply, from `/proc/self/cgroup`
/// lines `id:controllers:path` (v2: `0::path`; v1: a `cpu` controller).
fn quota_dirs(membership: &str, root: &Path) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for line in membership.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(ctrl), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let rel = path.trim_start_matches('/');
        if ctrl.is_empty() {
            dirs.push(root.join(rel));
        } else if ctrl.split(',').any(|c| c == "cpu") {
            dirs.push(root.join(ctrl).join(rel));
            dirs.push(root.join("cpu").join(rel));
        }
    }
    dirs
}

fn read_quota(dir: &Path) -> Option<usize> {
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
    if let Some(max) = read("cpu.max") {
        return parse_cpu_max(&max);
    }
    parse_cfs(&read("cpu.cfs_quota_us")?, &read("cpu.cfs_period_us")?)
}

/// cgroup v2 `cpu.max`: `"max 100000"` (no quota) or `"<quota> <period>"`.
fn parse_cpu_max(s: &str) -> Option<usize> {
    let mut it = s.split_whitespace();
    let (quota, period) = (it.next()?, it.next().unwrap_or("100000"));
    whole_cpus(quota.parse().ok()?, period.parse().ok()?)
}

/// cgroup v1: a quota of `-1` means none.
fn parse_cfs(quota: &str, period: &str) -> Option<usize> {
    let q: i64 = quota.trim().parse().ok()?;
    whole_cpus(u64::try_from(q).ok()?, period.trim().parse().ok()?)
}

fn whole_cpus(quota: u64, period: u64) -> Option<usize> {
    if quota == 0 || period == 0 {
        return None;
    }
    Some(quota.div_ceil(period).max(1) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_files_parse_to_whole_cpus() {
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max("200000 100000\n"), Some(2));
        assert_eq!(parse_cpu_max("150000 100000"), Some(2));
        assert_eq!(parse_cpu_max("50000 100000"), Some(1));
        assert_eq!(parse_cpu_max("garbage"), None);
        assert_eq!(parse_cfs("-1\n", "100000\n"), None);
        assert_eq!(parse_cfs("300000\n", "100000\n"), Some(3));
        assert_eq!(parse_cfs("1\n", "0\n"), None);
    }

    #[test]
    fn the_smallest_quota_on_the_path_to_the_root_wins() {
        let root = std::env::temp_dir().join(format!("fusedce-cg-{}", std::process::id()));
        let leaf = root.join("a/b");
        std::fs::create_dir_all(&leaf).unwrap();
        std::fs::write(root.join("a/cpu.max"), "300000 100000\n").unwrap();
        std::fs::write(leaf.join("cpu.max"), "max 100000\n").unwrap();
        let membership = root.join("self_cgroup");
        std::fs::write(&membership, "0::/a/b\n").unwrap();
        assert_eq!(cgroup_quota(&membership, &root), Some(3));
        std::fs::write(&membership, "4:cpu,cpuacct:/x\n").unwrap();
        std::fs::create_dir_all(root.join("cpu,cpuacct/x")).unwrap();
        std::fs::write(root.join("cpu,cpuacct/x/cpu.cfs_quota_us"), "100000").unwrap();
        std::fs::write(root.join("cpu,cpuacct/x/cpu.cfs_period_us"), "100000").unwrap();
        assert_eq!(cgroup_quota(&membership, &root), Some(1));
        std::fs::write(&membership, "0::/\n").unwrap();
        assert_eq!(cgroup_quota(&membership, &root), None);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
