//! Thread placement on recorded `/sys/devices/system` trees (`tests/topology/`, see its
//! README): the default thread count is the physical cores available, and workers are pinned one
//! per core round-robin across NUMA nodes first, SMT siblings last.

use std::path::PathBuf;

use purehw_hal_cpu::topology::Topology;

fn tree(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/topology").join(name)
}

#[track_caller]
fn check(name: &str, allowed: Option<&[usize]>, cores: usize, order: &[usize]) {
    let t = Topology::read(&tree(name), allowed).unwrap_or_else(|| panic!("{name}: no topology read"));
    assert_eq!(t.physical_cores(), cores, "{name}: physical cores");
    assert_eq!(t.pin_order(), order, "{name}: pin order");
}

#[test]
fn two_sockets_with_smt_spread_across_nodes_siblings_last() {
    let primaries: Vec<usize> = (0..8).flat_map(|i| [i, 8 + i]).collect();
    let siblings: Vec<usize> = primaries.iter().map(|c| c + 16).collect();
    check("2socket-2x8-smt", None, 16, &[primaries, siblings].concat());
    let t = Topology::read(&tree("2socket-2x8-smt"), None).unwrap();
    let nodes: Vec<usize> = t.threads.iter().map(|h| h.node).collect();
    assert_eq!(nodes, [[0; 8], [1; 8], [0; 8], [1; 8]].concat());
    assert_eq!(t.threads[17].core, 1);
    assert_eq!(t.threads[9].package, 1);
}

#[test]
fn one_socket_without_smt_in_order_offline_cpu_left_out() {
    check("1socket-16core", None, 16, &(0..16).collect::<Vec<_>>());
}

#[test]
fn smt_laptop_one_thread_per_core_first() {
    let order: Vec<usize> = (0..16).step_by(2).chain((1..16).step_by(2)).collect();
    check("laptop-8core-smt", None, 8, &order);
}

#[test]
fn cgroup_subset_counts_and_pins_only_allowed_cpus() {
    // cores 2..=5 (node 0, two with their sibling allowed too) and 10, 11 (node 1).
    let allowed = [2, 3, 4, 5, 10, 11, 18, 19];
    check("2socket-2x8-smt", Some(&allowed), 6, &[2, 10, 3, 11, 4, 5, 18, 19]);
    // Only the SMT sibling of a core allowed: that core still counts, once.
    check("2socket-2x8-smt", Some(&[16, 1, 17]), 2, &[1, 16, 17]);
}

#[test]
fn flat_virtual_machine_every_vcpu_a_core() {
    // Each vCPU its own package, all with core_id 0: the sibling lists tell the cores apart.
    check("vm-flat-16", None, 16, &(0..16).collect::<Vec<_>>());
}

#[test]
fn no_tree_no_topology() {
    assert!(Topology::read(&tree("does-not-exist"), None).is_none());
    assert!(Topology::read(&tree("2socket-2x8-smt"), Some(&[99])).is_none());
}

/// This machine: the default is between 1 and the CPUs offered, and a pinned pool computes.
#[test]
fn this_machine_default_and_pinned_backend() {
    let offered = std::thread::available_parallelism().map_or(1, |n| n.get());
    let d = purehw_hal_cpu::default_threads();
    assert!((1..=offered).contains(&d), "{d} of {offered}");
    if let Some(t) = purehw_hal_cpu::topology::detect() {
        let order = t.pin_order();
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, t.threads.iter().map(|h| h.cpu).collect::<Vec<_>>());
        let cpu = purehw_hal_cpu::Cpu::with_options(purehw_hal_cpu::CpuOptions { threads: 2, pin: true });
        assert!(cpu.is_ok(), "{:?}", cpu.err());
    }
}
