//! Which CPUs the pool's threads should use: the machine's cores, hardware threads (SMT) and
//! NUMA nodes as Linux describes them under `/sys/devices/system`, restricted to the process's
//! affinity mask (a cgroup cpuset or `taskset` shows there).
//!
//! Everything here is plain parsing of a tree given by its root, so tests run on recorded trees
//! (`tests/topology/`); the only system calls (reading the affinity mask, pinning a thread) are
//! in [`pool`](crate::pool), the module allowed `unsafe`.
//!
//! * The default thread count is one per physical core available: a second hardware thread of a
//!   core shares its load/store units and caches, and decode is memory-bound.
//! * The pin order ([`Topology::pin_order`]): one hardware thread of each core first, the cores
//!   taken round-robin across NUMA nodes (so a few threads spread the memory bandwidth of every
//!   node) until a node runs out, the other nodes' cores then; the cores' sibling threads last,
//!   in the same order.

use std::collections::BTreeMap;
use std::path::Path;

/// One hardware thread the process may run on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HwThread {
    /// The CPU number (`cpuN`).
    pub cpu: usize,
    /// The physical core: the lowest CPU of its `thread_siblings_list` (unique machine-wide,
    /// where `core_id` repeats on every package).
    pub core: usize,
    pub package: usize,
    /// NUMA node (0 when the machine has no `node*` entries).
    pub node: usize,
}

/// The hardware threads available to this process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    /// Sorted by CPU number.
    pub threads: Vec<HwThread>,
}

/// A Linux CPU list (`0-3,8,10-11`, as in `cpulist` and `thread_siblings_list`); `None` when
/// malformed.
pub fn parse_cpu_list(s: &str) -> Option<Vec<usize>> {
    let s = s.trim();
    let mut out = Vec::new();
    if s.is_empty() {
        return Some(out);
    }
    for part in s.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
                if b < a || b - a > 1 << 16 {
                    return None;
                }
                out.extend(a..=b);
            }
            None => out.push(part.trim().parse().ok()?),
        }
    }
    out.sort_unstable();
    out.dedup();
    Some(out)
}

/// This machine's topology (`/sys/devices/system`) within the calling thread's affinity mask.
pub fn detect() -> Option<Topology> {
    Topology::detect_at(Path::new("/sys/devices/system"))
}

fn read_trimmed(p: &Path) -> Option<String> {
    std::fs::read_to_string(p).ok().map(|s| s.trim().to_string())
}

impl Topology {
    /// The topology under `root` (a `/sys/devices/system` tree: `cpu/cpuN/topology/…`,
    /// `node/nodeN/cpulist`), keeping the CPUs in `allowed` (`None`: all that are listed).
    /// `None` when the tree has no CPU with a topology (not Linux, or `/sys` hidden).
    pub fn read(root: &Path, allowed: Option<&[usize]>) -> Option<Topology> {
        let mut node_of = BTreeMap::new();
        if let Ok(nodes) = std::fs::read_dir(root.join("node")) {
            for e in nodes.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(n) = name.strip_prefix("node").and_then(|n| n.parse::<usize>().ok()) else { continue };
                let cpus = read_trimmed(&e.path().join("cpulist")).and_then(|s| parse_cpu_list(&s)).unwrap_or_default();
                for c in cpus {
                    node_of.insert(c, n);
                }
            }
        }
        let mut threads = Vec::new();
        for e in std::fs::read_dir(root.join("cpu")).ok()?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(cpu) = name.strip_prefix("cpu").and_then(|n| n.parse::<usize>().ok()) else { continue };
            if allowed.is_some_and(|a| !a.contains(&cpu)) {
                continue;
            }
            let t = e.path().join("topology");
            // An offline CPU has no topology folder: it cannot run threads either.
            let Some(package) = read_trimmed(&t.join("physical_package_id")).and_then(|s| s.parse::<i64>().ok()) else {
                continue;
            };
            let siblings = read_trimmed(&t.join("thread_siblings_list")).and_then(|s| parse_cpu_list(&s));
            let core = match siblings.as_deref() {
                Some([first, ..]) => *first,
                // Without the sibling list, `core_id` within the package.
                _ => {
                    let id = read_trimmed(&t.join("core_id")).and_then(|s| s.parse::<usize>().ok()).unwrap_or(cpu);
                    (package.max(0) as usize) << 20 | id
                }
            };
            let node = node_of.get(&cpu).copied().unwrap_or(0);
            threads.push(HwThread { cpu, core, package: package.max(0) as usize, node });
        }
        if threads.is_empty() {
            return None;
        }
        threads.sort_by_key(|t| t.cpu);
        Some(Topology { threads })
    }

    /// This machine's topology within the calling thread's affinity mask.
    pub fn detect_at(root: &Path) -> Option<Topology> {
        Topology::read(root, crate::pool::affinity().as_deref())
    }

    /// Physical cores with at least one allowed hardware thread.
    pub fn physical_cores(&self) -> usize {
        let mut cores: Vec<usize> = self.threads.iter().map(|t| t.core).collect();
        cores.sort_unstable();
        cores.dedup();
        cores.len()
    }

    /// Every allowed CPU once, in the order workers are pinned (see the module docs).
    pub fn pin_order(&self) -> Vec<usize> {
        // Cores in order of their first allowed thread, each with its threads in CPU order.
        let mut cores: Vec<(usize, usize, Vec<usize>)> = Vec::new(); // (core, node, cpus)
        for t in &self.threads {
            match cores.iter_mut().find(|c| c.0 == t.core) {
                Some(c) => c.2.push(t.cpu),
                None => cores.push((t.core, t.node, vec![t.cpu])),
            }
        }
        let mut by_node: BTreeMap<usize, Vec<&Vec<usize>>> = BTreeMap::new();
        for (_, node, cpus) in &cores {
            by_node.entry(*node).or_default().push(cpus);
        }
        // Cores round-robin across nodes: node A's first, node B's first, A's second, …
        let longest = by_node.values().map(Vec::len).max().unwrap_or(0);
        let mut spread: Vec<&Vec<usize>> = Vec::with_capacity(cores.len());
        for i in 0..longest {
            spread.extend(by_node.values().filter_map(|v| v.get(i)));
        }
        // First thread of every core, then the second ones, …
        let most = spread.iter().map(|c| c.len()).max().unwrap_or(0);
        (0..most).flat_map(|k| spread.iter().filter_map(move |c| c.get(k).copied())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-3,8,10-11\n"), Some(vec![0, 1, 2, 3, 8, 10, 11]));
        assert_eq!(parse_cpu_list("5"), Some(vec![5]));
        assert_eq!(parse_cpu_list(""), Some(vec![]));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("a"), None);
    }
}
